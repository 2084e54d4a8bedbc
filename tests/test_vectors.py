from __future__ import annotations

import pytest
import torch

from emoscope.errors import EmoscopeError
from emoscope.vectors import (
    Recipe,
    build_layer,
    orthonormal_span,
    principal_components,
    project_out,
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
