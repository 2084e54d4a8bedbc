"""Command line: thin commands over the public Python API.

Every argument is checked when it is parsed and every named file when it is named, and a bank is
read (cheap) before its model is loaded (slow): a mistake the user can fix is one ``error:`` line
with exit status 2, printed before any model is loaded. Ctrl-C stops cleanly (exit status 130)
and long jobs resume where they stopped when re-run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from emoscope.errors import EmoscopeError

Handler = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, Handler] = {}

DTYPES = ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16")
DEFAULT_SHOWN = ("happy", "sad", "afraid", "angry", "calm", "desperate")


def command(name: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        COMMANDS[name] = fn
        return fn

    return register


class Parser(argparse.ArgumentParser):
    """An argument parser whose mistakes read like every other CLI error: one ``error:`` line."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message.rstrip('.')} (see `{self.prog} --help`)\n")


# ----- argument types: each turns one command-line string into a checked value -----


def _argument_type(fn: Callable[[str], Any]) -> Callable[[str], Any]:
    """Let a checker raise :class:`EmoscopeError`; argparse reports it as the argument's error."""

    def check(text: str) -> Any:
        try:
            return fn(text)
        except EmoscopeError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    check.__name__ = fn.__name__
    return check


def _whole(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise EmoscopeError(f"{text!r} is not a whole number.") from None


def _real(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise EmoscopeError(f"{text!r} is not a number.") from None
    if not math.isfinite(value):
        raise EmoscopeError(f"{text!r} is not a finite number.")
    return value


def at_least(lowest: int) -> Callable[[str], int]:
    def whole_number(text: str) -> int:
        value = _whole(text)
        if value < lowest:
            raise EmoscopeError(f"expected a whole number >= {lowest}, got {value}.")
        return value

    return _argument_type(whole_number)


positive_int = at_least(1)
non_negative_int = at_least(0)


def real_in(
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> Callable[[str], float]:
    """A finite number in a range; ``low_open``/``high_open`` exclude that end."""
    left = "(" if low_open or low is None else "["
    right = ")" if high_open or high is None else "]"
    lower = "-inf" if low is None else f"{low:g}"
    upper = "inf" if high is None else f"{high:g}"
    shown = f"{left}{lower}, {upper}{right}"

    def number(text: str) -> float:
        value = _real(text)
        below = low is not None and (value <= low if low_open else value < low)
        above = high is not None and (value >= high if high_open else value > high)
        if below or above:
            raise EmoscopeError(f"expected a number in {shown}, got {value:g}.")
        return value

    return _argument_type(number)


finite_float = real_in()
probability = real_in(0.0, 1.0, low_open=True)
fraction = real_in(0.0, 1.0, high_open=True)
non_negative_float = real_in(0.0)
positive_float = real_in(0.0, low_open=True)


@_argument_type
def story_variance(text: str) -> float | str:
    return "auto" if text.strip() == "auto" else fraction(text)


@_argument_type
def layer_spec(text: str) -> list[int]:
    """``"18"``, ``"16-20"`` or ``"6,12,18"`` -> a sorted list of distinct layers."""
    layers: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        first, dash, last = (piece.strip() for piece in part.partition("-"))
        if not re.fullmatch(r"\d+", first) or (dash and not re.fullmatch(r"\d+", last)):
            raise EmoscopeError(
                f"cannot read layers {text!r}: write one layer (18), a range (16-20) or a list "
                "(6,12,18) of layer numbers >= 0."
            )
        start, end = int(first), int(last) if dash else int(first)
        if end < start:
            raise EmoscopeError(f"layer range {part!r} runs backwards; write {end}-{start}.")
        layers.update(range(start, end + 1))
    return sorted(layers)


@_argument_type
def emotion_name(text: str) -> str:
    from emoscope.concepts import resolve_emotion

    return resolve_emotion(text)


@_argument_type
def emotion_list(text: str) -> list[str]:
    from emoscope.concepts import resolve_emotions

    return resolve_emotions([t for t in text.split(",") if t.strip()])


@_argument_type
def emotion_strength(text: str) -> tuple[str, float | None]:
    """``"happy=0.3"``, or ``"happy"`` to take ``--strength``."""
    from emoscope.concepts import resolve_emotion

    name, equals, value = text.partition("=")
    return resolve_emotion(name), _real(value) if equals else None


@_argument_type
def alert_rule(text: str) -> Any:
    from emoscope.monitor import AlertRule

    return AlertRule.parse(text)


@_argument_type
def positions(text: str) -> str | tuple[int, int]:
    """``all``, ``prompt``, ``response`` or a token span ``START:END`` with 0 <= START < END."""
    text = text.strip()
    if text in ("all", "prompt", "response"):
        return text
    start, colon, end = text.partition(":")
    if not colon:
        raise EmoscopeError(f"expected all, prompt, response or START:END, got {text!r}.")
    span = _whole(start), _whole(end)
    if not 0 <= span[0] < span[1]:
        raise EmoscopeError(f"token span {text!r} must satisfy 0 <= START < END.")
    return span


@_argument_type
def non_empty_text(text: str) -> str:
    if not text.strip():
        raise EmoscopeError("the text is empty.")
    return text


@_argument_type
def memory_plan(text: str) -> dict[Any, str]:
    """``0=20GiB,1=20GiB,cpu=64GiB``: what each device may hold with ``--device auto``."""
    from emoscope.models import parse_max_memory

    return parse_max_memory(text)


@_argument_type
def dtype_name(text: str) -> str:
    name = text.strip().lower()
    if name not in DTYPES:
        raise EmoscopeError(f"unknown dtype {text!r}; use one of {', '.join(DTYPES)}.")
    return name


@_argument_type
def device_name(text: str) -> str:
    """A torch device that exists on this machine (or ``auto``), checked before any loading."""
    text = text.strip()
    if text == "auto":
        return text
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise EmoscopeError(
            f"unknown device {text!r}; use cpu, cuda, cuda:N, mps or auto."
        ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise EmoscopeError("CUDA is not available on this machine; use --device cpu.")
        if device.index is not None and device.index >= count:
            raise EmoscopeError(f"there is no {text} (this machine has {count} CUDA device(s)).")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise EmoscopeError("MPS is not available on this machine; use --device cpu.")
    return text


def _existing(text: str, folder: bool) -> Path:
    path = Path(text).expanduser()
    kind, other = ("folder", "file") if folder else ("file", "folder")
    if not path.exists():
        raise EmoscopeError(f"no such {kind}: {path}")
    if path.is_dir() != folder:
        raise EmoscopeError(f"{path} is a {other}, not a {kind}.")
    return path


@_argument_type
def existing_file(text: str) -> Path:
    return _existing(text, folder=False)


@_argument_type
def existing_folder(text: str) -> Path:
    return _existing(text, folder=True)


@_argument_type
def story_source(text: str) -> Path:
    """A story JSONL file, or a folder holding at least one."""
    path = Path(text).expanduser()
    if not path.exists():
        raise EmoscopeError(f"no such story file or folder: {path}")
    if path.is_dir() and not any(path.glob("*.jsonl")):
        raise EmoscopeError(f"{path} holds no *.jsonl story files.")
    return path


@_argument_type
def output_folder(text: str) -> Path:
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise EmoscopeError(f"{path} is a file; give a folder (new or existing).")
    return path


@_argument_type
def output_file(text: str) -> Path:
    path = Path(text).expanduser()
    if path.is_dir():
        raise EmoscopeError(f"{path} is a folder; give a file name.")
    return path


@_argument_type
def port_number(text: str) -> int:
    value = _whole(text)
    if not 0 <= value <= 65535:
        raise EmoscopeError(f"expected a port number in 0..65535 (0: any free port), got {value}.")
    return value


@_argument_type
def database_file(text: str) -> Path:
    """A database file to create or reuse: its folder must exist."""
    path = output_file(text)
    if not path.parent.is_dir():
        raise EmoscopeError(f"no such folder for the database: {path.parent}")
    return path


@_argument_type
def run_folder(text: str) -> Path:
    """A folder written by ``emoscope extract`` (it holds ``report.json``)."""
    from emoscope.files import read_json

    path = existing_folder(text)
    if not (path / "report.json").is_file():
        raise EmoscopeError(
            f"{path} is not a run folder (no report.json); run `emoscope extract --out {path}`."
        )
    if not isinstance(read_json(path / "report.json", "run report"), dict):
        raise EmoscopeError(f"{path / 'report.json'} is not a run report.")
    return path


@_argument_type
def transcript(text: str) -> list[dict[str, str]]:
    from emoscope.monitor import load_transcript

    return load_transcript(Path(text).expanduser())


# ----- checks that need the bank (read before any model is loaded) -----


def _bank(folder: Path, family: str | None = None) -> Any:
    """The bank in ``folder``, or one of its vector families (``--family``)."""
    from emoscope.vectors import EmotionBank

    try:
        return EmotionBank.load(folder).family(family)
    except (KeyError, IndexError, TypeError, ValueError) as exc:  # a malformed bank folder
        raise EmoscopeError(
            f"{folder} is not a readable bank ({type(exc).__name__}: {exc}); rebuild it with "
            "`emoscope extract`."
        ) from None


def _check_layers(bank: Any, layers: Sequence[int] | None) -> list[int] | None:
    """The layers, each confirmed to be in the bank (``None`` stays the caller's default)."""
    return None if layers is None else [bank.check_layer(layer) for layer in layers]


def _check_emotions(bank: Any, emotions: Iterable[str]) -> list[str]:
    """The emotions, each confirmed to be in the bank."""
    return [bank.emotions[bank.index(e)] for e in emotions]


def _model_for(args: argparse.Namespace, bank: Any) -> Any:
    from emoscope.models import load_model

    lm = load_model(
        args.model or bank.model_name,
        dtype=args.dtype,
        device=args.device,
        max_memory=getattr(args, "max_memory", None),
    )
    bank.check_model(lm, args.allow_other_model)
    return lm


def _steering_from(args: argparse.Namespace, bank: Any) -> Any:
    """The ``--emotion``/``--control-vector`` steering, fully checked against the bank."""
    from emoscope.steer import Steering

    layers = _check_layers(bank, args.layers)
    pairs: dict[str, float] = {}
    for name, strength in args.emotion or []:
        if strength is None:
            if args.strength is None:
                raise EmoscopeError(
                    f"Give a strength for '{name}': --strength S or --emotion {name}=S."
                )
            strength = args.strength
        pairs[name] = pairs.get(name, 0.0) + strength
    _check_emotions(bank, pairs)
    extra = {}
    if args.control_vector is not None:
        from emoscope.export import read_control_vector

        vectors = read_control_vector(args.control_vector, bank.hidden_size)
        extra = {layer: v * args.control_scale for layer, v in vectors.items()}
    if not pairs and not extra:
        return None
    return Steering(
        pairs,
        layers=layers,
        positions=args.positions,
        force=args.force,
        extra=extra,
    )


def _sampling_from(args: argparse.Namespace, lm: Any) -> Any:
    from emoscope.generation import chat_sampling

    return chat_sampling(
        lm,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        greedy=args.greedy,
    )


# ----- commands -----


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
    from emoscope.corpus.records import load_neutral, load_stories
    from emoscope.pipeline import ExtractConfig, extract
    from emoscope.vectors import Recipe

    # A corpus of the user's own is read here, so a bad line is reported before the model loads.
    for path, read, what in (
        (args.stories, load_stories, "stories"),
        (args.neutral, load_neutral, "neutral dialogues"),
    ):
        if path is None:
            continue
        try:
            if not read(path):
                raise EmoscopeError(f"{path} holds no {what}.")
        except UnicodeDecodeError:
            raise EmoscopeError(f"{path} is not UTF-8 text; corpus files are JSONL.") from None
    if args.dialogues is not None and not args.no_families:
        from emoscope.corpus.dialogues import load_deflection_dialogues, load_speaker_dialogues

        if not load_speaker_dialogues(args.dialogues) or not load_deflection_dialogues(
            args.dialogues
        ):
            raise EmoscopeError(
                f"{args.dialogues} needs speakers-*.jsonl and deflection-*.jsonl files with "
                "dialogues in them."
            )
    recipe = Recipe(
        token_offset=args.token_offset,
        neutral_variance=args.neutral_variance,
        neutral_pca=args.neutral_pca,
        story_variance=args.story_variance,
    )
    config = ExtractConfig(
        out=args.out,
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        layers=args.layers,
        recipe=recipe,
        stories=args.stories,
        neutral=args.neutral,
        dialogues=args.dialogues,
        families=not args.no_families,
        progress=not args.no_progress,
        max_memory=args.max_memory,
        ray=args.ray,
        workers=args.workers,
    )
    if args.ray:
        from emoscope.cluster import require_ray

        require_ray()  # before the model loads
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
    chat = result.report.get("families", {}).get("chat_readouts", {}).get("choice")
    if chat:
        rows.insert(
            -1,
            (
                "chat readout (test implicit)",
                f"{chat['family']} @ {chat['site']} L{chat['layer']}: {chat['test']:.1%}",
            ),
        )
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    print(f"\nbank: {result.out}/vectors.safetensors  report: {result.out}/report.html")
    return 0


@command("corpus-check")
def cmd_corpus_check(args: argparse.Namespace) -> int:
    from emoscope.corpus.quality import print_results, run_gates

    if args.neutral and len(args.paths) > 1:
        raise EmoscopeError("--neutral checks one dialogue file; name at most one path.")
    return print_results(run_gates(args.paths, neutral=args.neutral, emotions=args.emotions))


@command("corpus-card")
def cmd_corpus_card(args: argparse.Namespace) -> int:
    from emoscope.corpus.card import build_card, write_card

    if args.out is None:
        sys.stdout.write(build_card())
    else:
        print(f"wrote {write_card(args.out)}")
    return 0


@command("corpus-generate")
def cmd_corpus_generate(args: argparse.Namespace) -> int:
    from emoscope.corpus.generate import GenerationPlan, generate_corpus
    from emoscope.models import load_model

    plan = GenerationPlan(
        kind=args.kind,
        emotions=args.emotions,
        n_topics=args.topics,
        per_call=args.per_call,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
    )
    progress = not args.no_progress
    if args.backend == "vllm":
        from emoscope.corpus.backends import VllmBackend

        if args.ray:
            raise EmoscopeError(
                "vLLM spreads a model over GPUs itself (--tensor-parallel-size); --ray goes with "
                "--backend engine."
            )
        vllm = VllmBackend(args.model, args.dtype, args.tensor_parallel_size)
        summary = generate_corpus(vllm.text_model, args.out, plan, progress, backend=vllm)
    elif args.ray:
        from emoscope.cluster import ModelSpec, RayPool, require_ray
        from emoscope.corpus.backends import RayBackend

        require_ray()
        lm = load_model(
            args.model, dtype=args.dtype, device=args.device, max_memory=args.max_memory
        )
        with RayPool(ModelSpec.of(lm), args.ray, args.workers) as pool:
            summary = generate_corpus(lm, args.out, plan, progress, backend=RayBackend(pool))
    else:
        lm = load_model(
            args.model, dtype=args.dtype, device=args.device, max_memory=args.max_memory
        )
        summary = generate_corpus(lm, args.out, plan, progress)
    if args.json:
        emit_json(summary)
    else:
        print("\n".join(f"{k}: {v}" for k, v in summary.items()))
    return 0


@command("score")
def cmd_score(args: argparse.Namespace) -> int:
    from emoscope.monitor import Monitor

    turns = args.file
    if args.concealment:
        if turns is None:
            raise EmoscopeError("--concealment compares assistant turns: use it with --file.")
        if not any(t["role"] == "assistant" for t in turns):
            raise EmoscopeError(
                "--concealment needs a transcript with at least one assistant turn."
            )
        from emoscope.expression import require_lexicon

        require_lexicon()  # the optional extra, checked before the model loads
    bank = _bank(args.bank, args.family)
    layers = _check_layers(bank, args.layers)
    emotions = None if args.emotions is None else _check_emotions(bank, args.emotions)
    lm = _model_for(args, bank)
    monitor = Monitor(
        lm,
        bank,
        emotions=emotions,
        layers=layers,
        mode=args.mode,
        allow_other_model=args.allow_other_model,
    )
    readout = monitor.score(args.text if turns is None else turns).smoothed(args.smooth)
    result = readout.to_dict()
    if args.concealment:
        replies = " ".join(t["content"] for t in turns if t["role"] == "assistant")
        result["concealment"] = monitor.concealment(readout.mean("assistant"), replies)
    if args.json:
        emit_json(_nan_to_null(result))
        return 0
    top = readout.top(min(args.top, len(monitor.emotions)))
    for i, token in enumerate(readout.tokens):
        shown = "  ".join(f"{e} {v:+.2f}" for e, v in top[i]) or "(attention sink: left out)"
        role = f"[{readout.roles[i][:4]}] " if readout.roles else ""
        print(f"{role}{token!r:>16}  {shown}")
    if args.concealment:
        gaps = ", ".join(
            f"{e} {g:.2f}" for e, g in result["concealment"]["top_gaps"] if g is not None
        )
        print(f"\nconcealment gap (internal z high, text shows little): {gaps or 'none'}")
    return 0


@command("steer")
def cmd_steer(args: argparse.Namespace) -> int:
    from emoscope.steer import Steerer

    bank = _bank(args.bank, args.family)
    steering = _steering_from(args, bank)
    lm = _model_for(args, bank)
    steerer = Steerer(lm, bank, allow_other_model=args.allow_other_model)
    texts = steerer.generate(
        args.prompt, steering=steering, sampling=_sampling_from(args, lm), chat=not args.raw
    )
    if args.json:
        emit_json({"prompts": list(args.prompt), "texts": list(texts)})
    else:
        print("\n\n".join(texts))
    return 0


@command("chat")
def cmd_chat(args: argparse.Namespace) -> int:
    from emoscope.chat_ui import run_chat

    full = _bank(args.bank)
    bank = full.family(args.family)
    steering = _steering_from(args, bank)
    if args.show is None:
        show = [e for e in DEFAULT_SHOWN if e in bank.emotions] or list(bank.emotions[:6])
    else:
        show = _check_emotions(bank, args.show)
    for rule in args.alert:
        _check_emotions(bank, [rule.emotion])
        if rule.emotion not in show:
            show.append(rule.emotion)  # an alert watches a shown emotion
    if any(rule.kind == "gap" for rule in args.alert):
        from emoscope.expression import require_lexicon

        require_lexicon()  # the optional extra, checked before the model loads
    lm = _model_for(args, bank)
    from emoscope.readouts import UserReader

    reader = (
        None
        if args.no_user_readout
        else UserReader.for_bank(lm, full, allow_other_model=args.allow_other_model)
    )
    return run_chat(
        lm,
        bank,
        show=show,
        alerts=list(args.alert),
        sampling=_sampling_from(args, lm),
        steering=steering,
        log=args.log,
        live=not args.no_live,
        allow_other_model=args.allow_other_model,
        user_reader=reader,
    )


@command("validate-steering")
def cmd_validate_steering(args: argparse.Namespace) -> int:
    bank = _bank(args.bank, args.family)
    layers = _check_layers(bank, args.layers)
    out = args.out if args.out is not None else args.bank / "steering"
    from emoscope.analysis.steering_checks import validate_steering
    from emoscope.report.steering import write_steering_report
    from emoscope.steer import Steerer

    lm = _model_for(args, bank)
    result = validate_steering(
        Steerer(lm, bank, allow_other_model=args.allow_other_model),
        layers=layers,
        feeling_strength=args.feeling_strength,
        max_strength=args.max_strength,
        n_strengths=args.strengths,
        max_new_tokens=args.max_new_tokens,
        progress=not args.no_progress,
    )
    write_steering_report(result, out)
    summary = _nan_to_null(result["summary"])
    if args.json:
        emit_json(summary)
        return 0
    print(
        f"He feels: own word rises for {summary['he_feels_own_word_rises']}/12; "
        f"diagonal - off-diagonal {summary['he_feels_diagonal_minus_off']:+.2f} nats"
    )
    print(f"I feel:   own word rises for {summary['i_feel_own_word_rises']}/12")
    for e, rho in summary["dose_rho"].items():
        shown = "undefined (too few coherent strengths)" if rho is None else f"{rho:+.2f}"
        print(f"dose-response {e:>6}: Spearman rho {shown} (coherent strengths)")
    speakers = summary.get("speakers")
    if speakers:
        base = speakers["reassurance_baseline"]
        for key, value in speakers["reassurance"].items():
            words = speakers["own_words"][key]
            unsteered = speakers["own_words_baseline"][key.split(":")[1]]
            print(
                f"greeting steered {key:>24}: reassurance {value:.0%} (unsteered {base:.0%}), "
                f"own words {words:.0%} (unsteered {unsteered:.0%})"
            )
        for key, value in (speakers.get("denial") or {}).items():
            print(
                f"check-in steered {key:>24}: denial {value:.0%} "
                f"(unsteered {speakers['denial_baseline']:.0%})"
            )
    print(f"report: {out}/steering.json, {out}/steering.html")
    return 0


@command("export")
def cmd_export(args: argparse.Namespace) -> int:
    from emoscope.export import export_bank, export_emotions

    bank = _bank(args.bank, args.family)
    layers = _check_layers(bank, args.layers)
    if args.all:
        if args.out.exists() and not args.out.is_dir():
            raise EmoscopeError(
                f"{args.out} is a file; --all writes one file per emotion into a folder."
            )
        paths = export_bank(bank, args.out, args.strength, layers)
        print(f"wrote {len(paths)} files to {args.out}")
        return 0
    pairs: dict[str, float] = {}
    for name, strength in args.emotion:
        pairs[name] = pairs.get(name, 0.0) + (args.strength if strength is None else strength)
    _check_emotions(bank, pairs)
    print(export_emotions(bank, args.out, pairs, layers))
    return 0


@command("compare")
def cmd_compare(args: argparse.Namespace) -> int:
    from emoscope.files import atomic_write_text
    from emoscope.report.compare import compare

    try:
        table = compare(args.runs)
    except (KeyError, TypeError) as exc:  # a report.json without the fields the table reads
        raise EmoscopeError(
            f"A run's report.json lacks {exc}; re-run `emoscope extract` on it with this version."
        ) from None
    if args.out:
        atomic_write_text(args.out, table)
    print(table)
    return 0


@command("info")
def cmd_info(args: argparse.Namespace) -> int:
    bank = _bank(args.bank)
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
        emit_json(_nan_to_null({k: v for k, v in m.items() if k != "emotions"}))
    else:
        for k in keys:
            print(f"{k:18s} {m.get(k)}")
        print(f"{'layers':18s} {bank.layers[0]}..{bank.layers[-1]} ({len(bank.layers)})")
        print(f"{'emotions':18s} {len(bank.emotions)}")
        for name, family in (m.get("families") or {}).items():
            detail = (
                f"{len(family['emotions'])} emotions, default layer {family.get('default_layer')}"
            )
            print(f"{'family ' + name:18s} {detail}: {family.get('description', '')}")
        chat = m.get("chat_readout")
        if chat:
            print(
                f"{'chat readout':18s} {chat['family']} vectors, {chat['site']}, layer {chat['layer']}"
            )
    return 0


def bank_clusters(bank: Any, folder: Path) -> dict[str, int]:
    """Each emotion's k-means cluster in a bank, numbered 1.. by falling mean human valence.

    Read from the run's ``report.json`` (the clusters its report shows) where there is one,
    else computed on the bank's default-layer vectors in the same way.
    """
    report = folder / "report.json"
    if report.is_file():
        from emoscope.files import read_json

        clusters = read_json(report, "run report").get("geometry", {}).get("clusters")
        if clusters:
            return {e: n for n, members in enumerate(clusters, start=1) for e in members}
    from emoscope.analysis.geometry import valence_ordered_clusters

    return valence_ordered_clusters(bank.vectors[bank.default_layer], bank.emotions)


@command("emotions")
def cmd_emotions(args: argparse.Namespace) -> int:
    from emoscope.concepts import emotion_table

    clusters = None if args.bank is None else bank_clusters(_bank(args.bank), args.bank)
    rows = emotion_table(clusters)
    if args.json:
        emit_json(rows)
        return 0

    def shown(value: object, fmt: str = "") -> str:
        return f"{'-' if value is None else format(value, fmt):>7}"

    print(f"{'emotion':16s} {'valence':>7s} {'arousal':>7s}" + ("  cluster" if args.bank else ""))
    for row in rows:
        line = f"{row['name']:16s} {shown(row['valence'], '.2f')} {shown(row['arousal'], '.2f')}"
        print(line + (f"  {shown(row['cluster'])}" if args.bank else ""))
    return 0


@command("serve")
def cmd_serve(args: argparse.Namespace) -> int:
    from emoscope.server import ServerLimits, require_server_packages
    from emoscope.server.security import API_KEY_ENV, check_exposure

    require_server_packages()
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    check_exposure(args.host, api_key)
    limits = ServerLimits(
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        context_tokens=args.context,
        max_new_tokens=args.max_new_tokens,
        default_new_tokens=min(256, args.max_new_tokens),
        max_strength=args.max_strength,
    )
    bank = _bank(args.bank, args.family)
    clusters = bank_clusters(bank, args.bank) if args.family in (None, "story") else None
    lm = _model_for(args, bank)
    from emoscope.server import serve

    serve(
        lm,
        bank,
        args.db,
        host=args.host,
        port=args.port,
        api_key=api_key,
        cors_origins=args.cors_origin,
        limits=limits,
        clusters=clusters,
        allow_other_model=args.allow_other_model,
        log_level=args.log_level,
    )
    return 0


@command("log-export")
def cmd_log_export(args: argparse.Namespace) -> int:
    from emoscope.server.db import export_jsonl

    if args.out is None:
        export_jsonl(args.db, sys.stdout)
        return 0
    from emoscope.files import atomic_open

    with atomic_open(args.out) as out:
        count = export_jsonl(args.db, out)
    print(f"wrote {count} conversations to {args.out}", file=sys.stderr)
    return 0


@_argument_type
def strength_list(text: str) -> list[float]:
    values = []
    for part in text.split(","):
        if not part.strip():
            continue
        try:
            values.append(float(part))
        except ValueError:
            raise EmoscopeError(
                f"'{part}' is not a number; give strengths like -0.1,0,0.1."
            ) from None
    if not values:
        raise EmoscopeError("The strength grid is empty; give at least one strength.")
    return values


@command("experiment")
def cmd_experiment(args: argparse.Namespace) -> int:
    from emoscope.experiments import get_experiment, list_experiments, run_experiment

    if args.list:
        listed = list_experiments()
        if args.json:
            emit_json(listed)
            return 0
        for e in listed:
            print(
                f"{e['name']:<15} {e['title']}: {e['metric']}; emotions {', '.join(e['emotions'])}"
            )
        return 0
    if args.name is None:
        raise EmoscopeError("Name an experiment (`emoscope experiment --list` lists them).")
    get_experiment(args.name)
    if args.strengths is not None:  # refused before the model loads
        from emoscope.experiments.base import check_strengths

        check_strengths(args.strengths)
    if args.bank is None or args.out is None:
        raise EmoscopeError("Give --bank DIR and --out DIR.")
    if args.judge and args.mode != "generate":
        raise EmoscopeError("--judge grades free generation; add --mode generate.")
    if args.ray:
        from emoscope.cluster import require_ray

        require_ray()
    bank = _bank(args.bank, args.family)
    emotions = _check_emotions(bank, args.emotions) if args.emotions else None
    layers = _check_layers(bank, args.layers)
    judge = None
    if args.judge:
        from emoscope.experiments.judge import load_judge

        judge = load_judge(args.judge, device=args.device)
    lm = _model_for(args, bank)
    results = run_experiment(
        args.name,
        lm,
        bank,
        args.out,
        mode=args.mode,
        quick=args.quick,
        emotions=emotions,
        strengths=args.strengths,
        layers=layers,
        rollouts=args.rollouts,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        judge=judge,
        progress=not args.no_progress,
        allow_other_model=args.allow_other_model,
        partners=args.partners,
        bank_path=str(args.bank),
        ray=args.ray,
        workers=args.workers,
    )
    if args.json:
        emit_json({k: v for k, v in results.items() if k != "trace"})
        return 0
    print(f"{results['experiment']} on {results['model']} ({results['mode']}): {results['metric']}")
    for row in results["conditions"]:
        lo, hi = row["ci95"]
        shown = "n/a" if row["value"] is None else f"{row['value']:.3f}"
        ci = "" if lo is None else f" [{lo:.3f}, {hi:.3f}]"
        print(
            f"  {row['emotion'] or '(none)':>12} {row['strength']:+.3f}: {shown}{ci} (n={row['n']})"
        )
    for t in results["trend"]:
        slope, p = t.get("slope"), t.get("p_value")
        if slope is not None and p is not None:
            print(f"  trend {t['emotion']:>12}: slope {slope:+.3f} per unit strength, p = {p:.3g}")
    if "r_probe_vs_steer" in results:
        print(f"  r(probe-Elo correlation, Elo change) = {results['r_probe_vs_steer'].get('r')}")
    print(f"results: {args.out}/results.json, {args.out}/section.html ({results['seconds']} s)")
    return 0


# ----- the parser -----


def _bank_args(p: argparse.ArgumentParser, required: bool = True, dtype: str = "float32") -> None:
    p.add_argument(
        "--bank",
        required=required,
        type=existing_folder,
        help="a bank folder written by `emoscope extract`",
    )
    p.add_argument(
        "--family",
        help="vector family to use: story (default) or one the bank lists, e.g. present, "
        "other, felt (`emoscope info` shows them)",
    )
    p.add_argument("--model", help="model to use (default: the bank's model)")
    p.add_argument(
        "--dtype",
        default=dtype,
        type=dtype_name,
        help=f"float32, bfloat16, float16 or auto (bf16 where fast); default {dtype}",
    )
    p.add_argument(
        "--device", default="cpu", type=device_name, help="cpu, cuda, cuda:N, mps or auto"
    )
    _memory_arg(p)
    p.add_argument(
        "--allow-other-model",
        action="store_true",
        help="use the bank with a differently named model of the same size",
    )


def _check_placement(args: argparse.Namespace) -> None:
    """Options that only make sense together, refused before anything loads."""
    if getattr(args, "max_memory", None) and getattr(args, "device", None) != "auto":
        raise EmoscopeError("--max-memory plans a model spread over devices: add --device auto.")
    if getattr(args, "workers", None) and not getattr(args, "ray", None):
        raise EmoscopeError("--workers goes with --ray.")


def _memory_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-memory",
        type=memory_plan,
        help="with --device auto: what each device may hold, e.g. 0=70GiB,1=70GiB,cpu=200GiB "
        "(the rest is offloaded to disk)",
    )


def _ray_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help=f"spread {what} over Ray workers (needs emoscope[ray]): a cluster address, or "
        "none to start Ray on this machine",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        help="with --ray: how many workers (default: one per GPU, else one per CPU)",
    )


def _steer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--emotion",
        action="append",
        type=emotion_strength,
        help="emotion to steer, or EMOTION=STRENGTH (repeatable; summed)",
    )
    p.add_argument(
        "--strength",
        type=finite_float,
        help="strength in units of the residual norm (paper: 0.5 short spans, ~0.1 rollouts)",
    )
    p.add_argument(
        "--layers",
        type=layer_spec,
        help="steering layer(s), e.g. 19 or 16-20 (default: the bank's steering layer)",
    )
    p.add_argument(
        "--positions",
        default="all",
        type=positions,
        help="all, prompt, response, or START:END token span",
    )
    p.add_argument(
        "--control-vector",
        type=existing_file,
        help="also add a llama.cpp/repeng control-vector GGUF file",
    )
    p.add_argument(
        "--control-scale", type=finite_float, default=1.0, help="scale for --control-vector"
    )
    p.add_argument("--force", action="store_true", help="allow |strength| > 2")


def _sampling_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=max_new_tokens,
        help=f"tokens to generate per reply (default {max_new_tokens})",
    )
    choice = p.add_mutually_exclusive_group()
    choice.add_argument(
        "--temperature",
        type=non_negative_float,
        help="sampling temperature, 0 = greedy (default: the model's generation config)",
    )
    choice.add_argument("--greedy", action="store_true", help="always pick the likeliest token")
    p.add_argument(
        "--top-p", type=probability, help="nucleus sampling mass in (0, 1] (default: the model's)"
    )
    p.add_argument(
        "--repetition-penalty",
        type=positive_float,
        help="> 1 discourages repeats (default: the model's, else 1.15; 1 turns it off)",
    )
    p.add_argument("--seed", type=non_negative_int, help="seed for reproducible sampling")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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
        "--out",
        required=True,
        type=output_folder,
        help="run folder (resumable; refuses a folder holding another run)",
    )
    p.add_argument(
        "--layers",
        type=layer_spec,
        help="layers to extract, e.g. '0-29' or '10,15,20' (default: all)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        type=dtype_name,
        help="auto (bf16 where fast), float32, bfloat16, float16",
    )
    p.add_argument(
        "--device", default="cpu", type=device_name, help="cpu, cuda, cuda:N, mps or auto"
    )
    _memory_arg(p)
    _ray_args(p, "the activation stages")
    p.add_argument(
        "--token-offset",
        type=non_negative_int,
        default=50,
        help="story tokens skipped before averaging (paper: 50)",
    )
    p.add_argument(
        "--neutral-variance",
        type=fraction,
        default=0.5,
        help="neutral variance in [0, 1) whose PCs are projected out (paper: 0.5)",
    )
    p.add_argument(
        "--neutral-pca",
        choices=["tokens", "texts"],
        default="tokens",
        help="fit the neutral PCA over tokens or dialogue means",
    )
    p.add_argument(
        "--story-variance",
        type=story_variance,
        default="auto",
        help="within-emotion story variance projected out: auto (CV) or a number in [0, 1); "
        "0 = paper recipe",
    )
    p.add_argument(
        "--stories",
        type=story_source,
        help="story JSONL file or folder (default: the shipped corpus)",
    )
    p.add_argument(
        "--neutral",
        type=existing_file,
        help="neutral dialogue JSONL (default: the shipped corpus)",
    )
    p.add_argument(
        "--dialogues",
        type=existing_folder,
        help="folder of speakers-*.jsonl and deflection-*.jsonl dialogues for the speaker and "
        "deflection families (default: the shipped corpus)",
    )
    p.add_argument(
        "--no-families",
        action="store_true",
        help="build the story vectors only (no speaker or deflection families)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    corpus = sub.add_parser("corpus", help="check, describe or generate corpora").add_subparsers(
        dest="corpus_command", required=True, metavar="ACTION"
    )
    p = corpus.add_parser("check", help="run the corpus quality gates")
    p.add_argument(
        "paths",
        nargs="*",
        type=story_source,
        help="story files or folders (default: shipped); with --neutral, one dialogue file",
    )
    p.add_argument("--neutral", action="store_true", help="check neutral dialogues instead")
    p.add_argument("--emotions", type=emotion_list, help="comma-separated subset to check")
    p = corpus.add_parser("card", help="print (or write) the corpus card")
    p.add_argument(
        "--out", type=output_file, help="write the card to this file (default: print it)"
    )
    p = corpus.add_parser(
        "generate", help="have a model write stories (or neutral dialogues), resumably"
    )
    p.add_argument("--model", required=True)
    p.add_argument(
        "--out",
        required=True,
        type=output_folder,
        help="output folder (append-only JSONL; re-runs resume)",
    )
    p.add_argument("--kind", choices=["stories", "neutral"], default="stories")
    p.add_argument(
        "--emotions", type=emotion_list, help="comma-separated subset (default: all 171)"
    )
    p.add_argument(
        "--topics", type=positive_int, default=20, help="topics per emotion (default 20)"
    )
    p.add_argument("--per-call", type=positive_int, default=2, help="stories asked for per prompt")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--max-new-tokens", type=positive_int, default=400)
    p.add_argument("--temperature", type=non_negative_float, default=0.8)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--dtype", default="auto", type=dtype_name)
    p.add_argument("--device", default="cpu", type=device_name)
    _memory_arg(p)
    p.add_argument(
        "--backend",
        choices=("engine", "vllm"),
        default="engine",
        help="engine (emoscope's own, default) or vllm (GPUs; needs emoscope[vllm])",
    )
    p.add_argument(
        "--tensor-parallel-size",
        type=positive_int,
        default=1,
        help="with --backend vllm: GPUs one model is split over",
    )
    _ray_args(p, "the cells")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("score", help="per-token emotion readout of a text or transcript")
    _bank_args(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", type=non_empty_text, help="text to score")
    source.add_argument(
        "--file", type=transcript, help="transcript JSON: a list of {role, content} turns"
    )
    p.add_argument("--emotions", type=emotion_list, help="comma-separated subset (default: all)")
    p.add_argument(
        "--layers",
        type=layer_spec,
        help="layer or band, e.g. 18 or 16-20 (default: the bank's default layer)",
    )
    p.add_argument("--mode", choices=["centred", "projection", "cosine"], default="centred")
    p.add_argument("--smooth", type=positive_int, default=1, help="moving-average window in tokens")
    p.add_argument("--top", type=positive_int, default=3, help="emotions shown per token")
    p.add_argument(
        "--concealment",
        action="store_true",
        help="with --file: internal readout vs what the assistant's text expresses "
        "(needs emoscope[expression])",
    )
    p.add_argument("--json", action="store_true", help="print tokens and scores as JSON")

    p = sub.add_parser("steer", help="generate with emotion steering")
    _bank_args(p)
    _steer_args(p)
    p.add_argument(
        "--prompt",
        action="append",
        required=True,
        type=non_empty_text,
        help="user message (repeatable: batched)",
    )
    p.add_argument("--raw", action="store_true", help="treat prompts as raw text, not chat turns")
    _sampling_args(p, max_new_tokens=40)
    p.add_argument("--json", action="store_true", help='print {"prompts": [...], "texts": [...]}')

    p = sub.add_parser("chat", help="terminal chat with live emotion readouts")
    _bank_args(p)
    _steer_args(p)
    p.add_argument(
        "--show",
        type=emotion_list,
        help="emotions in the live bar (default: happy,sad,afraid,angry,calm,desperate)",
    )
    p.add_argument(
        "--alert",
        action="append",
        default=[],
        type=alert_rule,
        help="alert rule, e.g. 'desperate > 2.5 sigma for 3 tokens' (repeatable)",
    )
    p.add_argument(
        "--log", type=output_file, help="append-only JSONL log of alerts and transcripts"
    )
    _sampling_args(p, max_new_tokens=120)
    p.add_argument(
        "--no-live", action="store_true", help="print the bar after each reply instead of live"
    )
    p.add_argument(
        "--no-user-readout",
        action="store_true",
        help="do not read each user message with the bank's chat readout",
    )

    p = sub.add_parser("validate-steering", help="He-feels and dose-response checks of steering")
    _bank_args(p)
    p.add_argument(
        "--layers", type=layer_spec, help="steering layer(s) (default: the bank's steering layer)"
    )
    p.add_argument(
        "--feeling-strength",
        type=real_in(0.0, 2.0, low_open=True),
        default=0.5,
        help="strength of the He-feels / I-feel steering, in (0, 2] (default 0.5)",
    )
    p.add_argument(
        "--max-strength",
        type=real_in(0.0, 2.0, low_open=True),
        default=0.3,
        help="dose-response runs from -S to +S, S in (0, 2] (default 0.3)",
    )
    p.add_argument(
        "--strengths",
        type=at_least(3),
        default=7,
        help="number of dose-response strengths, >= 3 (default 7)",
    )
    p.add_argument("--max-new-tokens", type=positive_int, default=30)
    p.add_argument("--out", type=output_folder, help="output folder (default: BANK/steering)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser(
        "export", help="export emotion vectors as llama.cpp control-vector GGUF files"
    )
    p.add_argument("--bank", required=True, type=existing_folder)
    p.add_argument(
        "--family",
        help="vector family to use: story (default) or one the bank lists, e.g. present, "
        "other, felt (`emoscope info` shows them)",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--emotion",
        action="append",
        type=emotion_strength,
        help="EMOTION or EMOTION=STRENGTH (repeatable; summed)",
    )
    what.add_argument(
        "--all", action="store_true", help="one file per emotion into the --out folder"
    )
    p.add_argument("--strength", type=finite_float, default=1.0)
    p.add_argument(
        "--layers",
        type=layer_spec,
        help="layers (default: the bank's steering layer; layer 0 is not allowed)",
    )
    p.add_argument(
        "--out", required=True, type=Path, help="output .gguf file (or folder with --all)"
    )

    p = sub.add_parser("compare", help="markdown table of several runs' headline numbers")
    p.add_argument(
        "runs", nargs="+", type=run_folder, help="run folders written by `emoscope extract`"
    )
    p.add_argument("--out", type=output_file, help="also write the table to this file")

    p = sub.add_parser("info", help="describe a bank")
    p.add_argument("--bank", required=True, type=existing_folder)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser(
        "experiment",
        help="behavioural experiments: preferences, blackmail, reward hacking, sycophancy",
    )
    p.add_argument("name", nargs="?", help="experiment name (see --list)")
    p.add_argument("--list", action="store_true", help="list the experiments and exit")
    _bank_args(p, required=False, dtype="auto")  # experiments are long: bf16 where fast
    p.add_argument("--out", type=output_folder, help="run folder (resumable)")
    p.add_argument(
        "--mode",
        choices=("forced-choice", "generate"),
        default="forced-choice",
        help="forced-choice (answer-option probabilities; default) or generate (sampled replies "
        "and a grader)",
    )
    p.add_argument("--quick", action="store_true", help="reduced grid (a few minutes on a CPU)")
    p.add_argument("--emotions", type=emotion_list, help="emotions to steer, comma-separated")
    p.add_argument(
        "--strengths", type=strength_list, help="strength grid, e.g. -0.1,-0.05,0.05,0.1"
    )
    p.add_argument("--layers", type=layer_spec, help="steering layer(s) (default: the bank's)")
    p.add_argument("--rollouts", type=positive_int, help="generate mode: replies per cell")
    p.add_argument(
        "--max-new-tokens",
        type=positive_int,
        help="generate mode: reply length (default: the experiment's, 80-256)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--judge", help="generate mode: a local model that grades the replies")
    p.add_argument(
        "--partners",
        type=positive_int,
        help="preferences: unsteered partners per steered activity, both orders (default 2 of "
        "32; 32 is the paper's full tournament)",
    )
    _ray_args(p, "the experiment's prompts")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser(
        "serve", help="OpenAI-compatible chat server with live emotion telemetry and a dashboard"
    )
    _bank_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback)")
    p.add_argument(
        "--port", type=port_number, default=8000, help="port (default 8000; 0: any free port)"
    )
    p.add_argument(
        "--db",
        type=database_file,
        default=Path("emoscope.db"),
        help="SQLite conversation log (default ./emoscope.db)",
    )
    p.add_argument(
        "--api-key",
        help="require this key on every route (default: $EMOSCOPE_API_KEY; needed for a "
        "non-loopback --host)",
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        help="allow browser calls from this origin (repeatable; default none)",
    )
    p.add_argument(
        "--max-batch", type=positive_int, default=8, help="requests generating at once (default 8)"
    )
    p.add_argument(
        "--max-queue",
        type=non_negative_int,
        default=32,
        help="requests waiting for a slot before 429 (default 32)",
    )
    p.add_argument(
        "--context",
        type=at_least(2),
        default=2048,
        help="tokens per request, prompt plus reply (default 2048, capped by the model)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=512,
        help="largest max_tokens a request may ask for (default 512)",
    )
    p.add_argument(
        "--max-strength",
        type=positive_float,
        default=1.0,
        help="largest |steering strength| per emotion (default 1.0)",
    )
    p.add_argument(
        "--log-level",
        choices=["critical", "error", "warning", "info", "debug"],
        default="warning",
        help="uvicorn's log level (info also logs every request)",
    )

    log = sub.add_parser("log", help="the conversation log of `emoscope serve`").add_subparsers(
        dest="log_command", required=True, metavar="ACTION"
    )
    p = log.add_parser("export", help="write every logged conversation as JSON lines")
    p.add_argument("--db", required=True, type=existing_file, help="the server's --db file")
    p.add_argument("--out", type=output_file, help="JSONL file to write (default: print)")

    p = sub.add_parser(
        "emotions", help="the 171 emotions with human valence/arousal (and a bank's clusters)"
    )
    p.add_argument(
        "--bank", type=existing_folder, help="also show each emotion's k-means cluster in this bank"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object per emotion")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse has printed the one error line (or --help)
        return exc.code if isinstance(exc.code, int) else 2
    actions = {
        "corpus": getattr(args, "corpus_command", None),
        "log": getattr(args, "log_command", None),
    }
    name = f"{args.command}-{actions[args.command]}" if args.command in actions else args.command
    try:
        _check_placement(args)
        return COMMANDS[name](args)
    except EmoscopeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (e.g. `| head`): stop quietly, like other tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "\ninterrupted: finished work is saved; run the same command again to resume.",
            file=sys.stderr,
        )
        return 130


def _nan_to_null(data: Any) -> Any:
    """The same data with undefined numbers (NaN, infinities) as ``None``, i.e. JSON ``null``."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _nan_to_null(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_nan_to_null(v) for v in data]
    return data


def emit_json(data: Any) -> None:
    """Standard JSON only: a NaN that reaches here is a bug, not output."""
    print(json.dumps(data, indent=1, ensure_ascii=False, allow_nan=False, default=float))


if __name__ == "__main__":
    sys.exit(main())
