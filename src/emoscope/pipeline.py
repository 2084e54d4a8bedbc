"""The main job: from a model to a validated bank of emotion vectors and its report.

Stages (each timed; the three that run the model are cached in ``activations/``):

1. per-story mean activations at every layer (checkpointed batch by batch);
2. neutral-dialogue moments (for the PCA projection, z-scores and steering norms);
3. readouts at the start of the assistant turn for neutral, implicit and intensity prompts;
4. vectors at every layer from the training split, layer sweep, default layer
   (:mod:`emoscope.analysis.layers`);
5. validation and geometry (:mod:`emoscope.analysis.validation`); the bank, ``report.json``
   and ``report.html``.

A run folder records what it holds in ``run.json``; a re-run with the same model, corpus and
recipe resumes, and a different one is refused rather than mixed in. Only the activations are
cached: changing a vector-only choice of the recipe rebuilds the bank and report from them.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from emoscope import __version__
from emoscope.activations import (
    NeutralMoments,
    TextMeans,
    clear_checkpoint,
    load_neutral_moments,
    load_text_means,
    neutral_moments,
    save_neutral_moments,
    save_text_means,
    text_means,
)
from emoscope.analysis.layers import LabelledStories, VectorSweep, sweep_layers
from emoscope.analysis.prompts import PromptReadouts, prompt_readouts
from emoscope.analysis.validation import Analysis, analyse
from emoscope.concepts import EMOTIONS
from emoscope.corpus.records import (
    Dialogue,
    Story,
    corpus_sha256,
    load_eval_prompts,
    load_neutral,
    load_stories,
)
from emoscope.errors import EmoscopeError
from emoscope.files import atomic_write_json, claim_folder
from emoscope.models import DEFAULT_MODEL, LoadedModel, load_model, preferred_dtype
from emoscope.vectors import EmotionBank, Recipe, bank_from_parts, two_thirds_layer

T = TypeVar("T")


@dataclass
class ExtractConfig:
    """Everything that defines a run; all of it is recorded in ``run.json`` and the manifest."""

    out: Path
    model: str = DEFAULT_MODEL
    dtype: str = "auto"
    device: str = "cpu"
    layers: list[int] | None = None
    recipe: Recipe = field(default_factory=Recipe)
    stories: Path | None = None
    neutral: Path | None = None
    eval_prompts: Path | None = None
    max_batch_tokens: int = 4096
    cv_folds: int = 5
    progress: bool = True


@dataclass
class ExtractResult:
    bank: EmotionBank
    report: dict[str, Any]
    out: Path


@dataclass
class Stage:
    name: str
    seconds: float


class Timer:
    def __init__(self, echo: Callable[[str], None]) -> None:
        self.stages: list[Stage] = []
        self.echo = echo

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.echo(f"[emoscope] {name} ...")
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        self.stages.append(Stage(name, seconds))
        self.echo(f"[emoscope] {name}: {seconds:.1f}s")

    def as_dict(self) -> dict[str, float]:
        return {s.name: round(s.seconds, 2) for s in self.stages}


@dataclass
class Corpus:
    """The texts a run reads, and the hashes that identify them."""

    stories: list[Story]
    dialogues: list[Dialogue]
    prompts: dict[str, Any]
    emotions: list[str]
    """The emotions that have stories, in catalogue order: the bank's rows."""
    sha256: str
    prompts_sha256: str


def _echo_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def extract(config: ExtractConfig, echo: Callable[[str], None] = _echo_stderr) -> ExtractResult:
    """Run the whole pipeline into ``config.out`` and return the bank and the report data.

    Example:
        >>> result = extract(ExtractConfig(out=Path("runs/demo")))
        >>> result.report["summary"]["test_top5"]
    """
    timer = Timer(echo)
    out = Path(config.out)
    cache = out / "activations"
    with timer.stage("load model"):
        lm = _load_model(config, echo)
    with timer.stage("load corpus"):
        corpus = load_corpus(config)
        layers = _layers(config, lm)
        claim_folder(out, _run_identity(config, lm, corpus, layers))
    with timer.stage(f"story activations ({len(corpus.stories)} stories)"):
        means = _story_activations(lm, corpus, layers, config, cache)
        stories = LabelledStories.from_records(means, corpus.stories, corpus.emotions)
    with timer.stage(f"neutral activations ({len(corpus.dialogues)} dialogues)"):
        neutral = _neutral_activations(lm, corpus, layers, config, cache)
    with timer.stage("assistant-turn readouts"):
        readouts = _prompt_readouts(lm, corpus, layers, cache)
    with timer.stage("vectors and layer sweep"):
        sweep = sweep_layers(stories, neutral, readouts.neutral, config.recipe, config.cv_folds)
    with timer.stage("validation and geometry"):
        manifest = _manifest(lm, corpus, stories, neutral, sweep)
        bank = bank_from_parts(
            corpus.emotions, sweep.layers, sweep.statistics, manifest, sweep.recipe
        )
        analysis = analyse(lm, bank, stories, readouts, corpus.prompts, sweep.default_layer)
        bank.save(out)
    report = _report(lm, corpus, stories, sweep, analysis, bank)
    report["timings"] = timer.as_dict()
    from emoscope.report import write_report

    with timer.stage("report"):
        write_report(report, bank, out)
    report["timings"] = timer.as_dict()
    atomic_write_json(out / "report.json", report)
    return ExtractResult(bank, report, out)


def cached_stage(
    path: Path,
    compute: Callable[[], T],
    save: Callable[[T, Path], None],
    load: Callable[[Path], T],
    checkpoint: Path | None = None,
) -> T:
    """Load a stage's result from ``path`` if an earlier run finished it; else compute it, save
    it there, and drop the stage's ``checkpoint`` (only an unfinished stage needs one)."""
    if path.exists():
        return load(path)
    result = compute()
    save(result, path)
    if checkpoint is not None:
        clear_checkpoint(checkpoint)
    return result


def _load_model(config: ExtractConfig, echo: Callable[[str], None]) -> LoadedModel:
    dtype = preferred_dtype(config.device) if config.dtype == "auto" else config.dtype
    lm = load_model(config.model, dtype=dtype, device=config.device)
    echo(
        f"[emoscope] {lm.name}: {lm.n_layers} layers, hidden {lm.hidden_size}, {lm.dtype}, "
        f"{'cached' if lm.from_cache else 'first load'} in {lm.load_seconds:.1f}s"
    )
    return lm


def load_corpus(config: ExtractConfig) -> Corpus:
    """The run's stories, neutral dialogues and evaluation prompts (shipped ones by default)."""
    stories = load_stories(config.stories)
    dialogues = load_neutral(config.neutral)
    prompts = load_eval_prompts(config.eval_prompts)
    emotions = [e for e in EMOTIONS if any(s.emotion == e for s in stories)]
    if not emotions:
        raise EmoscopeError("The story corpus is empty.")
    return Corpus(
        stories,
        dialogues,
        prompts,
        emotions,
        corpus_sha256(stories, dialogues),
        hashlib.sha256(json.dumps(prompts, sort_keys=True).encode()).hexdigest(),
    )


def _layers(config: ExtractConfig, lm: LoadedModel) -> list[int]:
    if config.layers is None:
        return list(range(lm.n_layers))
    return sorted(set(lm.check_layers(config.layers)))


def _run_identity(
    config: ExtractConfig, lm: LoadedModel, corpus: Corpus, layers: list[int]
) -> dict[str, Any]:
    """What the cached activations depend on; a folder holding other activations is refused.

    Choices that only shape the vectors (neutral variance, story denoising, PCA mode) are not
    part of it: changing them rebuilds the bank and report from the cached activations.
    """
    return {
        "model": lm.name,
        "dtype": str(lm.dtype).removeprefix("torch."),
        "layers": layers,
        "corpus_sha256": corpus.sha256,
        "eval_prompts_sha256": corpus.prompts_sha256,
        "token_offset": config.recipe.token_offset,
        "neutral_skip_first": config.recipe.neutral_skip_first,
    }


def _story_activations(
    lm: LoadedModel, corpus: Corpus, layers: list[int], config: ExtractConfig, cache: Path
) -> TextMeans:
    """Per-story mean activations at every layer, checkpointed batch by batch."""
    checkpoint = cache / "stories.ckpt"
    return cached_stage(
        cache / "stories.safetensors",
        lambda: text_means(
            lm,
            [s.text for s in corpus.stories],
            layers,
            config.recipe.token_offset,
            add_special_tokens=True,
            max_batch_tokens=config.max_batch_tokens,
            checkpoint=checkpoint,
            progress=config.progress,
            desc="story activations",
        ),
        save_text_means,
        load_text_means,
        checkpoint,
    )


def _neutral_activations(
    lm: LoadedModel, corpus: Corpus, layers: list[int], config: ExtractConfig, cache: Path
) -> NeutralMoments:
    """Token-level moments of the neutral dialogues (for the PCA, z-scores and steering norms)."""
    checkpoint = cache / "neutral.ckpt.safetensors"

    def compute() -> NeutralMoments:
        texts, special = _neutral_texts(lm, corpus.dialogues)
        return neutral_moments(
            lm,
            texts,
            layers,
            config.recipe.neutral_skip_first,
            special,
            max_batch_tokens=config.max_batch_tokens,
            progress=config.progress,
            checkpoint=checkpoint,
        )

    return cached_stage(
        cache / "neutral.safetensors",
        compute,
        save_neutral_moments,
        load_neutral_moments,
        checkpoint,
    )


def _prompt_readouts(
    lm: LoadedModel, corpus: Corpus, layers: list[int], cache: Path
) -> PromptReadouts:
    """Readouts at the start of the assistant turn: neutral, implicit and intensity prompts."""
    return cached_stage(
        cache / "prompts.safetensors",
        lambda: prompt_readouts(lm, _first_user_messages(corpus.dialogues), corpus.prompts, layers),
        PromptReadouts.save,
        lambda path: PromptReadouts.load(path, layers),
    )


def _neutral_texts(lm: LoadedModel, dialogues: Sequence[Dialogue]) -> tuple[list[str], bool]:
    chats = [
        lm.chat(
            [{"role": t.role, "content": t.content} for t in d.turns], add_generation_prompt=False
        )
        for d in dialogues
    ]
    return [c.text for c in chats], chats[0].add_special_tokens


def _first_user_messages(dialogues: Sequence[Dialogue]) -> list[str]:
    return [next(t.content for t in d.turns if t.role == "user") for d in dialogues]


def _manifest(
    lm: LoadedModel,
    corpus: Corpus,
    stories: LabelledStories,
    neutral: NeutralMoments,
    sweep: VectorSweep,
) -> dict[str, Any]:
    """What the bank records about its model, choices and data (the recipe is added later)."""
    two_thirds = two_thirds_layer(stories.activations.layers, lm.n_layers)
    return {
        "model": lm.name,
        "family": lm.adapter.family,
        "n_layers_model": lm.n_layers,
        "hidden_size": lm.hidden_size,
        "dtype": str(lm.dtype).removeprefix("torch."),
        "default_layer": sweep.default_layer,
        "default_layer_rule": "best cross-validated (train topics) top-1 + top-5, jointly with story_variance",
        "story_variance_selection": sweep.selection,
        "two_thirds_layer": two_thirds,
        "steer_layer": two_thirds,
        "corpus_sha256": corpus.sha256,
        "n_stories_train": int(stories.is_train.sum()),
        "n_stories_test": int(stories.is_test.sum()),
        "n_neutral_dialogues": len(corpus.dialogues),
        "neutral_tokens": neutral.count,
        "readout_mode": "centred",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _report(
    lm: LoadedModel,
    corpus: Corpus,
    stories: LabelledStories,
    sweep: VectorSweep,
    analysis: Analysis,
    bank: EmotionBank,
) -> dict[str, Any]:
    """``report.json`` (less the timings): the run, the layer sweep, validation and a summary."""
    means = stories.activations
    report = {
        "emoscope_version": __version__,
        "model": lm.describe() | {"load_seconds": lm.load_seconds, "from_cache": lm.from_cache},
        "corpus": {
            "sha256": corpus.sha256,
            "stories": len(corpus.stories),
            "train": int(stories.is_train.sum()),
            "test": int(stories.is_test.sum()),
            "emotions": len(corpus.emotions),
            "neutral_dialogues": len(corpus.dialogues),
            "short_stories": int(means.short.sum()),
            "mean_tokens_averaged": float(means.n_tokens.float().mean()),
        },
        "recipe": asdict(sweep.recipe),
        "story_variance_selection": sweep.selection,
        "default_layer": sweep.default_layer,
        "two_thirds_layer": bank.manifest["two_thirds_layer"],
        "layer_sweep": sweep.rows,
        **analysis.as_report(),
    }
    report["summary"] = _summary(lm, sweep, analysis)
    return report


def _summary(lm: LoadedModel, sweep: VectorSweep, analysis: Analysis) -> dict[str, Any]:
    """The headline numbers, at the default layer."""
    row = next(r for r in sweep.rows if r["layer"] == sweep.default_layer)
    norms = analysis.geometry["norms"]
    return {
        "model": lm.name,
        "default_layer": sweep.default_layer,
        "test_top1": row["test"]["top1"],
        "test_top5": row["test"]["top5"],
        "cv_train_top1": row["cv_train"]["top1"],
        "cv_train_top5": row["cv_train"]["top5"],
        "pc1_valence_r": norms["pc1_valence"]["r"],
        "max_pc23_arousal_r": max(abs(norms["pc2_arousal"]["r"]), abs(norms["pc3_arousal"]["r"])),
        "implicit_accuracy": analysis.implicit["z_scored"]["accuracy"],
        "intensity_directions_held": analysis.intensity["held"],
        "intensity_directions_total": analysis.intensity["total"],
    }
