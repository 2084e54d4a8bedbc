"""A small batched decoding loop that yields after every step.

emoscope decodes with its own loop rather than ``model.generate`` so that monitoring can stream
each token with its readout as it is produced, steering can tell prompt from response positions,
and all of it runs in one process with no threads. The loop is plain KV-cached decoding with left
padding; greedy decoding of a batch gives exactly the tokens of decoding each row alone.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from emoscope.batching import Batch, encode
from emoscope.errors import EmoscopeError


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens. ``temperature=0`` is greedy decoding."""

    max_new_tokens: int = 40
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise EmoscopeError(f"max_new_tokens must be >= 0 (got {self.max_new_tokens}).")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise EmoscopeError("temperature must be >= 0 and top_p in (0, 1].")


@dataclass
class Step:
    """One decoding step: the token chosen for every row, and which rows have finished."""

    index: int
    tokens: torch.Tensor
    """``[batch]`` ids; rows that had already finished get the pad id."""
    active: torch.Tensor
    """``[batch]`` bool, True for rows that produced a real token in this step."""


@dataclass
class Generation:
    tokens: list[list[int]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is None:
            continue
        ids.extend(value if isinstance(value, list | tuple) else [value])
    return sorted({int(i) for i in ids})


def _accepts_logits_to_keep(model: Any) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _pick(
    logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None
) -> torch.Tensor:
    if config.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / config.temperature, dim=-1)
    if config.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep = sorted_probs.cumsum(dim=-1) - sorted_probs < config.top_p
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def decode_steps(
    model: Any,
    batch: Batch,
    config: SamplingConfig,
    eos: Sequence[int] = (),
    pad_id: int = 0,
) -> Iterator[Step]:
    """Prefill ``batch`` and decode, yielding after each new token.

    Hooks registered on the model (readers, steering) see the prefill pass first and then one
    pass per step; the step's readout at the last position is the state that chose its token.
    """
    generator = None
    if config.seed is not None:
        generator = torch.Generator(device=batch.input_ids.device).manual_seed(config.seed)
    extra = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    eos_tensor = torch.tensor(list(eos), device=batch.input_ids.device, dtype=torch.long)
    can_stop = config.stop_at_eos and eos_tensor.numel() > 0
    finished = torch.zeros(batch.size, dtype=torch.bool, device=batch.input_ids.device)
    width = batch.attention_mask.shape[1]
    mask = torch.ones(
        batch.size,
        width + config.max_new_tokens,
        dtype=batch.attention_mask.dtype,
        device=batch.attention_mask.device,
    )
    mask[:, :width] = batch.attention_mask
    positions = batch.position_ids[:, -1:]
    with torch.inference_mode():
        out = model(**batch.inputs(), use_cache=True, **extra)
        for index in range(config.max_new_tokens):
            tokens = _pick(out.logits[:, -1, :], config, generator)
            active = ~finished
            tokens = tokens.masked_fill(finished, pad_id)
            if can_stop:
                finished = finished | (active & torch.isin(tokens, eos_tensor))
            yield Step(index, tokens, active)
            if index == config.max_new_tokens - 1 or (can_stop and bool(finished.all())):
                break
            positions = positions + 1
            out = model(
                input_ids=tokens.unsqueeze(1),
                attention_mask=mask[:, : width + index + 1],
                position_ids=positions,
                past_key_values=out.past_key_values,
                use_cache=True,
            )


def collect(steps: Iterator[Step], size: int) -> list[list[int]]:
    """Gather each row's generated ids (up to and including its EOS).

    Steps are kept as tensors and split into rows once at the end, so decoding does no Python
    work per token.
    """
    tokens, active = [], []
    for step in steps:
        tokens.append(step.tokens)
        active.append(step.active)
    return split_rows(tokens, active, size)


def split_rows(
    tokens: list[torch.Tensor], active: list[torch.Tensor], size: int
) -> list[list[int]]:
    """``[steps]`` of ``[batch]`` ids and activity flags -> each row's list of real ids."""
    if not tokens:
        return [[] for _ in range(size)]
    ids = torch.stack(tokens, dim=1).tolist()
    keep = torch.stack(active, dim=1).tolist()
    return [[t for t, k in zip(row_ids, row_keep) if k] for row_ids, row_keep in zip(ids, keep)]


def decode_rows(lm: Any, batch: Batch, config: SamplingConfig) -> list[list[int]]:
    """Each row's generated ids for an encoded batch (whatever hooks are active apply)."""
    steps = decode_steps(
        lm.model, batch, config, eos_ids(lm.model, lm.tokenizer), lm.tokenizer.pad_token_id or 0
    )
    return collect(steps, batch.size)


def generate(
    lm: Any,
    prompts: Sequence[str],
    config: SamplingConfig | None = None,
    add_special_tokens: bool = True,
) -> Generation:
    """Batched generation for raw prompt strings; returns ids and decoded texts per prompt."""
    batch = encode(lm.tokenizer, prompts, lm.device, add_special_tokens=add_special_tokens)
    rows = decode_rows(lm, batch, config or SamplingConfig())
    return Generation(rows, [lm.tokenizer.decode(r, skip_special_tokens=True) for r in rows])
