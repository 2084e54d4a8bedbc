"""Per-token emotion readouts: on any text or transcript, and live while the model generates.

Readouts are computed inside the forward pass (one small matrix product per monitored layer), so
live monitoring needs no second pass and no per-token Python loop over emotions. During
generation each new token arrives with the readout of the state that chose it (the residual at
the preceding position), which is the paper's "planned emotion" reading; offline readouts of a
text give each token the residual at its own position.

Z-scores are relative to emotionally neutral text: ``(score - mean) / std`` of the same readout
over the neutral corpus, stored in the bank.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from emoscope.batching import Batch, encode, from_token_lists
from emoscope.concepts import resolve_emotion, resolve_emotions
from emoscope.corpus.records import append_jsonl
from emoscope.errors import EmoscopeError
from emoscope.expression import Expression, concealment_gap, expressed
from emoscope.generation import SamplingConfig, decode_steps, eos_ids, split_rows
from emoscope.hooks import ResidualReader
from emoscope.steer import Steerer, Steering
from emoscope.vectors import READOUT_MODES, EmotionVectors


@dataclass
class Readout:
    """Per-token scores for one text: ``scores[t, e]`` and, where defined, ``z[t, e]``."""

    emotions: list[str]
    tokens: list[str]
    token_ids: list[int]
    scores: torch.Tensor
    z: torch.Tensor | None
    layers: list[int]
    mode: str
    roles: list[str] | None = None

    def smoothed(self, window: int) -> Readout:
        """Moving average over ``window`` tokens (causal: each token and the ones before it)."""
        if window <= 1:
            return self
        kernel = torch.ones(1, 1, window) / window

        def smooth(x: torch.Tensor) -> torch.Tensor:
            padded = torch.nn.functional.pad(x.T.unsqueeze(1), (window - 1, 0), mode="replicate")
            return torch.nn.functional.conv1d(padded, kernel).squeeze(1).T

        z = smooth(self.z) if self.z is not None else None
        return Readout(
            self.emotions,
            self.tokens,
            self.token_ids,
            smooth(self.scores),
            z,
            self.layers,
            self.mode,
            self.roles,
        )

    def display(self) -> torch.Tensor:
        """The paper's display scaling: divide by the 99th percentile of |score| on this text."""
        scale = torch.quantile(self.scores.abs().flatten().float(), 0.99).clamp(min=1e-9)
        return (self.scores / scale).clamp(-1, 1)

    def top(self, k: int = 3, use_z: bool = True) -> list[list[tuple[str, float]]]:
        values = self.z if use_z and self.z is not None else self.scores
        best = values.topk(min(k, values.shape[1]), dim=1)
        return [
            [(self.emotions[i], v) for v, i in zip(vals, idx)]
            for vals, idx in zip(best.values.tolist(), best.indices.tolist())
        ]

    def mean(self, role: str | None = None, use_z: bool = True) -> torch.Tensor:
        values = self.z if use_z and self.z is not None else self.scores
        if role is None or self.roles is None:
            return values.mean(dim=0)
        keep = torch.tensor([r == role for r in self.roles])
        return values[keep].mean(dim=0) if keep.any() else torch.zeros(values.shape[1])

    def to_dict(self, decimals: int = 3) -> dict[str, Any]:
        out: dict[str, Any] = {
            "emotions": self.emotions,
            "layers": self.layers,
            "mode": self.mode,
            "tokens": self.tokens,
            "scores": self.scores.double().round(decimals=decimals).tolist(),
        }
        if self.z is not None:
            out["z"] = self.z.double().round(decimals=decimals).tolist()
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
        self.run = (self.run + 1) * beyond
        fired = self.run == self.needed
        if not bool(fired.any()):
            return []
        return [
            Alert(self.rules[j].describe(), i, step, self.rules[j].emotion, float(values[i, j]))
            for i, j in torch.nonzero(fired).tolist()
        ]


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
        bank: an :class:`EmotionVectors` bank.
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
        bank: EmotionVectors,
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
        self.layers = [bank.check_layer(layer) for layer in band]
        names = resolve_emotions(emotions) if emotions is not None else list(bank.emotions)
        self.full_bank = bank
        self.bank = bank.subset(names, self.layers)
        self.emotions = self.bank.emotions
        self._device = device = lm.device
        self._v = {
            layer: self.bank.vectors[layer].to(device, torch.float32) for layer in self.layers
        }
        # (h - centre) @ v.T == h @ v.T - centre @ v.T: the offset is computed once, not per token.
        self._offset = {
            layer: (self.bank.stat("mean", layer).to(device, torch.float32) @ self._v[layer].T)
            if mode == "centred"
            else torch.zeros(len(self.emotions), device=device)
            for layer in self.layers
        }
        self._z = self._z_stats() if mode != "cosine" else None

    def _z_stats(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]] | None:
        stats = {}
        for layer in self.layers:
            try:
                mean = self.bank.stat("neutral_score_mean", layer)
                std = self.bank.stat("neutral_score_std", layer)
            except EmoscopeError:
                return None
            if self.mode == "projection":
                mean = self.bank.stat("neutral_mean", layer) @ self.bank.vectors[layer].T
            stats[layer] = (mean.to(self.lm.device), std.to(self.lm.device).clamp(min=1e-6))
        return stats

    def _transform(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        h = hidden.float()
        v, offset = self._v[layer], self._offset[layer]
        if v.device != h.device:  # a model spread over several devices
            v, offset = v.to(h.device), offset.to(h.device)
            self._v[layer], self._offset[layer] = v, offset
        scores = h @ v.T - offset
        if self.mode == "cosine":
            scores = scores / h.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        return scores

    def _combine(
        self, reader: ResidualReader, select: Callable[[torch.Tensor], torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Average the band's per-layer readouts (and z-scores) on the input device."""
        per_layer = {layer: select(reader.last(layer)).to(self._device) for layer in self.layers}
        scores = torch.stack(list(per_layer.values())).mean(dim=0)
        if self._z is None:
            return scores, None
        z = torch.stack(
            [(per_layer[layer] - self._z[layer][0]) / self._z[layer][1] for layer in self.layers]
        ).mean(dim=0)
        return scores, z

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
        scores, z = self._combine(reader, lambda x: x[0])
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
        )

    def _prepare(
        self, item: str | Sequence[dict[str, str]], style: str
    ) -> tuple[str, bool, Callable[[list[int]], list[str]] | None]:
        if isinstance(item, str):
            return item, True, None
        turns = list(item)
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
        sampling: SamplingConfig | None = None,
        steering: Steering | None = None,
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
        rules = [r if isinstance(r, AlertRule) else AlertRule.parse(r) for r in alerts]
        batch = prompts if isinstance(prompts, Batch) else self.encode(prompts, chat)
        if rules and self._z is None:
            raise EmoscopeError("Alert rules need z-scores, which the cosine mode does not define.")
        tracker = AlertTracker(rules, self.emotions, batch.size)
        eos = eos_ids(self.lm.model, self.lm.tokenizer)
        pad = self.lm.tokenizer.pad_token_id or 0
        steerer = Steerer(self.lm, self.full_bank, allow_other_model=True)
        with steerer.apply(steering, batch), self.reader() as reader:
            for step in decode_steps(self.lm.model, batch, sampling, eos, pad):
                scores, z = self._combine(reader, lambda x: x[:, -1])
                fired = tracker.update(z, step.index, step.active) if z is not None else []
                if on_alert:
                    for alert in fired:
                        on_alert(alert)
                reader.clear()
                yield MonitorStep(step.index, step.tokens, step.active, scores, z, fired)

    def encode(self, prompts: Sequence[str], chat: bool = True) -> Batch:
        return self.lm.encode_prompts(prompts, chat)

    def generate(
        self,
        prompts: Sequence[str],
        sampling: SamplingConfig | None = None,
        steering: Steering | None = None,
        alerts: Sequence[AlertRule | str] = (),
        log: Path | str | None = None,
        chat: bool = True,
    ) -> list[MonitoredGeneration]:
        """Monitored generation collected per prompt; alerts and transcripts go to ``log`` (JSONL)."""
        rules = [r if isinstance(r, AlertRule) else AlertRule.parse(r) for r in alerts]
        tokens: list[torch.Tensor] = []
        active: list[torch.Tensor] = []
        step_scores: list[torch.Tensor] = []
        step_z: list[torch.Tensor] = []
        fired: list[Alert] = []

        def record(alert: Alert) -> None:
            fired.append(alert)
            if log is not None:
                append_jsonl(Path(log), [alert.to_dict()])

        for step in self.stream(prompts, sampling, steering, rules, record, chat):
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
            if z is not None and len(z):
                gen.concealment = self.concealment(z.mean(dim=0), text)
                for rule in (r for r in rules if r.kind == "gap"):
                    value = gen.concealment["gap"][rule.emotion]
                    if (value > rule.threshold) == rule.above:
                        alert = Alert(rule.describe(), i, len(rows[i]), rule.emotion, value)
                        gen.alerts.append(alert)
                        record(alert)
            out.append(gen)
            if log is not None:
                append_jsonl(Path(log), [transcript_record(gen, i, self.emotions)])
        return out

    def concealment(self, internal_z: torch.Tensor, text: str) -> dict[str, Any]:
        """Internal readout vs what the text expresses, per emotion (see :mod:`emoscope.expression`)."""
        judged: Expression = expressed(text, self.emotions)
        gap = concealment_gap(internal_z.cpu(), judged)
        order = gap.argsort(descending=True)[:5].tolist()
        return {
            "gap": {e: float(g) for e, g in zip(self.emotions, gap)},
            "expressed": {e: float(v) for e, v in zip(self.emotions, judged.levels)},
            "internal_z": {e: float(v) for e, v in zip(self.emotions, internal_z)},
            "vader": judged.vader,
            "top_gaps": [(self.emotions[i], float(gap[i])) for i in order],
        }


def transcript_record(
    gen: MonitoredGeneration, row: int, emotions: Sequence[str]
) -> dict[str, Any]:
    peak = gen.z.max(dim=0).values if gen.z is not None and len(gen.z) else None
    return {
        "type": "transcript",
        "row": row,
        "prompt": gen.prompt,
        "response": gen.text,
        "alerts": [a.to_dict() for a in gen.alerts],
        "peak_z": None if peak is None else {e: round(float(v), 3) for e, v in zip(emotions, peak)},
        "top_concealment": None if gen.concealment is None else gen.concealment["top_gaps"],
        "time": time.time(),
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
    if not isinstance(turns, list) or not turns:
        raise EmoscopeError(f"{path}: expected a list of turns or an object with 'turns'.")
    for n, turn in enumerate(turns):
        if (
            not isinstance(turn, dict)
            or not isinstance(turn.get("content"), str)
            or turn.get("role") not in ("system", "user", "assistant")
        ):
            raise EmoscopeError(
                f"{path}: turn {n} must have role system/user/assistant and string content; got {turn!r}."
            )
    return turns
