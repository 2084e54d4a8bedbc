"""The terminal chat of ``emoscope chat``: tokens tinted by their strongest emotion, a live bar.

Presentation only: everything it shows comes from :meth:`emoscope.monitor.Monitor.stream`. On a
terminal the reply is word-wrapped by this module and every finished line is printed above a
``rich`` live region that holds the line being written, the current token's emotion bars and the
latest alert; nothing is ever drawn into the transcript itself, so wrapping and narrow terminals
cannot leave pieces of the bar in the text. When the output is not a terminal (a pipe, a file, a
recording console) the reply streams as plain text and alerts follow it on their own lines.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from contextlib import closing, nullcontext
from pathlib import Path
from typing import Any

import torch
from rich.cells import cell_len
from rich.color import Color
from rich.columns import Columns
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.style import Style
from rich.text import Text

from emoscope.batching import encode
from emoscope.files import append_jsonl
from emoscope.generation import SamplingConfig
from emoscope.monitor import (
    Alert,
    AlertRule,
    AlertTracker,
    IncrementalDecoder,
    Monitor,
    gap_alerts,
    parse_rules,
    transcript_record,
)
from emoscope.readouts import UserReader
from emoscope.steer import Steering

COLOURS = [196, 33, 40, 214, 129, 45, 226, 201, 118, 208, 99, 51]
"""256-colour palette codes, one per shown emotion in order (the bars double as the legend)."""

TINT_Z = 1.0
"""A token is tinted with its strongest shown emotion above this z-score ..."""
BOLD_Z = 2.0
"""... and also set in bold above this one."""

BAR_SIDE = 4
"""Cells on each side of a bar's centre; each cell is one sigma, half blocks show half sigmas."""

USER_PROMPT = "you> "
MODEL_PROMPT = "model> "

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def emotion_style(index: int, bold: bool = False) -> Style:
    return Style(color=Color.from_ansi(COLOURS[index % len(COLOURS)]), bold=bold)


def bar_cell(name: str, value: float, index: int) -> Text:
    """``    happy ····│█▌·· +1.6``: a diverging bar, negative to the left of the centre."""
    if value != value:  # NaN: an attention-sink token has no reading
        return Text(f"{name[:9]:>9} {'·' * BAR_SIDE}│{'·' * BAR_SIDE}   n/a", emotion_style(index))
    halves = min(2 * BAR_SIDE, round(abs(value) * 2))
    filled = "█" * (halves // 2) + ("▌" if halves % 2 else "")
    if value >= 0:
        left, right = "·" * BAR_SIDE, filled + "·" * (BAR_SIDE - len(filled))
    else:
        mirrored = filled.replace("▌", "▐")[::-1]
        left, right = "·" * (BAR_SIDE - len(filled)) + mirrored, "·" * BAR_SIDE
    return Text(
        f"{name[:9]:>9} {left}│{right} {value:+5.1f}", emotion_style(index, abs(value) > BOLD_Z)
    )


def emotion_bars(emotions: Sequence[str], values: torch.Tensor) -> Columns:
    """One bar per emotion, flowed into as many columns as the console is wide."""
    return Columns(
        [bar_cell(e, float(v), i) for i, (e, v) in enumerate(zip(emotions, values.tolist()))],
        padding=(0, 2),
    )


def line_starts(text: str, width: int) -> list[int]:
    """Offsets in one paragraph where greedy word-wrapping at ``width`` cells starts a new line.

    Lines break before a word that does not fit; a word wider than the line is folded. Appending
    to the text can only move breaks after the start of its current last line, so every line but
    the last is final as soon as it appears.
    """
    starts: list[int] = []
    used = 0
    for match in re.finditer(r"\s*\S+\s*", text):
        word, start = match.group(), match.start()
        length = cell_len(word.rstrip())
        if used and used + length > width:
            starts.append(start)
            used = 0
        if length > width:
            for offset, char in enumerate(word.rstrip()):
                if used + cell_len(char) > width:
                    starts.append(start + offset)
                    used = 0
                used += cell_len(char)
            used += cell_len(word) - length
            continue
        used += cell_len(word)
    return starts


class WrappedReply:
    """A reply being written, split into final lines and the one line still growing."""

    def __init__(self, prefix: Text) -> None:
        self.pending = prefix.copy()

    def add(self, piece: str, style: Style | None = None) -> None:
        self.pending.append(_CONTROL.sub("", piece.replace("\t", "    ")), style)

    def finished_lines(self, width: int) -> list[Text]:
        """Take the lines that can no longer change; keep the last one pending."""
        done: list[Text] = []
        plain = self.pending.plain
        newline = plain.rfind("\n")
        if newline >= 0:
            for paragraph in self.pending[:newline].split("\n", allow_blank=True):
                done.extend(self._wrap(paragraph, width))
            self.pending = self.pending[newline + 1 :]
        starts = line_starts(self.pending.plain, width)
        if starts:
            pieces = self.pending.divide(starts)
            done.extend(_trimmed(line) for line in pieces[:-1])
            self.pending = pieces[-1]
        return done

    def rest(self, width: int) -> list[Text]:
        """Everything still pending, wrapped: the end of the reply."""
        return self._wrap(self.pending, width)

    @staticmethod
    def _wrap(paragraph: Text, width: int) -> list[Text]:
        starts = line_starts(paragraph.plain, width)
        return [_trimmed(line) for line in paragraph.divide(starts)] if starts else [paragraph]


def _trimmed(line: Text) -> Text:
    line = line.copy()
    line.rstrip()
    return line


def run_chat(
    lm: Any,
    bank: Any,
    *,
    show: Sequence[str] | str,
    alerts: Sequence[AlertRule | str],
    sampling: SamplingConfig,
    steering: Steering | None = None,
    log: Path | str | None = None,
    live: bool = True,
    console: Console | None = None,
    read_line: Callable[[str], str] = input,
    allow_other_model: bool = False,
    user_reader: UserReader | None = None,
) -> int:
    """Chat with ``lm`` in the terminal, reading ``show`` (emotion names) live from ``bank``.

    Each reply streams with its tokens tinted by their strongest shown emotion; on a terminal
    (``live`` and ``console.is_terminal``) a live region under the text shows the current token's
    z-scores and alerts. After each reply come its alerts, one per line, and the mean bar. With
    ``log``, every alert and one transcript record per turn are appended to that JSONL file.
    With ``user_reader``, each user message is first read with it (the bank's chat readout) and
    its strongest emotions are shown, and logged, before the reply.
    An empty line, Ctrl-D or Ctrl-C at the prompt ends the chat; Ctrl-C during a reply stops it.
    Returns the exit status (0).
    """
    console = console or Console(highlight=False)
    names = [e.strip() for e in show.split(",")] if isinstance(show, str) else list(show)
    monitor = Monitor(
        lm, bank, emotions=[e for e in names if e], allow_other_model=allow_other_model
    )
    rules = parse_rules(alerts)
    AlertTracker(rules, monitor.emotions, 1)  # every rule must name a shown emotion
    if any(r.kind == "gap" for r in rules):
        from emoscope.expression import require_lexicon

        require_lexicon()  # fail now, not after the first reply
    log_path = Path(log).expanduser().resolve() if log is not None else None
    session = ChatSession(monitor, rules, sampling, steering, console, live and console.is_terminal)
    session.banner(log_path)
    history: list[dict[str, str]] = []
    turns = 0
    while True:
        user = _read(console, read_line)
        if not user:
            break
        history.append({"role": "user", "content": user})
        reading = user_reader.read(user) if user_reader is not None else None
        if reading is not None:
            shown = " · ".join(f"{e} {v:+.1f}" for e, v in reading.strongest(3))
            console.print(
                Text(f"  your message reads ({reading.describe()}): {shown}", style="dim")
            )
        reply, z, fired, concealment = session.reply(history)
        if log_path is not None:
            record = transcript_record(
                turns=history,
                response=reply,
                emotions=monitor.emotions,
                z=z,
                alerts=fired,
                concealment=concealment,
            )
            if reading is not None:
                record["user_readout"] = {
                    "readout": reading.describe(),
                    "z": dict(zip(reading.emotions, [round(float(v), 4) for v in reading.z])),
                }
            append_jsonl(log_path, [*(a.to_dict() for a in fired), record])
            turns += 1
        history.append({"role": "assistant", "content": reply})
    if log_path is not None:
        console.print(Text(f"log: {log_path} ({turns} turn(s) written this session)"))
    return 0


def _read(console: Console, read_line: Callable[[str], str]) -> str:
    """The user's next line ('' to quit). Off a terminal the line is echoed into the output."""
    console.print()
    try:
        if console.is_terminal:
            return read_line(USER_PROMPT).strip()
        console.print(Text(USER_PROMPT), end="")
        line = read_line("").strip()
        console.print(Text(line))
        return line
    except (EOFError, KeyboardInterrupt):
        console.print()
        return ""


class ChatSession:
    """One chat's display: banner, streamed replies with their bars, alerts and means."""

    def __init__(
        self,
        monitor: Monitor,
        rules: list[AlertRule],
        sampling: SamplingConfig,
        steering: Steering | None,
        console: Console,
        live: bool,
    ) -> None:
        self.monitor, self.rules, self.sampling = monitor, rules, sampling
        self.steering, self.console, self.live = steering, console, live
        self.emotions = monitor.emotions
        self.recent_alerts: list[Alert] = []

    def banner(self, log_path: Path | None) -> None:
        lm, s = self.monitor.lm, self.sampling
        layers = ", ".join(map(str, self.monitor.layers))
        decoding = (
            "greedy" if s.temperature == 0 else f"temperature {s.temperature:g}, top-p {s.top_p:g}"
        )
        lines = [
            f"emoscope chat with {lm.name} (layer {layers}, replies up to {s.max_new_tokens} tokens)",
            f"decoding: {decoding}, repetition penalty {s.repetition_penalty:g}"
            + (f", seed {s.seed}" if s.seed is not None else ""),
        ]
        if self.steering is not None:
            layers = self.steering.layers
            where = (
                f"layer {self.monitor.full_bank.steer_layer} (the bank's steering layer)"
                if layers is None
                else f"layer(s) {layers}"
            )
            lines.append(f"steering: {dict(self.steering.emotions)} at {where}")
        if self.rules:
            lines.append("alerts: " + "; ".join(r.describe() for r in self.rules))
        if log_path is not None:
            lines.append(f"log: {log_path} (appending alerts and each turn's transcript)")
        lines.append("An empty line or Ctrl-D ends the chat; Ctrl-C stops a reply.")
        for line in lines:
            self.console.print(Text(line))

    def reply(
        self, history: list[dict[str, str]]
    ) -> tuple[str, torch.Tensor | None, list[Alert], dict[str, Any] | None]:
        """Generate, show and judge one reply; returns its text, z-scores, alerts, concealment."""
        lm = self.monitor.lm
        chat = lm.chat(history)
        batch = encode(lm.tokenizer, [chat.text], lm.device, chat.add_special_tokens)
        decoder = IncrementalDecoder(lm.tokenizer)
        readings: list[torch.Tensor] = []
        fired: list[Alert] = []
        self.recent_alerts = []
        text = WrappedReply(Text(MODEL_PROMPT, style="bold"))
        stream = self.monitor.stream(
            batch, steering=self.steering, sampling=self.sampling, alerts=self.rules
        )
        view = Live(console=self.console, transient=True, auto_refresh=False) if self.live else None
        stopped, has_z = False, True
        if view is None:
            self.console.print(text.pending, end="")
        try:
            with closing(stream), view or nullcontext():
                for step in stream:
                    if not bool(step.active[0]):
                        break
                    has_z = step.z is not None
                    values = (step.z if step.z is not None else step.scores)[0].float().cpu()
                    readings.append(values)
                    fired.extend(step.alerts)
                    self.recent_alerts.extend(step.alerts)
                    piece = decoder.push(int(step.tokens[0]))
                    style = self._tint(values)
                    if view is None:
                        self.console.print(
                            Text(_CONTROL.sub("", piece), style=style or ""), end="", soft_wrap=True
                        )
                        continue
                    text.add(piece, style)
                    for line in text.finished_lines(self.console.width):
                        view.console.print(line)
                    view.update(self._live_view(text.pending, values, len(readings)), refresh=True)
        except KeyboardInterrupt:
            stopped = True
        if view is None:
            self.console.print()
        else:
            for line in text.rest(self.console.width):
                self.console.print(line)
        if stopped:
            self.console.print(Text("[reply stopped]", style="dim"))
        z = torch.stack(readings) if readings and has_z else None
        mean = torch.stack(readings).nanmean(dim=0) if readings else None
        concealment = None
        if z is not None and mean is not None and any(r.kind == "gap" for r in self.rules):
            concealment = self.monitor.concealment(mean, decoder.text)
            fired.extend(gap_alerts(self.rules, concealment, 0, len(readings)))
        for line in alert_summary(fired):
            self.console.print(line)
        if mean is not None:
            counted = int((~torch.stack(readings).isnan().any(dim=1)).sum())
            unit = "z-scores" if z is not None else "raw scores (no neutral statistics)"
            self.console.print(Text(f"mean over {counted} token(s), {unit}:", style="bold"))
            self.console.print(emotion_bars(self.emotions, mean))
        return decoder.text, z, fired, concealment

    def _tint(self, values: torch.Tensor) -> Style | None:
        clean = torch.nan_to_num(values, nan=float("-inf"))
        strongest = int(clean.argmax())
        value = float(clean[strongest])
        if value <= TINT_Z:
            return None
        return emotion_style(strongest, bold=value > BOLD_Z)

    def _live_view(self, line: Text, values: torch.Tensor, count: int) -> RenderableType:
        parts: list[RenderableType] = [line, emotion_bars(self.emotions, values)]
        if self.recent_alerts:
            parts.append(_alert_line(self.recent_alerts[-1]))
        parts.append(Text(f"token {count}", style="dim"))
        return Group(*parts)


def _alert_line(alert: Alert) -> Text:
    where = "whole reply" if alert.rule.startswith("gap:") else f"token {alert.step + 1}"
    return Text(f"ALERT {alert.rule}: {alert.value:+.2f} ({where})", style="bold red")


def alert_summary(alerts: Sequence[Alert], listed: int = 5) -> list[Text]:
    """One line per rule that fired: the alert itself, or how often, where, and the peak."""
    by_rule: dict[str, list[Alert]] = {}
    for alert in alerts:
        by_rule.setdefault(alert.rule, []).append(alert)
    lines = []
    for rule, fired in by_rule.items():
        if len(fired) == 1:
            lines.append(_alert_line(fired[0]))
            continue
        steps = ", ".join(str(a.step + 1) for a in fired[:listed])
        more = ", ..." if len(fired) > listed else ""
        peak = max(fired, key=lambda a: abs(a.value))
        lines.append(
            Text(
                f"ALERT {rule}: {len(fired)} times (tokens {steps}{more}), "
                f"peak {peak.value:+.2f} (token {peak.step + 1})",
                style="bold red",
            )
        )
    return lines
