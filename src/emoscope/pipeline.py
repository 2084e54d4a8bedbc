"""The main job: from a model to a validated bank of emotion vectors and its report.

Stages (each timed; the three that run the model are cached in ``activations/``):

1. per-story mean activations at every layer (checkpointed batch by batch);
2. neutral-dialogue moments (for the PCA projection, z-scores and steering norms);
3. readouts at the start of the assistant turn for neutral, implicit and intensity prompts, and
   averaged over the user's message (the two chat sites);
4. per-speaker means of the speaker dialogues (chat and ``Person 1/2`` framings) and of the
   deflection dialogues;
5. vectors at every layer from the training split, layer sweep, default layer
   (:mod:`emoscope.analysis.layers`); the speaker and deflection families
   (:mod:`emoscope.speakers`) and the chat readout chosen on training prompts;
6. validation and geometry (:mod:`emoscope.analysis.validation`,
   :mod:`emoscope.analysis.families`); the bank, ``report.json`` and ``report.html``.

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

import torch
from safetensors.torch import load_file

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
from emoscope.analysis import families as family_analysis
from emoscope.analysis.calibration import user_site_statistics
from emoscope.analysis.layers import LabelledStories, VectorSweep, neutral_bases, sweep_layers
from emoscope.analysis.prompts import (
    ChatSites,
    PromptReadouts,
    chat_site_readouts,
    prompt_readouts,
)
from emoscope.analysis.validation import Analysis, analyse
from emoscope.concepts import EMOTIONS
from emoscope.corpus.dialogues import (
    DeflectionDialogue,
    SpeakerDialogue,
    load_deflection_dialogues,
    load_speaker_dialogues,
    render,
)
from emoscope.corpus.records import (
    Dialogue,
    Story,
    corpus_sha256,
    load_eval_prompts,
    load_implicit_train,
    load_neutral,
    load_stories,
)
from emoscope.errors import EmoscopeError
from emoscope.files import atomic_save_tensors, atomic_write_json, claim_folder
from emoscope.models import DEFAULT_MODEL, LoadedModel, load_model, preferred_dtype
from emoscope.speakers import FamilyBuild, FamilyInputs, build_families, speaker_means
from emoscope.vectors import (
    EmotionBank,
    Recipe,
    bank_from_parts,
    two_thirds_layer,
)

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
    dialogues: Path | None = None
    """Folder of speaker and deflection dialogues (default: the shipped ones)."""
    families: bool = True
    """Also build the speaker and deflection families."""
    max_batch_tokens: int = 4096
    cv_folds: int = 5
    progress: bool = True
    max_memory: dict[Any, str] | None = None
    """With ``device="auto"``: how much each device may hold (accelerate's ``max_memory``)."""
    ray: str | None = None
    """Spread the activation stages over Ray workers: ``"local"`` starts a Ray runtime here,
    anything else is a cluster address. ``None``: one process."""
    workers: int | None = None
    """Ray workers (default: one per GPU, or one per CPU)."""


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
    speakers: list[SpeakerDialogue] = field(default_factory=list)
    deflections: list[DeflectionDialogue] = field(default_factory=list)
    implicit_train: list[dict[str, Any]] = field(default_factory=list)
    dialogues_sha256: str | None = None


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
    with _workers(config, lm, cache, echo) as pool:
        with timer.stage(f"story activations ({len(corpus.stories)} stories)"):
            means = _story_activations(lm, corpus, layers, config, cache, pool)
            stories = LabelledStories.from_records(means, corpus.stories, corpus.emotions)
        with timer.stage(f"neutral activations ({len(corpus.dialogues)} dialogues)"):
            neutral = _neutral_activations(lm, corpus, layers, config, cache, pool)
        dialogue_means = None
        if config.families:
            with timer.stage(
                f"speaker activations ({len(corpus.speakers)} dialogues x 2 framings, "
                f"{len(corpus.deflections)} deflection dialogues)"
            ):
                dialogue_means = _dialogue_activations(
                    lm, corpus, layers, cache, config.progress, pool
                )
    with timer.stage("assistant-turn readouts"):
        readouts = _prompt_readouts(lm, corpus, layers, cache)
    sites = None
    if config.families:
        with timer.stage("user-turn readouts"):
            sites = _chat_sites(lm, corpus, readouts, cache, config.progress)
    with timer.stage("vectors and layer sweep"):
        sweep = sweep_layers(stories, neutral, readouts.neutral, config.recipe, config.cv_folds)
    with timer.stage("validation and geometry"):
        manifest = _manifest(lm, corpus, stories, neutral, sweep)
        bank = bank_from_parts(
            corpus.emotions, sweep.layers, sweep.statistics, manifest, sweep.recipe
        )
        analysis = analyse(lm, bank, stories, readouts, corpus.prompts, sweep.default_layer)
    families_section: dict[str, Any] = {}
    if sites is not None and dialogue_means is not None:
        with timer.stage("speaker and deflection families"):
            families_section = _families(
                bank, corpus, neutral, sweep, readouts, sites, dialogue_means, config
            )
    bank.save(out)
    report = _report(lm, corpus, stories, sweep, analysis, bank)
    if families_section:
        report["families"] = families_section
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


@contextmanager
def _workers(
    config: ExtractConfig, lm: LoadedModel, cache: Path, echo: Callable[[str], None]
) -> Iterator[Any]:
    """A Ray pool for the activation stages when ``config.ray`` asks for one (and any of
    them is still to run), else ``None``."""
    finished = [cache / "stories.safetensors", cache / "neutral.safetensors"]
    if config.families:
        finished += [cache / f"dialogues-{s}.safetensors" for s in DIALOGUE_SOURCES]
    if config.ray is None or all(path.exists() for path in finished):
        yield None
        return
    from emoscope.cluster import ModelSpec, RayPool

    with RayPool(ModelSpec.of(lm), config.ray, config.workers) as pool:
        echo(f"[emoscope] Ray: {pool.workers} workers ({config.ray})")
        yield pool
        if pool.stats["rerun"]:
            echo(
                f"[emoscope] Ray: {pool.stats['rerun']} shards re-run after "
                f"{pool.stats['replaced']} workers died"
            )


def _load_model(config: ExtractConfig, echo: Callable[[str], None]) -> LoadedModel:
    dtype = preferred_dtype(config.device) if config.dtype == "auto" else config.dtype
    lm = load_model(config.model, dtype=dtype, device=config.device, max_memory=config.max_memory)
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
    corpus = Corpus(
        stories,
        dialogues,
        prompts,
        emotions,
        corpus_sha256(stories, dialogues),
        _sha256(prompts),
    )
    if config.families:
        corpus.speakers = load_speaker_dialogues(config.dialogues)
        corpus.deflections = load_deflection_dialogues(config.dialogues)
        if not corpus.speakers or not corpus.deflections:
            where = config.dialogues or "the shipped corpus"
            raise EmoscopeError(
                f"No speaker or no deflection dialogues in {where}; the families need both "
                "(or run with families=False / --no-families)."
            )
        corpus.implicit_train = load_implicit_train()
        corpus.dialogues_sha256 = _sha256(
            [repr(d) for d in [*corpus.speakers, *corpus.deflections]] + [corpus.implicit_train]
        )
    return corpus


def _sha256(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


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
        "dialogues_sha256": corpus.dialogues_sha256,
    }


def _story_activations(
    lm: LoadedModel,
    corpus: Corpus,
    layers: list[int],
    config: ExtractConfig,
    cache: Path,
    pool: Any = None,
) -> TextMeans:
    """Per-story mean activations at every layer, checkpointed batch by batch (or shard by
    shard on Ray workers)."""
    means, source, checkpoint = _runner(
        "text_means", lm, pool, cache, "stories.ckpt", "stories.ray.ckpt"
    )
    return cached_stage(
        cache / "stories.safetensors",
        lambda: means(
            source,
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
    lm: LoadedModel,
    corpus: Corpus,
    layers: list[int],
    config: ExtractConfig,
    cache: Path,
    pool: Any = None,
) -> NeutralMoments:
    """Token-level moments of the neutral dialogues (for the PCA, z-scores and steering norms)."""
    moments, source, checkpoint = _runner(
        "neutral_moments", lm, pool, cache, "neutral.ckpt.safetensors", "neutral.ray.ckpt"
    )

    def compute() -> NeutralMoments:
        texts, special = _neutral_texts(lm, corpus.dialogues)
        return moments(
            source,
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


def _runner(
    name: str, lm: LoadedModel, pool: Any, cache: Path, local: str, sharded: str
) -> tuple[Callable[..., Any], Any, Path]:
    """An activation function of :mod:`emoscope.activations` with its model, or its
    :mod:`emoscope.cluster` twin (same arguments) with the pool, and where each checkpoints."""
    if pool is None:
        return (
            {"text_means": text_means, "neutral_moments": neutral_moments}[name],
            lm,
            cache / local,
        )
    from emoscope import cluster

    return getattr(cluster, name), pool, cache / sharded


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


def _chat_sites(
    lm: LoadedModel, corpus: Corpus, readouts: PromptReadouts, cache: Path, progress: bool
) -> ChatSites:
    """Implicit prompts of both splits at both chat sites, and the neutral prompts' user turns."""
    return cached_stage(
        cache / "chat_sites.safetensors",
        lambda: chat_site_readouts(
            lm,
            readouts,
            _first_user_messages(corpus.dialogues),
            [p["text"] for p in corpus.prompts["implicit"]],
            [p["text"] for p in corpus.implicit_train],
            progress,
        ),
        ChatSites.save,
        lambda path: ChatSites.load(path, readouts),
    )


DIALOGUE_SOURCES = ("chat", "person", "deflection")


def _dialogue_activations(
    lm: LoadedModel,
    corpus: Corpus,
    layers: list[int],
    cache: Path,
    progress: bool,
    pool: Any = None,
) -> dict[str, torch.Tensor]:
    """Per-speaker means ``[dialogues, 2, layers, hidden]`` of the speaker dialogues in both
    framings and of the deflection dialogues (``Person 1/2`` framing, narration first); each is
    cached on its own, so an interrupted run keeps what it finished."""
    out = {}
    for source in DIALOGUE_SOURCES:
        if source == "deflection":
            rendered = [render(lm, d.turns, "person", d.context) for d in corpus.deflections]
        else:
            rendered = [render(lm, d.turns, source) for d in corpus.speakers]
        checkpoint = cache / f"dialogues-{source}.ray.ckpt"

        def compute(
            rendered: list[Any] = rendered, source: str = source, checkpoint: Path = checkpoint
        ) -> torch.Tensor:
            if pool is not None:
                from emoscope import cluster

                return cluster.speaker_means(
                    pool, rendered, layers, checkpoint, progress, f"{source} dialogues"
                )
            return speaker_means(
                lm, rendered, layers, progress=progress, desc=f"{source} dialogues"
            )

        out[source] = cached_stage(
            cache / f"dialogues-{source}.safetensors",
            compute,
            lambda tensor, path: atomic_save_tensors({"means": tensor}, path),
            lambda path: load_file(str(path))["means"],
            checkpoint if pool is not None else None,
        )
    return out


def _families(
    bank: EmotionBank,
    corpus: Corpus,
    neutral: NeutralMoments,
    sweep: VectorSweep,
    readouts: PromptReadouts,
    sites: ChatSites,
    means: dict[str, torch.Tensor],
    config: ExtractConfig,
) -> dict[str, Any]:
    """Build every family into ``bank``, choose its chat readout, and return the report section."""
    layers = readouts.layers
    bases = neutral_bases(neutral, sweep.recipe)
    for i, layer in enumerate(layers):
        story = sweep.layers[layer]
        for key, value in user_site_statistics(story, sites.neutral_user[:, i]).items():
            bank.stats[f"{key}.{layer}"] = value
    builds: dict[str, FamilyBuild] = build_families(
        FamilyInputs(
            layers,
            corpus.speakers,
            means["chat"],
            corpus.deflections,
            means["deflection"],
            bases,
            neutral,
            readouts.neutral,
            sites.neutral_user,
        ),
        config.cv_folds,
    )
    for name, build in builds.items():
        bank.add_family(name, build.emotions, build.layers, build.statistics, build.info)
    prompts = corpus.prompts
    targets = list(prompts["implicit_targets"])
    chat = family_analysis.chat_readouts(
        bank,
        sites,
        targets,
        [p["emotion"] for p in prompts["implicit"]],
        [p["emotion"] for p in corpus.implicit_train],
    )
    if chat:
        choice = chat["choice"]
        bank.manifest["chat_readout"] = {
            "family": choice["family"],
            "site": choice["site"],
            "layer": choice["layer"],
            "rule": "best training-split implicit-prompt accuracy (then mean reciprocal rank)",
        }
    present_layer = bank.family("present").default_layer
    return {
        "summary": family_analysis.family_summary(builds),
        "chat_readouts": chat,
        "grid": family_analysis.grid_report(bank, present_layer),
        "rsa": family_analysis.rsa_report(bank),
        "deflection": family_analysis.deflection_report(
            bank, means["deflection"], corpus.deflections
        ),
        "framing": family_analysis.framing_report(
            bank, means["person"], means["chat"], corpus.speakers, bases
        ),
        "decodability": family_analysis.decodability_report(bank),
    }


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
