"""Readout calibration stored with the bank: what each emotion's readout looks like on neutral input.

A readout means little on its own ("calm: 3.1"); against its spread on neutral text (over token
positions) and on neutral prompts (at the start of the assistant turn) it becomes a z-score that
monitoring can threshold and the implicit-prompt test can compare across emotions.
"""

from __future__ import annotations

import torch

from emoscope.activations import NeutralMoments
from emoscope.vectors import LayerVectors, centred_scores


def readout_statistics(
    layer: LayerVectors, neutral: NeutralMoments, index: int, prompt_readouts: torch.Tensor
) -> dict[str, torch.Tensor]:
    """One layer's calibration statistics, keyed by their name in ``stats.safetensors``.

    ``index`` is the layer's position in ``neutral.layers``; ``prompt_readouts`` is
    ``[prompts, hidden]`` at that layer. The neutral-text spread comes from the stored covariance
    (``v @ cov @ v``), so no token is needed.
    """
    v = layer.vectors.double()
    cov = neutral.cov[index].double()
    neutral_mean = neutral.mean[index]
    prompt_scores = centred_scores(prompt_readouts, layer.vectors, layer.mean)
    return {
        "neutral_mean": neutral_mean,
        "residual_norm": neutral.mean_norm[index].reshape(1),
        "neutral_score_mean": centred_scores(neutral_mean, layer.vectors, layer.mean),
        "neutral_score_std": torch.einsum("eh,hk,ek->e", v, cov, v).clamp(min=0).sqrt().float(),
        "prompt_score_mean": prompt_scores.mean(dim=0),
        "prompt_score_std": prompt_scores.std(dim=0),
    }


def user_site_statistics(
    layer: LayerVectors, neutral_user: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Each emotion's readout averaged over the user's tokens of neutral prompts (``[prompts,
    hidden]``): the calibration of the user-turn chat readout."""
    scores = centred_scores(neutral_user, layer.vectors, layer.mean)
    return {"user_score_mean": scores.mean(dim=0), "user_score_std": scores.std(dim=0)}
