"""Batched residual-stream statistics: per-text means at every layer, and neutral-text moments.

Nothing per-token is kept: each forward pass reduces its activations inside the hook (a masked
mean per text, or running sums for the neutral-text covariance), so memory stays at
``texts x layers x hidden``. Work is checkpointed batch by batch so an interrupted run resumes
where it stopped.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from emoscope.batching import Batch, encode, length_sorted_batches
from emoscope.errors import EmoscopeError
from emoscope.files import atomic_save_tensors
from emoscope.hooks import ResidualReader

DEFAULT_TOKEN_OFFSET = 50
DEFAULT_BATCH_TOKENS = 4096


@dataclass
class TextMeans:
    """Mean residual activation of each text at each layer."""

    means: torch.Tensor
    """``[texts, layers, hidden]`` float32."""
    layers: list[int]
    n_tokens: torch.Tensor
    """``[texts]`` number of token positions averaged."""
    short: torch.Tensor
    """``[texts]`` bool: too short for the offset, so its last half was used instead."""

    def at(self, layer: int) -> torch.Tensor:
        return self.means[:, self.layers.index(layer)]


def averaging_weights(
    batch: Batch, special_prefix: torch.Tensor, offset: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which positions of each row enter its mean: text tokens from ``offset`` on.

    ``offset`` counts text tokens (a BOS or template prefix of ``special_prefix[row]`` tokens is
    not counted). A row with no more than ``offset`` text tokens uses its last half instead.
    Returns the ``[batch, width]`` weights and the per-row ``short`` flags.
    """
    width = batch.width
    column = torch.arange(width, device=batch.input_ids.device).unsqueeze(0)
    first_text = batch.padding.unsqueeze(1) + special_prefix.unsqueeze(1)
    text_index = column - first_text
    n_text = batch.lengths - special_prefix
    short = n_text <= offset
    start = torch.where(short, n_text // 2, torch.full_like(n_text, offset)).unsqueeze(1)
    weights = ((text_index >= start) & (batch.attention_mask > 0)).float()
    return weights, short


def masked_mean(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``[batch, hidden]`` weighted mean over positions, in float32 whatever the model's dtype."""
    w = weights.to(hidden.device, torch.float32).unsqueeze(-1)
    return (hidden.float() * w).sum(dim=1) / w.sum(dim=1).clamp(min=1)


def _pending_batches(
    tokenizer: Any,
    texts: Sequence[str],
    add_special_tokens: bool,
    done: torch.Tensor,
    max_batch: int,
    max_batch_tokens: int,
) -> list[list[int]]:
    """Length-sorted batches of the texts not yet ``done`` (a resumed run skips the rest)."""
    encoded = tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]
    return [
        todo
        for b in length_sorted_batches([len(ids) for ids in encoded], max_batch, max_batch_tokens)
        if (todo := [i for i in b if not done[i]])
    ]


def _special_prefix_count(tokenizer: Any, add_special_tokens: bool) -> int:
    if not add_special_tokens:
        return 0
    with_special = tokenizer("x", add_special_tokens=True)["input_ids"]
    without = tokenizer("x", add_special_tokens=False)["input_ids"]
    for i in range(len(with_special)):
        if with_special[i:] == without or with_special[i : i + len(without)] == without:
            return i
    return 0


def _progress(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(
        total=total, desc=desc, unit="text", disable=not enabled, dynamic_ncols=True, leave=False
    )


def text_means(
    lm: Any,
    texts: Sequence[str],
    layers: Sequence[int] | None = None,
    token_offset: int = DEFAULT_TOKEN_OFFSET,
    add_special_tokens: bool = True,
    max_batch: int = 32,
    max_batch_tokens: int = DEFAULT_BATCH_TOKENS,
    checkpoint: Path | None = None,
    progress: bool = True,
    desc: str = "activations",
) -> TextMeans:
    """Mean residual activation of every text at every requested layer, from ``token_offset`` on.

    One forward pass per batch reads all layers at once; the LM head never runs. With
    ``checkpoint`` (a folder) each finished batch is written there and a re-run skips it.
    """
    layers = list(range(lm.n_layers)) if layers is None else lm.check_layers(layers)
    tokenizer = lm.tokenizer
    prefix = _special_prefix_count(tokenizer, add_special_tokens)
    n = len(texts)
    means = torch.zeros(n, len(layers), lm.hidden_size)
    n_tokens = torch.zeros(n, dtype=torch.long)
    short = torch.zeros(n, dtype=torch.bool)
    done = torch.zeros(n, dtype=torch.bool)
    if checkpoint is not None:
        checkpoint.mkdir(parents=True, exist_ok=True)
        for chunk in sorted(checkpoint.glob("chunk-*.safetensors")):
            data = load_file(str(chunk))
            index = data["index"]
            means[index], n_tokens[index], short[index] = (
                data["means"],
                data["n_tokens"],
                data["short"].bool(),
            )
            done[index] = True
    batches = _pending_batches(
        tokenizer, texts, add_special_tokens, done, max_batch, max_batch_tokens
    )
    weights_ref: dict[str, torch.Tensor] = {}
    bar = _progress(n, desc, progress)
    bar.update(int(done.sum()))
    with ResidualReader(
        lm.model,
        lm.adapter,
        layers,
        transform=lambda _layer, h: masked_mean(h, weights_ref["w"]),
        stop_after_last=True,
    ) as reader:
        for number, items in enumerate(batches):
            batch = encode(tokenizer, [texts[i] for i in items], lm.device, add_special_tokens)
            prefixes = torch.full((batch.size,), prefix, device=batch.input_ids.device)
            weights, row_short = averaging_weights(batch, prefixes, token_offset)
            weights_ref["w"] = weights
            reader.clear()
            reader.run(**batch.inputs())
            batch_means = torch.stack([reader.last(layer).cpu() for layer in layers], dim=1)
            index = torch.tensor(items)
            means[index] = batch_means
            n_tokens[index] = weights.sum(dim=1).long().cpu()
            short[index] = row_short.cpu()
            if checkpoint is not None:
                atomic_save_tensors(
                    {
                        "index": index,
                        "means": batch_means,
                        "n_tokens": n_tokens[index],
                        "short": short[index].to(torch.uint8),
                    },
                    checkpoint / f"chunk-{min(items):06d}-{number:05d}.safetensors",
                )
            bar.update(len(items))
    bar.close()
    return TextMeans(means, layers, n_tokens, short)


def save_text_means(result: TextMeans, path: Path, metadata: dict[str, str] | None = None) -> None:
    atomic_save_tensors(
        {
            "means": result.means,
            "layers": torch.tensor(result.layers),
            "n_tokens": result.n_tokens,
            "short": result.short.to(torch.uint8),
        },
        path,
        metadata,
    )


def load_text_means(path: Path) -> TextMeans:
    data = load_file(str(path))
    return TextMeans(data["means"], data["layers"].tolist(), data["n_tokens"], data["short"].bool())


@dataclass
class NeutralMoments:
    """First and second moments of neutral-text activations, per layer, over token positions.

    Enough to fit a per-token PCA, calibrate steering norms, and z-score any linear readout
    (its mean is ``v @ mean`` and its variance ``v @ cov @ v``) without storing tokens. The
    per-text means are kept too, for PCA over texts instead of tokens.
    """

    layers: list[int]
    count: int
    mean: torch.Tensor
    """``[layers, hidden]``"""
    cov: torch.Tensor
    """``[layers, hidden, hidden]`` float64"""
    mean_norm: torch.Tensor
    """``[layers]`` average L2 norm of the residual over the counted tokens."""
    text_means: torch.Tensor
    """``[texts, layers, hidden]``"""


def neutral_moments(
    lm: Any,
    texts: Sequence[str],
    layers: Sequence[int] | None = None,
    skip_first: int = 1,
    add_special_tokens: bool = False,
    max_batch: int = 16,
    max_batch_tokens: int = DEFAULT_BATCH_TOKENS,
    progress: bool = True,
    checkpoint: Path | None = None,
    checkpoint_every: int = 8,
) -> NeutralMoments:
    """Token-level moments of the residual over ``texts``.

    The first ``skip_first`` positions of each text are left out: in many models the first token
    carries an outsized "attention sink" activation (in SmolLM2 about 150x the typical norm)
    that would dominate every statistic. With ``checkpoint`` (a file), the running sums are saved
    every ``checkpoint_every`` batches and a re-run continues from them.

    Memory: ``layers x hidden x hidden`` float64 for the covariance; for very wide models
    extract a subset of layers.
    """
    layers = list(range(lm.n_layers)) if layers is None else lm.check_layers(layers)
    hidden = lm.hidden_size
    sums = torch.zeros(len(layers), hidden, dtype=torch.float64)
    outer = torch.zeros(len(layers), hidden, hidden, dtype=torch.float64)
    norm_sums = torch.zeros(len(layers), dtype=torch.float64)
    per_text = torch.zeros(len(texts), len(layers), hidden)
    reference: dict[int, torch.Tensor] = {}
    state: dict[str, Any] = {"count": 0}
    position = {layer: i for i, layer in enumerate(layers)}

    def transform(layer: int, h: torch.Tensor) -> torch.Tensor:
        keep = state["keep"].to(h.device)
        i = position[layer]
        rows = h[keep].float().cpu()  # [tokens, hidden]
        if i not in reference:  # shifting by a reference keeps float32 products accurate
            reference[i] = rows.mean(dim=0)
        shifted = rows - reference[i]
        sums[i] += shifted.sum(dim=0).double()
        outer[i] += (shifted.T @ shifted).double()
        norm_sums[i] += rows.norm(dim=1).double().sum()
        per_text[state["items"], i] = masked_mean(h, keep).cpu()
        return torch.empty(0)

    done = torch.zeros(len(texts), dtype=torch.bool)
    if checkpoint is not None and checkpoint.exists():
        saved = load_file(str(checkpoint))
        sums, outer, norm_sums = saved["sums"], saved["outer"], saved["norm_sums"]
        per_text, done = saved["per_text"], saved["done"].bool()
        state["count"] = int(saved["count"][0])
        reference.update({i: saved["reference"][i] for i in range(len(layers))})

    def save_state() -> None:
        if checkpoint is not None and reference:
            atomic_save_tensors(
                {"sums": sums, "outer": outer, "norm_sums": norm_sums, "per_text": per_text,
                 "done": done.to(torch.uint8), "count": torch.tensor([state["count"]]),
                 "reference": torch.stack([reference[i] for i in range(len(layers))])},
                checkpoint,
            )  # fmt: skip

    batches = _pending_batches(
        lm.tokenizer, texts, add_special_tokens, done, max_batch, max_batch_tokens
    )
    bar = _progress(len(texts), "neutral activations", progress)
    bar.update(int(done.sum()))
    with ResidualReader(
        lm.model, lm.adapter, layers, transform=transform, stop_after_last=True
    ) as reader:
        for number, items in enumerate(batches, start=1):
            batch = encode(lm.tokenizer, [texts[i] for i in items], lm.device, add_special_tokens)
            column = torch.arange(batch.width, device=batch.input_ids.device).unsqueeze(0)
            keep = (column >= batch.padding.unsqueeze(1) + skip_first) & (batch.attention_mask > 0)
            state["keep"], state["items"] = keep, torch.tensor(items)
            state["count"] += int(keep.sum())
            reader.clear()
            reader.run(**batch.inputs())
            done[items] = True
            if number % checkpoint_every == 0:
                save_state()
            bar.update(len(items))
    bar.close()
    count = state["count"]
    shifted_mean = sums / count
    cov = outer / count - shifted_mean.unsqueeze(2) * shifted_mean.unsqueeze(1)
    mean = torch.stack([reference[i].double() for i in range(len(layers))]) + shifted_mean
    return NeutralMoments(layers, count, mean.float(), cov, (norm_sums / count).float(), per_text)


def merge_moments(
    parts: Sequence[tuple[Sequence[int], NeutralMoments]], n_texts: int
) -> NeutralMoments:
    """The moments of the union of disjoint sets of texts, from each set's moments (exact up to
    rounding: counts add, means average by count, covariances add their between-set term).

    ``parts`` pairs each set's text indices (into the ``n_texts`` texts) with its moments.
    """
    if not parts:
        raise EmoscopeError("No neutral-text moments to merge.")
    layers = list(parts[0][1].layers)
    total = sum(m.count for _, m in parts)
    if total == 0:
        raise EmoscopeError("The neutral texts have no tokens to average.")
    mean = sum(m.count * m.mean.double() for _, m in parts) / total
    cov = torch.zeros_like(parts[0][1].cov, dtype=torch.float64)
    norm = torch.zeros(len(layers), dtype=torch.float64)
    per_text = torch.zeros(n_texts, *parts[0][1].text_means.shape[1:])
    for index, m in parts:
        if list(m.layers) != layers:
            raise EmoscopeError("Neutral-text moments from different layers cannot be merged.")
        shift = m.mean.double() - mean
        cov += m.count * (m.cov + shift.unsqueeze(2) * shift.unsqueeze(1))
        norm += m.count * m.mean_norm.double()
        per_text[torch.as_tensor(list(index), dtype=torch.long)] = m.text_means
    return NeutralMoments(
        layers, total, mean.float(), cov / total, (norm / total).float(), per_text
    )


def save_neutral_moments(m: NeutralMoments, path: Path) -> None:
    atomic_save_tensors(
        {
            "layers": torch.tensor(m.layers),
            "count": torch.tensor([m.count]),
            "mean": m.mean,
            "cov": m.cov,
            "mean_norm": m.mean_norm,
            "text_means": m.text_means,
        },
        path,
    )


def load_neutral_moments(path: Path) -> NeutralMoments:
    d = load_file(str(path))
    return NeutralMoments(
        d["layers"].tolist(),
        int(d["count"][0]),
        d["mean"],
        d["cov"],
        d["mean_norm"],
        d["text_means"],
    )


def positions_readout(
    lm: Any,
    texts: Sequence[str],
    positions: Sequence[int],
    layers: Sequence[int] | None = None,
    add_special_tokens: bool = False,
    max_batch: int = 16,
) -> torch.Tensor:
    """Residual at one token position per text (index into its unpadded encoding), all layers.

    Returns ``[texts, layers, hidden]``; used for readouts at the start of the assistant turn.
    """
    layers = list(range(lm.n_layers)) if layers is None else lm.check_layers(layers)
    out = torch.zeros(len(texts), len(layers), lm.hidden_size)
    state: dict[str, torch.Tensor] = {}

    def transform(_layer: int, h: torch.Tensor) -> torch.Tensor:
        return (
            h[torch.arange(h.shape[0], device=h.device), state["cols"].to(h.device)].float().cpu()
        )

    with ResidualReader(
        lm.model, lm.adapter, layers, transform=transform, stop_after_last=True
    ) as reader:
        for start in range(0, len(texts), max_batch):
            items = list(range(start, min(start + max_batch, len(texts))))
            batch = encode(lm.tokenizer, [texts[i] for i in items], lm.device, add_special_tokens)
            state["cols"] = batch.padding + torch.tensor(
                [positions[i] for i in items], device=batch.input_ids.device
            )
            reader.clear()
            reader.run(**batch.inputs())
            out[items] = torch.stack([reader.last(layer) for layer in layers], dim=1)
    return out


def clear_checkpoint(checkpoint: Path) -> None:
    """Remove a finished job's checkpoint, whether a folder of chunks or a single file."""
    if checkpoint.is_dir():
        shutil.rmtree(checkpoint, ignore_errors=True)
    else:
        checkpoint.unlink(missing_ok=True)
