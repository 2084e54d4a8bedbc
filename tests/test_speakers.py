"""Speaker means and vector families from the dialogue corpora."""

from __future__ import annotations

import pytest
import torch

from emoscope.corpus.dialogues import (
    load_deflection_dialogues,
    load_speaker_dialogues,
    render,
    speaker_token_mask,
)
from emoscope.errors import EmoscopeError
from emoscope.speakers import build_family, family_rows, speaker_means


@pytest.mark.parametrize("framing", ["person", "chat"])
def test_speaker_means_average_each_speakers_own_tokens(smollm, framing):
    dialogues = load_speaker_dialogues()[:3]
    rendered = [render(smollm, d.turns, framing) for d in dialogues]
    means = speaker_means(smollm, rendered, layers=[4, 20], max_batch=2, progress=False)
    assert means.shape == (3, 2, 2, smollm.hidden_size)
    for i, item in enumerate(rendered):  # alone, unpadded, through output_hidden_states
        ids = smollm.tokenizer(item.text, add_special_tokens=item.add_special_tokens)
        with torch.no_grad():
            out = smollm.model(
                torch.tensor([ids["input_ids"]]), output_hidden_states=True, use_cache=False
            )
        for s, speaker in enumerate("AB"):
            mask = torch.tensor(speaker_token_mask(smollm, item, speaker))
            for j, layer in enumerate([4, 20]):
                expected = out.hidden_states[layer + 1][0][mask].mean(dim=0)
                torch.testing.assert_close(means[i, s, j], expected, atol=2e-3, rtol=1e-4)


def test_families_pick_rows_and_labels_as_the_grid_defines():
    dialogues = load_speaker_dialogues()[:2]
    a, b = dialogues[0].emotion("A"), dialogues[0].emotion("B")
    rows, labels = family_rows(dialogues, "present")
    assert rows[:2] == [(0, 0), (0, 1)] and labels[:2] == [a, b]
    rows, labels = family_rows(dialogues, "other")
    assert labels[:2] == [b, a]
    assert family_rows(dialogues, "present_assistant") == (
        [(0, 1), (1, 1)],
        [b, dialogues[1].emotion("B")],
    )
    assert family_rows(dialogues, "other_human")[1][0] == b
    deflections = load_deflection_dialogues()[:1]
    assert family_rows(deflections, "felt")[1] == [deflections[0].felt]
    with pytest.raises(EmoscopeError, match="deflection"):
        family_rows(dialogues, "felt")
    with pytest.raises(EmoscopeError, match="Unknown vector family"):
        family_rows(dialogues, "absent")


def test_a_family_is_unit_rows_orthogonal_to_the_neutral_basis():
    dialogues = load_speaker_dialogues()
    emotions = sorted({e for d in dialogues for _, e in d.emotions})
    g = torch.Generator().manual_seed(0)
    means = torch.randn(len(dialogues), 2, 1, 16, generator=g)
    basis = torch.linalg.qr(torch.randn(16, 3, generator=g)).Q
    family = build_family(means, dialogues, "present", emotions, 0, basis)
    assert family.vectors.shape == (len(emotions), 16)
    torch.testing.assert_close(family.vectors.norm(dim=1), torch.ones(len(emotions)))
    assert float((family.vectors @ basis).abs().max()) < 1e-5
    with pytest.raises(EmoscopeError, match="No 'present' examples"):
        build_family(means, dialogues, "present", [*emotions, "zealous"], 0, basis)
