"""A small batched decoding loop that yields after every step.

emoscope decodes with its own loop rather than ``model.generate`` so that monitoring can stream
each token with its readout as it is produced, steering can tell prompt from response positions,
and all of it runs in one process with no threads. The loop is plain KV-cached decoding with left
padding; greedy decoding of a batch gives exactly the tokens of decoding each row alone.

Chat replies use :func:`chat_sampling`: the model's own generation config where it has one, else
:data:`CHAT_DEFAULTS`. Greedy decoding is what experiments want (deterministic, comparable across
steering strengths), but on small chat models it loops on one token within a few dozen steps.
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
    """How to pick tokens. ``temperature=0`` is greedy decoding.

    ``repetition_penalty`` follows the usual Hugging Face meaning: the logit of every token
    already in the row (prompt or reply) is divided by it when positive and multiplied by it when
    negative, so values above 1 make repeats less likely. 1 turns it off.
    """

    max_new_tokens: int = 40
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_at_eos: bool = True
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise EmoscopeError(f"max_new_tokens must be >= 0 (got {self.max_new_tokens}).")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise EmoscopeError("temperature must be >= 0 and top_p in (0, 1].")
        if not self.repetition_penalty > 0:
            raise EmoscopeError(
                f"repetition_penalty must be > 0 (got {self.repetition_penalty}); 1 turns it off."
            )


CHAT_DEFAULTS = {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.15}
"""Chat decoding for models whose generation config says nothing about it.

Chosen on the embedded SmolLM2-135M-Instruct and Gemma-3-270M with a few everyday prompts. With no
penalty, greedy and sampled replies alike fall into loops (one emoji or one sentence over and over,
a third of all tokens the same); a penalty of 1.15 ends them while replies stay fluent, whereas
1.4 makes sentences run on and drift because punctuation already used is penalised too.
Temperature 0.7 with a 0.9 nucleus keeps replies on topic while varying them.
"""

_HF_NEUTRAL = {"temperature": 1.0, "top_p": 1.0, "repetition_penalty": 1.0}
"""Values that leave decoding unchanged in a Hugging Face generation config (its defaults)."""


def model_sampling_preferences(model: Any) -> dict[str, float]:
    """The sampling values a model's own ``generation_config`` sets away from the neutral default.

    Temperature and top-p count only when the config asks for sampling (``do_sample=True``), as
    ``model.generate`` ignores them otherwise; the repetition penalty counts either way. A config
    that leaves everything at its default (most converted or GGUF models) says nothing, and
    :data:`CHAT_DEFAULTS` apply.
    """
    config = getattr(model, "generation_config", None)
    if config is None:
        return {}
    samples = getattr(config, "do_sample", False) is True
    found: dict[str, float] = {}
    for name, neutral in _HF_NEUTRAL.items():
        value = getattr(config, name, None)
        if isinstance(value, bool) or not isinstance(value, int | float) or value == neutral:
            continue
        applies = samples or name == "repetition_penalty"
        if applies and value > 0:
            found[name] = float(value)
    return found


def chat_sampling(
    lm: Any,
    *,
    max_new_tokens: int,
    temperature: float | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    greedy: bool = False,
) -> SamplingConfig:
    """Decoding for chat replies: each value given here, else the model's own, else emoscope's.

    ``greedy=True`` forces temperature 0 (deterministic replies); the repetition penalty still
    applies unless set to 1.
    """
    model = model_sampling_preferences(lm.model)
    given = {"temperature": temperature, "top_p": top_p, "repetition_penalty": repetition_penalty}
    chosen = {
        name: float(value if value is not None else model.get(name, CHAT_DEFAULTS[name]))
        for name, value in given.items()
    }
    if greedy:
        chosen["temperature"] = 0.0
    return SamplingConfig(
        max_new_tokens=max_new_tokens,
        temperature=chosen["temperature"],
        top_p=chosen["top_p"],
        seed=seed,
        repetition_penalty=chosen["repetition_penalty"],
    )


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


def seen_tokens(batch: Batch, vocab_size: int) -> torch.Tensor:
    """``[batch, vocab]`` bool: which ids occur among each row's real (unpadded) prompt tokens.

    Counted with ``scatter_add`` so that a pad id which is also a real token of the prompt (a
    common choice: pad = end-of-turn) is marked as seen where it really occurs. Ids the output
    layer cannot produce (a tokenizer larger than the vocabulary) land in a spare column.
    """
    device = batch.input_ids.device
    counts = torch.zeros(batch.size, vocab_size + 1, dtype=torch.int32, device=device)
    ids = batch.input_ids.clamp(max=vocab_size)
    counts.scatter_add_(1, ids, batch.attention_mask.to(torch.int32))
    return counts[:, :vocab_size] > 0


def penalise_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Apply the repetition penalty to ``[batch, vocab]`` logits at the ``seen`` ids."""
    if penalty == 1:
        return logits
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def pick_tokens(
    logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One id per row from ``[batch, vocab]`` logits (already penalised): argmax or nucleus."""
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
    With a repetition penalty, each row keeps a ``[batch, vocab]`` mask of the ids it has seen.
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
    penalise = config.repetition_penalty != 1
    with torch.inference_mode():
        out = model(**batch.inputs(), use_cache=True, **extra)
        seen = seen_tokens(batch, out.logits.shape[-1]) if penalise else None
        for index in range(config.max_new_tokens):
            logits = out.logits[:, -1, :].float()
            if seen is not None:
                logits = penalise_repeats(logits, seen, config.repetition_penalty)
            tokens = pick_tokens(logits, config, generator)
            active = ~finished
            tokens = tokens.masked_fill(finished, pad_id)
            if seen is not None:
                seen.scatter_(1, tokens.unsqueeze(1), True)
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
