"""Vector families in a bank: storage contract, views, and the clear errors around them."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import synthetic_bank
from emoscope.errors import EmoscopeError
from emoscope.monitor import Monitor
from emoscope.readouts import UserReader
from emoscope.speakers import FAMILIES
from emoscope.vectors import EmotionBank, LayerVectors, unit_rows

FAMILY_EMOTIONS = ["afraid", "calm", "happy"]


def with_family(lm, name: str = "present") -> EmotionBank:
    bank = synthetic_bank(lm, ["happy", "sad", "afraid", "calm"], layers=[1, 2])
    g = torch.Generator().manual_seed(7)
    built = {
        layer: LayerVectors(
            unit_rows(torch.randn(3, lm.hidden_size, generator=g)),
            torch.randn(3, lm.hidden_size, generator=g),
            torch.randn(lm.hidden_size, generator=g),
            0,
        )
        for layer in bank.layers
    }
    stats = {}
    for layer in bank.layers:
        stats[f"neutral_score_mean.{layer}"] = torch.full((3,), 0.5)
        stats[f"neutral_score_std.{layer}"] = torch.full((3,), 2.0)
    bank.add_family(name, FAMILY_EMOTIONS, built, stats, {"source": "test", "default_layer": 1})
    return bank


def test_a_family_is_stored_under_its_own_names_beside_the_story_vectors(tiny_lm, tmp_path):
    lm = tiny_lm("llama")
    bank = with_family(lm)
    bank.save(tmp_path / "bank")
    tensors = load_file(str(tmp_path / "bank" / "vectors.safetensors"))
    assert set(tensors) == {"layer.1", "layer.2", "present.layer.1", "present.layer.2"}
    assert tuple(tensors["present.layer.2"].shape) == (3, lm.hidden_size)
    manifest = json.loads((tmp_path / "bank" / "manifest.json").read_text())
    assert manifest["families"]["present"] == {
        "emotions": FAMILY_EMOTIONS,
        "source": "test",
        "default_layer": 1,
    }
    stats = load_file(str(tmp_path / "bank" / "stats.safetensors"))
    assert {"present.mean.1", "present.raw.1", "present.neutral_score_std.2"} <= set(stats)

    loaded = EmotionBank.load(tmp_path / "bank", model=lm)
    assert loaded.families == ["present"]
    view = loaded.family("present")
    assert view.emotions == FAMILY_EMOTIONS and view.default_layer == 1
    torch.testing.assert_close(view.vectors[2], bank.family_vectors["present"][2])
    # its own centring point and calibration; the neutral mean and residual norm are shared
    torch.testing.assert_close(view.stat("mean", 1), bank.stats["present.mean.1"])
    assert float(view.stat("neutral_score_std", 2)[0]) == 2.0
    assert view.residual_norm(1) == loaded.residual_norm(1)
    assert view.families == [] and loaded.family("story") is loaded


def test_a_family_reads_like_a_bank_in_the_monitor(tiny_lm):
    lm = tiny_lm("llama")
    bank = with_family(lm)
    view = bank.family("present")
    text = "a short text for the monitor"
    readout = Monitor(lm, view, layers=2).score(text)
    assert readout.emotions == FAMILY_EMOTIONS
    hidden = Monitor(lm, bank, layers=2).score(text)
    assert hidden.emotions == bank.emotions
    assert not torch.allclose(readout.scores[:, 0], hidden.scores[:, bank.emotions.index("afraid")])


def test_unknown_family_and_older_banks_give_one_clear_line(tiny_lm, tmp_path):
    lm = tiny_lm("llama")
    old = synthetic_bank(lm, ["happy", "sad"], layers=[1])
    with pytest.raises(
        EmoscopeError, match=r"no 'present' vector family .*re-run `emoscope extract`"
    ):
        old.family("present")
    bank = with_family(lm)
    with pytest.raises(EmoscopeError, match="no 'absent' vector family; it holds: story, present"):
        bank.family("absent")
    with pytest.raises(EmoscopeError, match="Emotion 'sad' is not in this bank"):
        bank.family("present").vector("sad")
    with pytest.raises(EmoscopeError, match="cannot name a vector family"):
        bank.add_family("story", FAMILY_EMOTIONS, {}, {}, {})


def test_a_damaged_family_is_reported_as_such(tiny_lm, tmp_path):
    lm = tiny_lm("llama")
    with_family(lm).save(tmp_path / "bank")
    manifest_path = tmp_path / "bank" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["families"]["present"]["emotions"] = ["afraid", "calm"]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(EmoscopeError, match=r"present.layer.1 is shape \(3, 32\)"):
        EmotionBank.load(tmp_path / "bank")


def test_subset_leaves_families_out(tiny_lm):
    bank = with_family(tiny_lm("llama"))
    small = bank.subset(["happy", "calm"])
    assert small.families == [] and "families" not in small.manifest
    assert not [key for key in small.stats if key.startswith("present.")]


def test_extraction_builds_every_family_and_chooses_the_chat_readout_on_training_prompts(
    small_run,
):
    result, config = small_run
    bank = EmotionBank.load(config.out)
    assert set(bank.families) == set(FAMILIES)
    manifest = bank.manifest
    for name in FAMILIES:
        view = bank.family(name)
        info = manifest["families"][name]
        assert view.emotions == info["emotions"] and info["default_layer"] in bank.layers
        for layer in bank.layers:
            torch.testing.assert_close(
                view.vectors[layer].norm(dim=1), torch.ones(len(view.emotions))
            )
            assert view.stat("user_score_std", layer).shape == (len(view.emotions),)
    assert bank.stat("user_score_mean", bank.layers[0]).shape == (len(bank.emotions),)
    section = result.report["families"]
    chat = section["chat_readouts"]
    best = max((c["train"], c["train_mrr"]) for c in chat["candidates"])
    assert (chat["choice"]["train"], chat["choice"]["train_mrr"]) == best
    choice = manifest["chat_readout"]
    assert (choice["family"], choice["site"], choice["layer"]) == (
        chat["choice"]["family"],
        chat["choice"]["site"],
        chat["choice"]["layer"],
    )
    assert {c["family"] for c in chat["candidates"]} >= {"story", "present", "other"}
    grid = section["grid"]
    assert [round(grid["matrix"][i][i], 4) for i in range(4)] == [1.0] * 4
    for family in ("felt", "displayed"):
        d = section["deflection"][family]
        assert 0 < d["norm_left"] <= 1 and d["story_subspace_dims"] >= 1
    assert 0 <= section["framing"]["same_emotion_cosine"] <= 1
    html = (config.out / "report.html").read_text("utf-8")
    assert "Who feels what" in html and "The 2x2 grid" in html


def test_user_reader_reads_with_the_recorded_choice(small_run, smollm):
    _, config = small_run
    bank = EmotionBank.load(config.out)
    reader = UserReader.for_bank(smollm, bank)
    assert reader is not None
    choice = bank.manifest["chat_readout"]
    assert (reader.family, reader.site, reader.layer) == (
        choice["family"],
        choice["site"],
        choice["layer"],
    )
    message = "The vet called: the surgery went well and we can take him home tonight."
    reading = reader.read(message)
    assert reading.emotions == bank.family(choice["family"]).emotions
    other_site = "user_mean" if choice["site"] == "assistant_colon" else "assistant_colon"
    other = UserReader(smollm, bank, family="story", site=other_site).read(message)
    assert other.site == other_site and not torch.equal(other.z[:3], reading.z[:3])
    with pytest.raises(EmoscopeError, match="Unknown chat site"):
        UserReader(smollm, bank, site="everywhere")
    with pytest.raises(EmoscopeError, match="empty"):
        reader.read("   ")
