from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import synthetic_bank
from emoscope import __version__
from emoscope.errors import EmoscopeError
from emoscope.vectors import (
    BANK_FORMAT,
    EmotionBank,
    Recipe,
    build_layer,
    build_layers,
    centred_scores,
    orthonormal_span,
    principal_components,
    project_out,
    two_thirds_layer,
)


def test_principal_components_explain_the_requested_variance():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=g) * torch.tensor([10.0, 5.0, 1.0, 0.5, 0.1, 0.1])
    cov = (x.T @ x / len(x)).double()
    assert principal_components(cov, 0.5).shape == (6, 1)
    assert principal_components(cov, 0.9).shape == (6, 2)
    assert principal_components(cov, 0.0).shape == (6, 0)


def test_orthonormal_span_drops_dependent_columns_and_refuses_the_whole_space():
    a = torch.eye(5)[:, :2]
    combined = torch.cat([a, a[:, :1] * 3 + 1e-9], dim=1)
    basis = orthonormal_span(combined)
    assert basis.shape == (5, 2)
    torch.testing.assert_close(basis.T @ basis, torch.eye(2))
    with pytest.raises(EmoscopeError, match="whole residual space"):
        orthonormal_span(torch.eye(5))


def test_vectors_are_unit_centred_and_orthogonal_to_projected_directions():
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(4).repeat_interleave(10)
    means = torch.randn(4, 16, generator=g)[labels] + 0.1 * torch.randn(40, 16, generator=g)
    basis = torch.linalg.qr(torch.randn(16, 3, generator=g))[0]
    layer = build_layer(means, labels, 4, basis, Recipe(story_variance=0.2))
    torch.testing.assert_close(layer.vectors.norm(dim=1), torch.ones(4))
    assert (layer.vectors @ basis).abs().max() < 1e-5
    per_emotion = torch.stack([means[labels == k].mean(0) for k in range(4)])
    torch.testing.assert_close(layer.mean, per_emotion.mean(0))
    raw = per_emotion - per_emotion.mean(0)
    torch.testing.assert_close(layer.raw, raw / raw.norm(dim=1, keepdim=True))
    assert layer.n_components > 3
    torch.testing.assert_close(project_out(layer.vectors, basis), layer.vectors, atol=1e-5, rtol=0)


def test_story_directions_inside_the_neutral_span_add_no_components():
    """Within-emotion directions already projected out must not be counted (or filled) twice."""
    g = torch.Generator().manual_seed(2)
    labels = torch.arange(4).repeat_interleave(10)
    noise_dirs = torch.linalg.qr(torch.randn(16, 2, generator=g))[0]
    noise = torch.randn(40, 2, generator=g) @ noise_dirs.T * 5
    means = torch.randn(4, 16, generator=g)[labels] + noise
    layer = build_layer(means, labels, 4, noise_dirs, Recipe(story_variance=0.5))
    assert layer.n_components == 2
    assert (layer.vectors @ noise_dirs).abs().max() < 1e-5


def test_levels_share_one_decomposition_and_match_single_builds():
    g = torch.Generator().manual_seed(3)
    labels = torch.arange(5).repeat_interleave(8)
    means = torch.randn(5, 12, generator=g)[labels] + 0.5 * torch.randn(40, 12, generator=g)
    basis = torch.linalg.qr(torch.randn(12, 2, generator=g))[0]
    levels = [0.0, 0.3, 0.6]
    together = build_layers(means, labels, 5, basis, levels)
    for level, layer in zip(levels, together, strict=True):
        alone = build_layer(means, labels, 5, basis, Recipe(story_variance=level))
        torch.testing.assert_close(layer.vectors, alone.vectors)
    assert together[0].n_components == 2 < together[1].n_components < together[2].n_components


def test_two_thirds_layer_is_the_nearest_available_layer():
    assert two_thirds_layer(range(30), 30) == 19
    assert two_thirds_layer([0, 10, 20, 29], 30) == 20
    assert two_thirds_layer([4, 8, 12]) == 8  # without the depth, the deepest layer stands in


# ----- the bank on disk -----


def saved_bank(tiny_lm, folder: Path) -> EmotionBank:
    bank = synthetic_bank(tiny_lm("llama"))
    bank.save(folder)
    return bank


def test_bank_round_trip_keeps_every_tensor_and_the_manifest(tiny_lm, tmp_path):
    bank = saved_bank(tiny_lm, tmp_path / "bank")
    loaded = EmotionBank.load(tmp_path / "bank", model=tiny_lm("llama"))
    assert loaded.emotions == bank.emotions and loaded.layers == bank.layers
    assert loaded.vectors.keys() == bank.vectors.keys()
    for layer in bank.layers:
        torch.testing.assert_close(loaded.vectors[layer], bank.vectors[layer], rtol=0, atol=0)
    assert loaded.stats.keys() == bank.stats.keys()
    for key, value in bank.stats.items():
        torch.testing.assert_close(loaded.stats[key], value, rtol=0, atol=0)
    manifest = json.loads((tmp_path / "bank" / "manifest.json").read_text())
    assert manifest == loaded.manifest
    assert manifest == dict(
        bank.manifest,
        format=BANK_FORMAT,
        emotions=bank.emotions,
        layers=bank.layers,
        hidden_size=bank.hidden_size,
        emoscope_version=__version__,
    )
    assert not [p.name for p in (tmp_path / "bank").iterdir() if "partial" in p.name]


def test_saved_bank_files_follow_the_umask(tiny_lm, tmp_path):
    """Another user may read a bank on a shared machine exactly as any file written there."""
    previous = os.umask(0o022)
    try:
        saved_bank(tiny_lm, tmp_path / "bank")
    finally:
        os.umask(previous)
    for name in ("vectors.safetensors", "stats.safetensors", "manifest.json"):
        assert (tmp_path / "bank" / name).stat().st_mode & 0o777 == 0o644, name


@pytest.mark.parametrize("key", ["layers", "hidden_size", "emotions"])
def test_a_manifest_missing_a_key_is_a_clear_error(tiny_lm, tmp_path, key):
    saved_bank(tiny_lm, tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    del manifest[key]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EmoscopeError, match=f"lacks '{key}'.*damaged"):
        EmotionBank.load(tmp_path)


def test_a_manifest_with_the_wrong_types_is_a_clear_error(tiny_lm, tmp_path):
    saved_bank(tiny_lm, tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps(dict(manifest, layers="1,2")))
    with pytest.raises(EmoscopeError, match="'layers' a non-empty list of integers"):
        EmotionBank.load(tmp_path)


def test_vectors_missing_a_layer_is_a_clear_error(tiny_lm, tmp_path):
    bank = saved_bank(tiny_lm, tmp_path)
    tensors = load_file(str(tmp_path / "vectors.safetensors"))
    del tensors[f"layer.{bank.layers[0]}"]
    save_file(tensors, str(tmp_path / "vectors.safetensors"))
    with pytest.raises(EmoscopeError, match=f"no vectors for layer\\(s\\) {bank.layers[0]} "):
        EmotionBank.load(tmp_path)


def test_vectors_of_the_wrong_shape_are_a_clear_error(tiny_lm, tmp_path):
    bank = saved_bank(tiny_lm, tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps(dict(manifest, hidden_size=7)))
    with pytest.raises(EmoscopeError, match=f"layer.{bank.layers[0]} has shape"):
        EmotionBank.load(tmp_path)


def test_every_readout_mode_is_the_centred_readout(tiny_lm):
    bank = synthetic_bank(tiny_lm("llama"))
    layer = bank.layers[0]
    hidden = torch.randn(3, 5, bank.hidden_size, generator=torch.Generator().manual_seed(4))
    v, centre = bank.vectors[layer], bank.stat("mean", layer)
    expected = torch.einsum("bth,eh->bte", hidden - centre, v)
    torch.testing.assert_close(bank.scores(hidden, layer), expected)
    torch.testing.assert_close(centred_scores(hidden, v, centre), expected)
    projection = torch.einsum("bth,eh->bte", hidden, v)
    torch.testing.assert_close(bank.scores(hidden, layer, mode="projection"), projection)
    cosine = projection / hidden.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(bank.scores(hidden, layer, mode="cosine"), cosine)
    with pytest.raises(EmoscopeError, match="Unknown readout mode"):
        bank.scores(hidden, layer, mode="dot")
