"""The terminal chat of ``emoscope chat``: tokens coloured by their strongest emotion, a live bar.

Kept apart from :mod:`emoscope.monitor` because it is presentation only: everything it shows
comes from :meth:`emoscope.monitor.Monitor.stream`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from emoscope.generation import SamplingConfig
from emoscope.monitor import AlertRule, AlertTracker, IncrementalDecoder, Monitor
from emoscope.steer import Steering

COLOURS = [196, 33, 40, 214, 129, 45, 226, 201, 118, 208, 99, 51]
RESET = "\x1b[0m"


def colour(text: str, code: int, bold: bool = False) -> str:
    return f"\x1b[{'1;' if bold else ''}38;5;{code}m{text}{RESET}"


def bar(emotions: list[str], z: torch.Tensor, width: int = 10) -> str:
    parts = []
    for i, (e, v) in enumerate(zip(emotions, z.tolist())):
        filled = max(0, min(width, round(v / 4 * width)))
        parts.append(
            colour(
                f"{e[:9]:>9} {'#' * filled}{'.' * (width - filled)} {v:+.1f}",
                COLOURS[i % len(COLOURS)],
            )
        )
    return "  ".join(parts)


def run_chat(lm: Any, bank: Any, args: argparse.Namespace, steering: Steering | None) -> int:
    shown = [e.strip() for e in args.show.split(",") if e.strip()]
    monitor = Monitor(lm, bank, shown, None, "centred", allow_other_model=True)
    rules = [AlertRule.parse(a) for a in args.alert]
    AlertTracker(rules, monitor.emotions, 1)  # every rule must name a shown emotion
    gap_rules = [r for r in rules if r.kind == "gap"]
    tty = sys.stdout.isatty()
    live = tty and not args.no_live
    history: list[dict[str, str]] = []
    print(f"emoscope chat with {lm.name} (layer {monitor.layers[0]}); empty line or Ctrl-D quits.")
    if steering:
        print(f"steering: {dict(steering.emotions)} at layers {list(steering.layers or [])}")
    while True:
        try:
            user = input("\nyou> ").strip()
        except EOFError:
            print()
            return 0
        if not user:
            return 0
        history.append({"role": "user", "content": user})
        chat = lm.chat(history)
        from emoscope.batching import encode

        batch = encode(lm.tokenizer, [chat.text], lm.device, chat.add_special_tokens)
        decoder = IncrementalDecoder(lm.tokenizer)
        total = torch.zeros(len(monitor.emotions))
        n = 0
        sys.stdout.write("model> ")
        if live:
            sys.stdout.write("\n\n\x1b[2A\x1b[6C")
        sampling = SamplingConfig(args.max_new_tokens, args.temperature, 1.0, args.seed)
        for step in monitor.stream(batch, sampling, steering, rules):
            if not bool(step.active[0]):
                break
            z = step.z[0].cpu() if step.z is not None else step.scores[0].cpu()
            total += z
            n += 1
            piece = decoder.push(int(step.tokens[0]))
            strongest = int(z.argmax())
            text = (
                colour(piece, COLOURS[strongest % len(COLOURS)], bold=float(z[strongest]) > 2)
                if tty and float(z[strongest]) > 1
                else piece
            )
            sys.stdout.write(text)
            if live:
                sys.stdout.write("\x1b7\n\r\x1b[K" + bar(monitor.emotions, z) + "\x1b8")
            for alert in step.alerts:
                sys.stdout.write(f" [ALERT {alert.rule}: {alert.value:+.2f}] ")
            sys.stdout.flush()
        history.append({"role": "assistant", "content": decoder.text})
        mean = total / max(n, 1)
        for rule in gap_rules:
            gap = monitor.concealment(mean, decoder.text)["gap"][rule.emotion]
            if (gap > rule.threshold) == rule.above:
                sys.stdout.write(f"\n [ALERT {rule.describe()}: {gap:.2f}]")
        sys.stdout.write(("\x1b7\n\r\x1b[K\x1b8" if live else "") + "\n")
        print(
            "  mean: " + bar(monitor.emotions, mean)
            if tty
            else "  mean z: "
            + ", ".join(f"{e} {v:+.2f}" for e, v in zip(monitor.emotions, mean.tolist()))
        )
        if args.log:
            from emoscope.corpus.records import append_jsonl

            append_jsonl(
                args.log,
                [
                    {
                        "type": "transcript",
                        "turns": list(history),
                        "mean_z": dict(zip(monitor.emotions, mean.tolist())),
                    }
                ],
            )
