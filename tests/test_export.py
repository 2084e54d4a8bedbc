from __future__ import annotations

import pytest
import torch

from conftest import synthetic_bank
from emoscope.errors import EmoscopeError
from emoscope.export import export_bank, export_emotions, read_control_vector, write_control_vector
from emoscope.steer import Steering, steering_vectors


def test_export_round_trip_matches_steering_vectors(tiny_lm, tmp_path):
    lm = tiny_lm("llama")
    bank = synthetic_bank(lm)
    path = export_emotions(bank, tmp_path / "happy.gguf", {"happy": 0.3, "calm": -0.1}, [1, 2])
    loaded = read_control_vector(path, lm.hidden_size)
    expected = steering_vectors(bank, Steering({"happy": 0.3, "calm": -0.1}, layers=[1, 2]))
    assert set(loaded) == {1, 2}
    for layer in (1, 2):
        torch.testing.assert_close(loaded[layer], expected[layer])
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "controlvector"
    assert int(fields["controlvector.layer_count"].parts[-1][0]) == 2


def test_export_whole_bank_and_refusals(tiny_lm, tmp_path):
    lm = tiny_lm("llama")
    bank = synthetic_bank(lm)
    paths = export_bank(bank, tmp_path / "all", 0.5, [2])
    assert len(paths) == 4 and all(p.exists() for p in paths)
    with pytest.raises(EmoscopeError, match="layer 0"):
        write_control_vector(tmp_path / "x.gguf", {0: torch.ones(lm.hidden_size)}, "llama")
    with pytest.raises(EmoscopeError, match="hidden size"):
        read_control_vector(paths[0], hidden_size=7)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(EmoscopeError, match="not a readable GGUF"):
        read_control_vector(tmp_path / "junk.gguf")


def test_imported_control_vector_steers_like_the_bank(tiny_lm, tmp_path):
    from emoscope.generation import SamplingConfig
    from emoscope.steer import Steerer

    lm = tiny_lm("gemma3")
    bank = synthetic_bank(lm)
    path = export_emotions(bank, tmp_path / "c.gguf", {"afraid": 1.2}, [1])
    steerer = Steerer(lm, bank)
    sampling = SamplingConfig(max_new_tokens=6, stop_at_eos=False)
    direct = steerer.generate(
        ["the sea"], steering=Steering({"afraid": 1.2}, layers=1), sampling=sampling, chat=False
    )
    imported = steerer.generate(
        ["the sea"],
        steering=Steering({}, layers=1, extra=read_control_vector(path)),
        sampling=sampling,
        chat=False,
    )
    assert direct == imported
