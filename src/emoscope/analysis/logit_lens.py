"""Logit lens: which output tokens each emotion direction promotes and suppresses.

A direction is pushed through the model's final norm and unembedding; the logits of the zero
vector are subtracted so that a LayerNorm bias does not put the same tokens on every list.
"""

from __future__ import annotations

from typing import Any

import torch


def logit_lens(lm: Any, vectors: torch.Tensor, k: int = 10) -> list[dict[str, list[str]]]:
    """Top and bottom ``k`` tokens for each row of ``vectors`` (``[emotions, hidden]``)."""
    norm = lm.adapter.final_norm(lm.model)
    unembed = lm.adapter.unembed(lm.model)
    device = unembed.weight.device
    dtype = unembed.weight.dtype
    special = set(getattr(lm.tokenizer, "all_special_ids", []))
    out = []
    with torch.inference_mode():
        baseline = unembed(
            norm(torch.zeros(1, vectors.shape[1], device=device, dtype=dtype))
        ).float()
        for start in range(0, vectors.shape[0], 32):
            chunk = vectors[start : start + 32].to(device, dtype)
            logits = unembed(norm(chunk)).float() - baseline
            if special:
                logits[:, list(special)] = float("nan")
            for row in logits:
                clean = torch.nan_to_num(row, nan=0.0)
                top = (
                    torch.where(torch.isnan(row), torch.full_like(row, -torch.inf), clean)
                    .topk(k)
                    .indices
                )
                bottom = (
                    torch.where(torch.isnan(row), torch.full_like(row, torch.inf), clean)
                    .topk(k, largest=False)
                    .indices
                )
                out.append(
                    {
                        "top": [lm.tokenizer.decode([int(t)]) for t in top],
                        "bottom": [lm.tokenizer.decode([int(t)]) for t in bottom],
                    }
                )
    return out
