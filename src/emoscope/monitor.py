"""Per-token emotion readouts: on any text or transcript, and live while the model generates.

Readouts are computed inside the forward pass (one small matrix product per monitored layer), so
live monitoring needs no second pass and no per-token Python loop over emotions. During
generation each new token arrives with the readout of the state that chose it (the residual at
the preceding position), which is the paper's "planned emotion" reading; offline readouts of a
text give each token the residual at its own position.

Z-scores are relative to emotionally neutral text: ``(score - mean) / std`` of the same readout
over the neutral corpus, stored in the bank.

Attention sinks: most models park huge activations on one or a few tokens (usually the first of a
text) that carry no content. Their readouts are meaningless (z-scores of several hundred), so
every token whose residual norm at a monitored layer exceeds :data:`SINK_NORM_RATIO` times the
layer's average norm on neutral text is flagged as a sink and left out of means, z-scores,
alerts, top lists and display scaling. The neutral statistics are built the same way.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from emoscope.batching import Batch, encode, from_token_lists
from emoscope.chat import validate_turns
from emoscope.concepts import resolve_emotion, resolve_emotions
from emoscope.engine import Engine, Request, engine_for, row_sampling
from emoscope.errors import EmoscopeError, UnsupportedArchitectureError
from emoscope.files import append_jsonl
from emoscope.generation import SamplingConfig, decode_steps, eos_ids, split_rows
from emoscope.hooks import ResidualReader
from emoscope.steer import Steerer, Steering, steering_vectors
from emoscope.vectors import READOUT_MODES, SINK_NORM_RATIO, EmotionBank, centred_scores


@dataclass
class Readout:
    """Per-token scores for one text: ``scores[t, e]`` and, where defined, ``z[t, e]``.

    ``sinks[t]`` marks attention-sink tokens: their scores are kept as measured, but their
    z-scores are NaN and they are left out of :meth:`mean`, :meth:`top`, :meth:`display` and
    smoothing.
    """

    emotions: list[str]
    tokens: list[str]
    token_ids: list[int]
    scores: torch.Tensor
    z: torch.Tensor | None
    layers: list[int]
    mode: str
    roles: list[str] | None = None
    sinks: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.sinks is None:
            self.sinks = torch.zeros(len(self.tokens), dtype=torch.bool)
        if self.z is not None and bool(self.sinks.any()):
            self.z = self.z.masked_fill(self.sinks.unsqueeze(1), float("nan"))

    @property
    def kept(self) -> torch.Tensor:
        """``[tokens]`` True for the tokens that count (every token but the sinks)."""
        assert self.sinks is not None
        return ~self.sinks

    def smoothed(self, window: int) -> Readout:
        """Moving average over ``window`` tokens (causal: each token and the ones before it).

        Sinks neither enter a window nor get a value of their own.
        """
        if window < 1:
            raise EmoscopeError(f"The smoothing window must be >= 1 token (got {window}).")
        if window == 1:
            return self
        kernel = torch.ones(1, 1, window)
        weight = self.kept.float().unsqueeze(1)

        def smooth(x: torch.Tensor) -> torch.Tensor:
            def window_sum(values: torch.Tensor) -> torch.Tensor:
                padded = torch.nn.functional.pad(values.T.unsqueeze(1), (window - 1, 0))
                return torch.nn.functional.conv1d(padded, kernel).squeeze(1).T

            total = window_sum(torch.nan_to_num(x.float()) * weight)
            count = window_sum(weight.expand_as(x).contiguous())
            return torch.where(weight.bool(), total / count.clamp(min=1), x)

        return replace(
            self, scores=smooth(self.scores), z=smooth(self.z) if self.z is not None else None
        )

    def display(self) -> torch.Tensor:
        """The paper's display scaling: divide by the 99th percentile of |score| on this text."""
        kept = self.scores[self.kept]
        if kept.numel() == 0:
            return torch.zeros_like(self.scores)
        scale = torch.quantile(kept.abs().flatten().float(), 0.99).clamp(min=1e-9)
        shown = (self.scores / scale).clamp(-1, 1)
        return shown.masked_fill(self.sinks.unsqueeze(1), 0.0)  # type: ignore[union-attr]

    def top(self, k: int = 3, use_z: bool = True) -> list[list[tuple[str, float]]]:
        """The ``k`` strongest emotions of every token (an empty list for a sink)."""
        if k < 1:
            raise EmoscopeError(f"top needs k >= 1 (got {k}).")
        values = self.z if use_z and self.z is not None else self.scores
        best = torch.nan_to_num(values, nan=0.0).topk(min(k, values.shape[1]), dim=1)
        return [
            [] if sink else [(self.emotions[i], v) for v, i in zip(vals, idx)]
            for vals, idx, sink in zip(
                best.values.tolist(),
                best.indices.tolist(),
                self.sinks.tolist(),  # type: ignore[union-attr]
            )
        ]

    def mean(self, role: str | None = None, use_z: bool = True) -> torch.Tensor:
        """Mean over the tokens that count (of one role, if given); zeros when there are none."""
        values = self.z if use_z and self.z is not None else self.scores
        keep = self.kept
        if role is not None and self.roles is not None:
            keep = keep & torch.tensor([r == role for r in self.roles])
        return values[keep].mean(dim=0) if keep.any() else torch.zeros(values.shape[1])

    def strongest(self, k: int = 3, role: str | None = None) -> list[tuple[str, float]]:
        """The ``k`` emotions with the highest mean over the text (sinks left out)."""
        mean = self.mean(role)
        best = mean.topk(min(k, len(self.emotions)))
        return [(self.emotions[i], float(v)) for v, i in zip(best.values, best.indices)]

    def to_dict(self, decimals: int = 3) -> dict[str, Any]:
        """Plain JSON-ready data; sink tokens have ``null`` z-scores."""

        def rows(x: torch.Tensor) -> list[list[float | None]]:
            values = x.double().round(decimals=decimals)
            return [
                None if sink else row  # type: ignore[misc]
                for row, sink in zip(values.tolist(), self.sinks.tolist())  # type: ignore[union-attr]
            ]

        out: dict[str, Any] = {
            "emotions": self.emotions,
            "layers": self.layers,
            "mode": self.mode,
            "tokens": self.tokens,
            "sinks": self.sinks.tolist(),  # type: ignore[union-attr]
            "scores": self.scores.double().round(decimals=decimals).tolist(),
        }
        if self.z is not None:
            out["z"] = rows(self.z)
        if self.roles is not None:
            out["roles"] = self.roles
        return out


@dataclass(frozen=True)
class AlertRule:
    """Fire when an emotion's z-score stays beyond ``threshold`` for ``tokens`` tokens in a row.

    ``kind="gap"`` rules compare the internal readout with what the finished text expresses
    (see :mod:`emoscope.expression`) and fire once per response.
    """

    emotion: str
    threshold: float
    tokens: int = 1
    above: bool = True
    kind: str = "z"

    _PATTERN = re.compile(
        r"^\s*(?:(?P<kind>gap)\s*:\s*)?(?P<emotion>[a-z][a-z _-]*?)\s*(?P<op>[<>])\s*(?P<thr>[-+]?\d+(?:\.\d+)?)"
        r"\s*(?:sigma|sd|z)?\s*(?:(?:for|@)\s*(?P<n>\d+)\s*(?:tokens?)?)?\s*$",
        re.IGNORECASE,
    )

    @classmethod
    def parse(cls, text: str) -> AlertRule:
        """``"desperate > 2.5 sigma for 3 tokens"``, ``"calm<-2@5"`` or ``"gap:afraid>2"``."""
        match = cls._PATTERN.match(text)
        if not match:
            raise EmoscopeError(
                f"Cannot read alert rule {text!r}. Write e.g. 'desperate > 2.5 sigma for 3 tokens', "
                "'calm<-2@5' or 'gap:afraid>2'."
            )
        return cls(
            resolve_emotion(match["emotion"]),
            float(match["thr"]),
            int(match["n"] or 1),
            match["op"] == ">",
            "gap" if match["kind"] else "z",
        )

    def describe(self) -> str:
        op = ">" if self.above else "<"
        if self.kind == "gap":
            return f"gap:{self.emotion} {op} {self.threshold}"
        return f"{self.emotion} {op} {self.threshold} sigma for {self.tokens} token(s)"


@dataclass
class Alert:
    rule: str
    row: int
    step: int
    emotion: str
    value: float
    time: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "alert",
            "rule": self.rule,
            "row": self.row,
            "step": self.step,
            "emotion": self.emotion,
            "value": round(self.value, 4),
            "time": self.time,
        }


class AlertTracker:
    """Run-length counting of rule conditions for a whole batch at once (tensor ops per step)."""

    def __init__(
        self, rules: Sequence[AlertRule], emotions: Sequence[str], batch_size: int
    ) -> None:
        for r in rules:
            if r.emotion not in emotions:
                raise EmoscopeError(f"Alert rule on '{r.emotion}', which is not being monitored.")
        self.rules = [r for r in rules if r.kind == "z"]  # gap rules are judged per response
        self.index = torch.tensor(
            [list(emotions).index(r.emotion) for r in self.rules], dtype=torch.long
        )
        self.threshold = torch.tensor([r.threshold for r in self.rules])
        self.sign = torch.tensor([1.0 if r.above else -1.0 for r in self.rules])
        self.needed = torch.tensor([r.tokens for r in self.rules])
        self.run = torch.zeros(batch_size, len(self.rules), dtype=torch.long)

    def update(self, z: torch.Tensor, step: int, active: torch.Tensor) -> list[Alert]:
        if not self.rules:
            return []
        values = z[:, self.index].float().cpu()
        beyond = (values * self.sign > self.threshold * self.sign) & active.cpu().unsqueeze(1)
        sink = values.isnan()  # a sink token neither extends nor breaks a run
        self.run = torch.where(sink, self.run, (self.run + 1) * beyond)
        fired = self.run == self.needed
        if not bool(fired.any()):
            return []
        return [
            Alert(self.rules[j].describe(), i, step, self.rules[j].emotion, float(values[i, j]))
            for i, j in torch.nonzero(fired).tolist()
        ]


def gap_alerts(
    rules: Sequence[AlertRule], concealment: dict[str, Any], row: int, step: int
) -> list[Alert]:
    """The ``gap:`` rules that fire on one finished response (judged once per response).

    Emotions the expression measure cannot observe have no gap and never fire.
    """
    fired = []
    for rule in (r for r in rules if r.kind == "gap"):
        value = concealment["gap"].get(rule.emotion)
        if value is not None and (value > rule.threshold) == rule.above:
            fired.append(Alert(rule.describe(), row, step, rule.emotion, value))
    return fired


@dataclass
class MonitorStep:
    """One generation step for the whole batch."""

    index: int
    tokens: torch.Tensor
    """``[batch]`` new token ids."""
    active: torch.Tensor
    """``[batch]`` rows that produced a real token."""
    scores: torch.Tensor
    """``[batch, emotions]`` readout of the state that chose each token."""
    z: torch.Tensor | None
    alerts: list[Alert]


@dataclass
class MonitoredGeneration:
    """One monitored response: its tokens' readouts (NaN z-scores at sinks) and alerts."""

    prompt: str
    text: str
    token_ids: list[int]
    scores: torch.Tensor
    z: torch.Tensor | None
    alerts: list[Alert]
    concealment: dict[str, Any] | None = None


class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces without splitting characters."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.ids, self.text = tokenizer, [], ""

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        piece, self.text = text[len(self.text) :], text
        return piece


class Monitor:
    """Read the bank's emotions from a model, offline or live.

    Args:
        lm: the loaded model (must be the bank's model).
        bank: an :class:`EmotionBank`.
        emotions: subset to read (default: all in the bank).
        layers: one layer, a band (list), or ``None`` for the bank's default layer.
        mode: ``centred`` (default), ``projection`` or ``cosine``.

    Example:
        >>> monitor = Monitor(lm, bank, emotions=["calm", "desperate"])
        >>> readout = monitor.score("I have one hour left and nothing works.")
        >>> readout.top(1)[-1]
    """

    def __init__(
        self,
        lm: Any,
        bank: EmotionBank,
        *,
        emotions: Sequence[str] | None = None,
        layers: int | Sequence[int] | None = None,
        mode: str = "centred",
        allow_other_model: bool = False,
    ) -> None:
        bank.check_model(lm, allow_other_model)
        if mode not in READOUT_MODES:
            raise EmoscopeError(f"Unknown readout mode '{mode}' (use {', '.join(READOUT_MODES)}).")
        self.lm, self.mode = lm, mode
        band = (
            [layers]
            if isinstance(layers, int)
            else list(layers)
            if layers is not None
            else [bank.default_layer]
        )
        if not band:
            raise EmoscopeError("Give at least one layer to monitor (or None for the default).")
        self.layers = [bank.check_layer(layer) for layer in band]
        names = resolve_emotions(emotions) if emotions is not None else list(bank.emotions)
        self.full_bank = bank
        self.bank = bank.subset(names, self.layers)
        self.emotions = self.bank.emotions
        self._device = lm.device
        # read inside each block, so each layer's vectors live where that block runs
        where = {layer: lm.adapter.layer_device(lm.model, layer) for layer in self.layers}
        self._v = {
            layer: self.bank.vectors[layer].to(where[layer], torch.float32) for layer in self.layers
        }
        self._centre = {
            layer: self.bank.stat("mean", layer).to(where[layer], torch.float32)
            if mode == "centred"
            else None
            for layer in self.layers
        }
        self._sink_norm = self._sink_thresholds()
        self._z = self._z_stats() if mode != "cosine" else None

    def _sink_thresholds(self) -> dict[int, float]:
        """Residual norm above which a token is an attention sink, per layer (inf: no check)."""
        out = {}
        for layer in self.layers:
            try:
                out[layer] = SINK_NORM_RATIO * self.bank.residual_norm(layer)
            except EmoscopeError:
                out[layer] = float("inf")
        return out

    def _z_stats(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]] | None:
        stats = {}
        for layer in self.layers:
            try:
                mean = self.bank.stat("neutral_score_mean", layer)
                std = self.bank.stat("neutral_score_std", layer)
            except EmoscopeError:
                return None
            if self.mode == "projection":
                mean = centred_scores(
                    self.bank.stat("neutral_mean", layer), self.bank.vectors[layer]
                )
            stats[layer] = (mean.to(self.lm.device), std.to(self.lm.device).clamp(min=1e-6))
        return stats

    def _transform(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Inside the forward pass: ``[..., emotions + 1]``, the readouts and the residual norm."""
        norm = hidden.float().norm(dim=-1, keepdim=True)
        scores = centred_scores(hidden, self._v[layer], self._centre[layer])
        if self.mode == "cosine":
            scores = scores / norm.clamp(min=1e-12)
        return torch.cat([scores, norm], dim=-1)

    def _combine(
        self, reader: ResidualReader, select: Callable[[torch.Tensor], torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Average the band's per-layer readouts (and z-scores) on the input device.

        Returns scores, z-scores (NaN at sinks) and the sink flags.
        """
        per_layer = {layer: select(reader.last(layer)).to(self._device) for layer in self.layers}
        sinks = torch.stack(
            [per_layer[layer][..., -1] > self._sink_norm[layer] for layer in self.layers]
        ).any(dim=0)
        readouts = {layer: value[..., :-1] for layer, value in per_layer.items()}
        scores = torch.stack(list(readouts.values())).mean(dim=0)
        if self._z is None:
            return scores, None, sinks
        z = torch.stack(
            [(readouts[layer] - self._z[layer][0]) / self._z[layer][1] for layer in self.layers]
        ).mean(dim=0)
        return scores, z.masked_fill(sinks.unsqueeze(-1), float("nan")), sinks

    def reader(self) -> ResidualReader:
        return ResidualReader(
            self.lm.model, self.lm.adapter, self.layers, transform=self._transform
        )

    # ----- offline -------------------------------------------------------------------------

    def score(self, text: str | Sequence[dict[str, str]], style: str = "auto") -> Readout:
        """Per-token readout of a plain text, or of a transcript (list of ``{role, content}``)."""
        return self.score_many([text], style)[0]

    def score_tokens(self, token_ids: Sequence[int]) -> Readout:
        """Per-token readout of an already tokenised sequence (e.g. a prompt plus its reply)."""
        if not token_ids:
            raise EmoscopeError("Nothing to score: the token sequence is empty.")
        batch = from_token_lists(
            [list(token_ids)], self.lm.tokenizer.pad_token_id or 0, self.lm.device
        )
        with self.reader() as reader:
            return self._readout(reader, batch, None)

    def score_many(
        self, texts: Sequence[str | Sequence[dict[str, str]]], style: str = "auto"
    ) -> list[Readout]:
        """One readout per text, each run alone so that no padding enters its statistics."""
        prepared = [self._prepare(t, style) for t in texts]
        with self.reader() as reader:
            return [
                self._readout(
                    reader, encode(self.lm.tokenizer, [text], self.lm.device, special), roles
                )
                for text, special, roles in prepared
            ]

    def _readout(
        self,
        reader: ResidualReader,
        batch: Batch,
        roles: Callable[[list[int]], list[str]] | None,
    ) -> Readout:
        reader.clear()
        reader.run(**batch.inputs())
        scores, z, sinks = self._combine(reader, lambda x: x[0])
        ids = batch.input_ids[0].tolist()
        return Readout(
            self.emotions,
            [self.lm.tokenizer.decode([i]) for i in ids],
            ids,
            scores.cpu(),
            None if z is None else z.cpu(),
            self.layers,
            self.mode,
            roles(ids) if roles else None,
            sinks.cpu(),
        )

    def _prepare(
        self, item: str | Sequence[dict[str, str]], style: str
    ) -> tuple[str, bool, Callable[[list[int]], list[str]] | None]:
        if isinstance(item, str):
            if not item.strip():
                raise EmoscopeError("Nothing to score: the text is empty.")
            return item, True, None
        turns = validate_turns(list(item))
        chat = self.lm.chat(turns, add_generation_prompt=False, style=style)
        tokenizer = self.lm.tokenizer
        # Token roles: find each turn's content span in the text and label tokens inside it.
        spans = []
        cursor = 0
        for turn in turns:
            start = chat.text.find(turn["content"].strip(), cursor)
            if start >= 0:
                end = start + len(turn["content"].strip())
                spans.append((start, end, turn["role"]))
                cursor = end

        def roles(_ids: list[int]) -> list[str]:
            offsets = tokenizer(
                chat.text, add_special_tokens=chat.add_special_tokens, return_offsets_mapping=True
            )["offset_mapping"]
            out = []
            for a, b in offsets:
                role = "format"
                for s, e, r in spans:
                    if a >= s and b <= e and b > a:
                        role = r
                        break
                out.append(role)
            return out

        return chat.text, chat.add_special_tokens, roles

    # ----- live ----------------------------------------------------------------------------

    def stream(
        self,
        prompts: Sequence[str] | Batch,
        *,
        steering: Steering | None = None,
        sampling: SamplingConfig | None = None,
        alerts: Sequence[AlertRule | str] = (),
        on_alert: Callable[[Alert], None] | None = None,
        chat: bool = True,
    ) -> Iterator[MonitorStep]:
        """Generate for a batch of prompts, yielding every step with its readout and alerts.

        The model carries the monitoring (and steering) hooks until the generator finishes or
        is closed; if you may stop early, iterate inside ``contextlib.closing(...)``. Gap rules
        (``gap:...``) are judged on whole responses by :meth:`generate` and
        :meth:`concealment`, not per step.
        """
        sampling = sampling or SamplingConfig()
        rules = parse_rules(alerts)
        batch = prompts if isinstance(prompts, Batch) else self.encode(prompts, chat)
        if rules and self._z is None:
            raise EmoscopeError("Alert rules need z-scores, which the cosine mode does not define.")
        tracker = AlertTracker(rules, self.emotions, batch.size)
        prompt_rows = batch.rows()
        try:
            engine = engine_for(
                self.lm,
                prompt_rows,
                sampling.max_new_tokens,
                lockstep=True,
                bank=self.bank,
                monitor_layers=self.layers,
                mode=self.mode,
                allow_other_model=True,
            )
        except UnsupportedArchitectureError:
            steps = self._static_steps(batch, steering, sampling)
        else:
            steps = self._engine_steps(engine, prompt_rows, steering, sampling)
        for index, tokens, active, scores, z in steps:
            fired = tracker.update(z, index, active) if z is not None else []
            if on_alert:
                for alert in fired:
                    on_alert(alert)
            yield MonitorStep(index, tokens, active, scores, z, fired)

    def _engine_steps(
        self,
        engine: Engine,
        prompt_rows: list[list[int]],
        steering: Steering | None,
        sampling: SamplingConfig,
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Every prompt runs in one slot of an engine that admits them all at once, so the
        rows advance together and each engine step is one step of the batch."""
        vectors = steering_vectors(self.full_bank, steering) if steering is not None else None
        positions = steering.positions if steering is not None else "all"
        everything = list(range(len(self.emotions)))
        size, width = len(prompt_rows), len(self.emotions)
        pad = self.lm.tokenizer.pad_token_id or 0
        with engine:
            handles = [
                engine.submit(
                    Request(
                        ids,
                        row_sampling(sampling, row),
                        chat=False,
                        steering=vectors,
                        positions=positions,
                        emotions=everything,
                    )
                )
                for row, ids in enumerate(prompt_rows)
            ]
            row_of = {handle.id: row for row, handle in enumerate(handles)}
            index = 0
            while engine.running or engine.waiting:
                events = engine.step()
                if not events:
                    continue
                rows = torch.tensor([row_of[event.request_id] for event in events])
                tokens = torch.full((size,), pad, dtype=torch.long)
                tokens[rows] = torch.tensor([event.token_id for event in events])
                active = torch.zeros(size, dtype=torch.bool)
                active[rows] = True
                scores = torch.zeros(size, width)
                scores[rows] = torch.stack([event.scores for event in events])  # type: ignore[misc]
                z = None
                if self._z is not None:
                    z = torch.full((size, width), float("nan"))
                    z[rows] = torch.stack([event.z for event in events])  # type: ignore[misc]
                yield index, tokens, active, scores, z
                index += 1

    def _static_steps(
        self, batch: Batch, steering: Steering | None, sampling: SamplingConfig
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """The static decoding loop, for models the engine cannot drive."""
        eos = eos_ids(self.lm.model, self.lm.tokenizer)
        pad = self.lm.tokenizer.pad_token_id or 0
        steerer = Steerer(self.lm, self.full_bank, allow_other_model=True)
        with steerer.apply(steering, batch), self.reader() as reader:
            for step in decode_steps(self.lm.model, batch, sampling, eos, pad):
                scores, z, _sinks = self._combine(reader, lambda x: x[:, -1])
                reader.clear()
                yield step.index, step.tokens, step.active, scores, z

    def encode(self, prompts: Sequence[str], chat: bool = True) -> Batch:
        if isinstance(prompts, str):
            raise EmoscopeError("Pass a list of prompts, not a single string.")
        if not prompts:
            raise EmoscopeError("Give at least one prompt.")
        return self.lm.encode_prompts(prompts, chat)

    def generate(
        self,
        prompts: Sequence[str],
        *,
        steering: Steering | None = None,
        sampling: SamplingConfig | None = None,
        alerts: Sequence[AlertRule | str] = (),
        log: Path | str | None = None,
        chat: bool = True,
        expression: bool = False,
    ) -> list[MonitoredGeneration]:
        """Monitored generation collected per prompt; alerts and transcripts go to ``log`` (JSONL).

        ``expression=True`` (or any ``gap:`` alert rule) also compares each response's internal
        readout with what its text expresses (:meth:`concealment`); that needs the optional
        ``emoscope[expression]`` extra.
        """
        rules = parse_rules(alerts)
        judge = expression or any(r.kind == "gap" for r in rules)
        if judge:
            from emoscope.expression import require_lexicon

            require_lexicon()  # fail before generating, not after
        tokens: list[torch.Tensor] = []
        active: list[torch.Tensor] = []
        step_scores: list[torch.Tensor] = []
        step_z: list[torch.Tensor] = []
        fired: list[Alert] = []

        def record(alert: Alert) -> None:
            fired.append(alert)
            if log is not None:
                append_jsonl(Path(log), [alert.to_dict()])

        for step in self.stream(
            prompts, steering=steering, sampling=sampling, alerts=rules, on_alert=record, chat=chat
        ):
            tokens.append(step.tokens)
            active.append(step.active)
            step_scores.append(step.scores)
            if step.z is not None:
                step_z.append(step.z)
        rows = split_rows(tokens, active, len(prompts))
        keep = (
            torch.stack(active, dim=1).cpu()
            if active
            else torch.zeros(len(prompts), 0, dtype=torch.bool)
        )
        all_scores = torch.stack(step_scores, dim=1).cpu() if step_scores else None
        all_z = torch.stack(step_z, dim=1).cpu() if step_z else None
        out = []
        for i, prompt in enumerate(prompts):
            text = self.lm.tokenizer.decode(rows[i], skip_special_tokens=True)
            scores = (
                all_scores[i][keep[i]]
                if all_scores is not None
                else torch.zeros(0, len(self.emotions))
            )
            z = all_z[i][keep[i]] if all_z is not None else None
            gen = MonitoredGeneration(
                prompt, text, rows[i], scores, z, [a for a in fired if a.row == i]
            )
            if judge and z is not None and len(z):
                gen.concealment = self.concealment(z.nanmean(dim=0), text)
                for alert in gap_alerts(rules, gen.concealment, i, len(rows[i])):
                    gen.alerts.append(alert)
                    record(alert)
            out.append(gen)
            if log is not None:
                append_jsonl(
                    Path(log),
                    [
                        transcript_record(
                            turns=[{"role": "user", "content": prompt}],
                            response=text,
                            emotions=self.emotions,
                            z=z,
                            alerts=gen.alerts,
                            concealment=gen.concealment,
                            row=i,
                        )
                    ],
                )
        return out

    def concealment(self, internal_z: torch.Tensor, text: str) -> dict[str, Any]:
        """Internal readout vs what the text expresses, per emotion (see :mod:`emoscope.expression`).

        A gap is reported only for emotions the expression measure can observe in text; the
        others are listed under ``unobservable`` with ``None`` as their gap.
        """
        from emoscope.expression import concealment_report

        return concealment_report(self.emotions, internal_z.cpu(), text)


def parse_rules(alerts: Sequence[AlertRule | str]) -> list[AlertRule]:
    if isinstance(alerts, str):
        alerts = [alerts]
    return [r if isinstance(r, AlertRule) else AlertRule.parse(r) for r in alerts]


def transcript_record(
    *,
    turns: Sequence[dict[str, str]],
    response: str,
    emotions: Sequence[str],
    z: torch.Tensor | None,
    alerts: Sequence[Alert] = (),
    concealment: dict[str, Any] | None = None,
    row: int = 0,
) -> dict[str, Any]:
    """The one JSONL record of a monitored response, written by every monitored generation.

    ``turns`` is the conversation before the response; ``z`` the response tokens' z-scores
    (NaN at sinks, which are left out of the mean and the peak).
    """
    kept = z[~z.isnan().any(dim=1)] if z is not None else None
    has = kept is not None and len(kept) > 0
    return {
        "type": "transcript",
        "time": time.time(),
        "row": row,
        "turns": [*turns, {"role": "assistant", "content": response}],
        "response": response,
        "emotions": list(emotions),
        "mean_z": {e: round(float(v), 3) for e, v in zip(emotions, kept.mean(dim=0))}
        if has
        else None,
        "peak_z": {e: round(float(v), 3) for e, v in zip(emotions, kept.max(dim=0).values)}
        if has
        else None,
        "alerts": [a.to_dict() for a in alerts],
        "concealment": None
        if concealment is None
        else {k: concealment[k] for k in ("top_gaps", "unobservable") if k in concealment},
    }


def load_transcript(path: Path | str) -> list[dict[str, str]]:
    """A transcript file: a JSON list of ``{role, content}`` turns, or ``{"turns": [...]}``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise EmoscopeError(f"No such transcript file: {path}") from None
    except OSError as exc:
        raise EmoscopeError(f"Cannot read transcript {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise EmoscopeError(f"{path} is not valid JSON: {exc}") from None
    turns = data.get("turns") if isinstance(data, dict) else data
    return validate_turns(turns, source=str(path))
