"""Running experiment prompts through the model: forced-choice scoring and free generation.

Every row of a batch carries its own steering (emotion mix and the token spans it applies to), so
one forward pass scores many conditions at once. The same pass reads the probe emotions at the
readout layer: averaged over the prompt, at the last prompt token (the start of the assistant
turn) and averaged over any marked spans (an activity's tokens).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from emoscope.batching import from_token_lists, length_sorted_batches, padding_id
from emoscope.errors import EmoscopeError
from emoscope.generation import SamplingConfig
from emoscope.hooks import ResidualReader, add_to_residual, positions_mask
from emoscope.vectors import SINK_NORM_RATIO, EmotionBank, centred_scores

Span = tuple[int, int]
MAX_BATCH_TOKENS = 6144


@dataclass
class Item:
    """One prompt row: its text, where to steer, what to read, and the answer options."""

    key: str
    text: str
    add_special_tokens: bool
    steering: Mapping[str, float] = field(default_factory=dict)
    steer_spans: Sequence[Span] | None = None
    """Character spans whose tokens get the steering; ``None`` means every token."""
    read_spans: Sequence[Span] = ()
    """Character spans whose tokens' readouts are averaged and returned."""
    options: Sequence[str] = ()
    """Continuations whose next-token probabilities are compared (each must be one token)."""


@dataclass
class Scored:
    probabilities: list[float]
    """Probability of each option, renormalised over the options."""
    option_mass: float
    """How much of the model's next-token probability the options hold together."""
    prompt_mean: dict[str, float]
    assistant_start: dict[str, float]
    spans: list[dict[str, float]]


class Scorer:
    """Forced-choice scoring and readouts for a model and its bank.

    ``layers`` are the steering layers (the bank's steering layer when ``None``); readouts use the
    bank's default readout layer and are z-scored against neutral text.
    """

    def __init__(
        self,
        lm: Any,
        bank: EmotionBank,
        probes: Sequence[str],
        layers: Sequence[int] | None = None,
        progress: bool = True,
    ) -> None:
        self.lm, self.bank = lm, bank
        self.probes = list(probes)
        self.steer_layers = [bank.check_layer(x) for x in (layers or [bank.steer_layer])]
        self.read_layer = bank.default_layer
        rows = torch.tensor([bank.index(e) for e in self.probes], dtype=torch.long)
        device = lm.adapter.layer_device(lm.model, self.read_layer)
        self._vectors = bank.vectors[self.read_layer][rows].to(device, torch.float32)
        self._centre = bank.stat("mean", self.read_layer).to(device, torch.float32)
        self._z_mean = bank.stat("neutral_score_mean", self.read_layer)[rows].to(device)
        self._z_std = bank.stat("neutral_score_std", self.read_layer)[rows].to(device)
        self._z_std = self._z_std.clamp(min=1e-6)
        self._sink = SINK_NORM_RATIO * bank.residual_norm(self.read_layer)
        self.progress = progress

    def _read(self, _layer: int, hidden: torch.Tensor) -> torch.Tensor:
        z = (centred_scores(hidden, self._vectors, self._centre) - self._z_mean) / self._z_std
        norm = hidden.float().norm(dim=-1, keepdim=True)
        return torch.cat([z, norm], dim=-1)

    def _tokens(self, item: Item) -> tuple[list[int], list[Span]]:
        encoding = self.lm.tokenizer(
            item.text, add_special_tokens=item.add_special_tokens, return_offsets_mapping=True
        )
        return list(encoding["input_ids"]), [tuple(o) for o in encoding["offset_mapping"]]

    def option_ids(self, item: Item, ids: list[int]) -> list[int]:
        """The single token each option adds after the prompt (refused if it adds more)."""
        out = []
        for option in item.options:
            full = self.lm.tokenizer(
                item.text + option, add_special_tokens=item.add_special_tokens
            )["input_ids"]
            if len(full) != len(ids) + 1 or full[: len(ids)] != ids:
                raise EmoscopeError(
                    f"The answer option {option!r} is not one token after this prompt for "
                    f"{self.lm.name}; forced-choice scoring needs single-token options."
                )
            out.append(int(full[-1]))
        return out

    def steering_rows(self, items: Sequence[Item]) -> dict[int, torch.Tensor]:
        """``{layer: [rows, hidden]}``: each row's emotion mix in residual-norm units."""
        out = {}
        for layer in self.steer_layers:
            norm = self.bank.residual_norm(layer)
            rows = torch.zeros(len(items), self.bank.hidden_size)
            for r, item in enumerate(items):
                for emotion, strength in item.steering.items():
                    rows[r] += float(strength) * norm * self.bank.vector(emotion, layer)
            out[layer] = rows.to(self.lm.adapter.layer_device(self.lm.model, layer), self.lm.dtype)
        return out

    def score(self, items: Sequence[Item], desc: str = "scoring") -> list[Scored]:
        """Option probabilities and readouts for every item, batched by length."""
        encoded = [self._tokens(item) for item in items]
        option_ids = [self.option_ids(item, ids) for item, (ids, _) in zip(items, encoded)]
        results: list[Scored | None] = [None] * len(items)
        batches = length_sorted_batches(
            [len(ids) for ids, _ in encoded], max_batch=64, max_tokens=MAX_BATCH_TOKENS
        )
        bar = tqdm(total=len(items), desc=desc, disable=not self.progress, leave=False)
        for chosen in batches:
            batch_items = [items[i] for i in chosen]
            batch_rows = [encoded[i] for i in chosen]
            for i, scored in zip(
                chosen, self._score_batch(batch_items, batch_rows, option_ids, chosen)
            ):
                results[i] = scored
            bar.update(len(chosen))
        bar.close()
        return [r for r in results if r is not None]

    def _score_batch(
        self,
        items: Sequence[Item],
        rows: Sequence[tuple[list[int], list[Span]]],
        option_ids: Sequence[list[int]],
        indices: Sequence[int],
    ) -> list[Scored]:
        batch = from_token_lists([ids for ids, _ in rows], padding_id(self.lm.tokenizer), "cpu")
        width = batch.width
        steer_mask = torch.zeros(batch.size, width)
        span_masks: list[list[torch.Tensor]] = []
        for r, (item, (ids, offsets)) in enumerate(zip(items, rows)):
            pad = width - len(ids)
            steer_mask[r, pad:] = (
                1.0 if item.steer_spans is None else token_mask(offsets, item.steer_spans)
            )
            span_masks.append([token_mask(offsets, [span]) for span in item.read_spans])
        steering = self.steering_rows(items)
        steering = {k: v for k, v in steering.items() if bool(v.abs().sum() > 0)}
        device = self.lm.device
        inputs = {k: v.to(device) for k, v in batch.inputs().items()}
        with (
            add_to_residual(
                self.lm.model, self.lm.adapter, steering, positions_mask(steer_mask.to(device))
            ),
            ResidualReader(self.lm.model, self.lm.adapter, [self.read_layer], self._read) as reader,
            torch.inference_mode(),
        ):
            logits = last_logits(self.lm.model, inputs)
        readout = reader.last(self.read_layer).float().cpu()  # [rows, width, probes + 1]
        out = []
        for r, (ids, _) in enumerate(rows):
            pad = width - len(ids)
            values = readout[r, pad:]
            keep = values[:, -1] <= self._sink
            z = values[:, :-1]
            ids_r = option_ids[indices[r]]
            if ids_r:
                log_probs = torch.log_softmax(logits[r].float(), dim=-1)
                chosen = log_probs[torch.tensor(ids_r)]
                probabilities = torch.softmax(chosen, dim=-1).tolist()
                mass = float(chosen.exp().sum())
            else:
                probabilities, mass = [], 0.0
            out.append(
                Scored(
                    probabilities=probabilities,
                    option_mass=mass,
                    prompt_mean=self._named(z[keep].mean(dim=0) if bool(keep.any()) else None),
                    assistant_start=self._named(z[-1]),
                    spans=[self._named(masked_mean(z, m.bool() & keep)) for m in span_masks[r]],
                )
            )
        return out

    def token_readouts(
        self, text: str, add_special_tokens: bool
    ) -> tuple[torch.Tensor, list[Span]]:
        """Per-token z-scores ``[tokens, probes]`` of one unsteered text (NaN at attention sinks)
        and each token's character span."""
        ids, offsets = self._tokens(Item("", text, add_special_tokens))
        inputs = {"input_ids": torch.tensor([ids], device=self.lm.device)}
        with ResidualReader(
            self.lm.model, self.lm.adapter, [self.read_layer], self._read, stop_after_last=True
        ) as reader:
            reader.run(**inputs)
        values = reader.last(self.read_layer)[0].float().cpu()
        z = values[:, :-1].masked_fill((values[:, -1] > self._sink).unsqueeze(1), float("nan"))
        return z, offsets

    def _named(self, values: torch.Tensor | None) -> dict[str, float]:
        if values is None:
            return {e: float("nan") for e in self.probes}
        return {e: round(float(v), 4) for e, v in zip(self.probes, values.tolist())}

    def generate(
        self,
        items: Sequence[Item],
        sampling: SamplingConfig,
        seeds: Sequence[int],
        desc: str = "generating",
    ) -> list[tuple[str, dict[str, float]]]:
        """Free generation of each item under its own steering, on the shared engine; returns
        each reply and the probes' mean z over its generated tokens."""
        from dataclasses import replace

        from emoscope.engine import Request, engine_for
        from emoscope.steer import Steering

        encoded = [self._tokens(item) for item in items]
        prompts = [ids for ids, _ in encoded]
        requests = []
        for item, (ids, offsets), seed in zip(items, encoded, seeds):
            positions: str | tuple[int, int] = "all"
            if item.steer_spans is not None:
                inside = token_mask(offsets, item.steer_spans).nonzero().flatten().tolist()
                if not inside:
                    raise EmoscopeError(f"Nothing to steer in {item.key}: the span has no tokens.")
                positions = (int(inside[0]), int(inside[-1]) + 1)
            steering = (
                Steering(dict(item.steering), layers=self.steer_layers, positions=positions)
                if item.steering
                else None
            )
            requests.append(
                Request(
                    ids,
                    replace(sampling, seed=seed),
                    chat=False,
                    steering=steering,
                    emotions=self.probes,
                )
            )
        out: list[tuple[str, dict[str, float]]] = []
        bar = tqdm(total=len(items), desc=desc, disable=not self.progress, leave=False)
        with engine_for(
            self.lm, prompts, sampling.max_new_tokens, bank=self.bank, allow_other_model=True
        ) as engine:
            handles = [engine.submit(r) for r in requests]
            for handle in handles:
                handle.result()
                z = handle.z
                mean = torch.nanmean(z.float(), dim=0) if z is not None and len(z) else None
                out.append((handle.text, self._named(mean)))
                bar.update(1)
        bar.close()
        return out


def token_mask(offsets: Sequence[Span], spans: Sequence[Span]) -> torch.Tensor:
    """1 for every token whose characters overlap one of ``spans``."""
    mask = torch.zeros(len(offsets))
    for t, (start, end) in enumerate(offsets):
        if end > start and any(start < s_end and end > s_start for s_start, s_end in spans):
            mask[t] = 1.0
    return mask


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    if not bool(mask.any()):
        return None
    return values[mask].mean(dim=0)


def last_logits(model: Any, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Logits at the last position only (the LM head runs on one token per row where the model
    allows it)."""
    try:
        output = model(**inputs, use_cache=False, logits_to_keep=1)
    except TypeError:
        output = model(**inputs, use_cache=False)
    return output.logits[:, -1, :]


def find_span(text: str, part: str, start: int = 0) -> Span:
    """Character span of ``part`` in ``text`` at or after ``start`` (an error if absent)."""
    at = text.find(part, start)
    if at < 0:
        raise EmoscopeError(f"Cannot find {part[:40]!r} in the formatted prompt.")
    return (at, at + len(part))
