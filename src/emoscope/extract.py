"""The main job: from a model to a validated bank of emotion vectors and its report.

Stages (each timed, each resumable through files in the run folder):

1. per-story mean activations at every layer (checkpointed batch by batch);
2. neutral-dialogue moments (for the PCA projection, z-scores and steering norms);
3. readouts at the start of the assistant turn for neutral, implicit and intensity prompts;
4. vectors at every layer from the training split, layer sweep, default layer;
5. validation and geometry; the bank, ``report.json`` and ``report.html``.

A run folder records what it holds in ``run.json``; a re-run with the same model, corpus and
recipe resumes, and a different one is refused rather than mixed in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emoscope import __version__
from emoscope.activations import (
    NeutralMoments,
    TextMeans,
    atomic_save,
    clear_checkpoints,
    load_neutral_moments,
    load_text_means,
    neutral_moments,
    save_neutral_moments,
    save_text_means,
    text_means,
)
from emoscope.analysis import geometry
from emoscope.analysis.layers import (
    Accuracy,
    choose,
    cross_validated_accuracy,
    nearest_vector_accuracy,
)
from emoscope.analysis.logit_lens import logit_lens
from emoscope.analysis.prompts import (
    assistant_start_readouts,
    implicit_accuracy,
    intensity_trend,
    z_scores,
)
from emoscope.concepts import CORE_EMOTIONS, EMOTIONS, human_norms
from emoscope.corpus.records import (
    Dialogue,
    Story,
    corpus_sha256,
    load_eval_prompts,
    load_neutral,
    load_stories,
)
from emoscope.errors import EmoscopeError, RunDirectoryError
from emoscope.models import DEFAULT_MODEL, LoadedModel, load_model, preferred_dtype
from emoscope.vectors import (
    EmotionVectors,
    LayerVectors,
    Recipe,
    bank_from_parts,
    build_layer,
    covariance_of,
    neutral_basis,
    two_thirds_layer,
)

log = logging.getLogger(__name__)


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


def _echo_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _run_identity(
    config: ExtractConfig, lm: LoadedModel, corpus_hash: str, prompts_hash: str, layers: list[int]
) -> dict[str, Any]:
    """What the cached activations depend on; a folder holding other activations is refused.

    Choices that only shape the vectors (neutral variance, story denoising, PCA mode) are not
    part of it: changing them rebuilds the bank and report from the cached activations.
    """
    return json.loads(
        json.dumps(
            {
                "model": lm.name,
                "dtype": str(lm.dtype).removeprefix("torch."),
                "layers": layers,
                "corpus_sha256": corpus_hash,
                "eval_prompts_sha256": prompts_hash,
                "token_offset": config.recipe.token_offset,
                "neutral_skip_first": config.recipe.neutral_skip_first,
            }
        )
    )


def prepare_run_dir(out: Path, identity: dict[str, Any]) -> None:
    """Create ``out`` or confirm it holds this same run; never mix two runs in one folder."""
    record = out / "run.json"
    if record.exists():
        try:
            previous = json.loads(record.read_text())
        except ValueError:
            raise RunDirectoryError(
                f"{record} is unreadable; remove {out} or choose another --out."
            ) from None
        changed = [k for k in identity if previous.get(k) != identity[k]]
        if changed:
            raise RunDirectoryError(
                f"{out} holds a different run (differs in: {', '.join(changed)}). "
                "Choose another --out, or delete that folder to start over."
            )
        return
    if out.exists() and any(out.iterdir()):
        raise RunDirectoryError(
            f"{out} is not empty and is not an emoscope run folder; choose another --out."
        )
    out.mkdir(parents=True, exist_ok=True)
    partial = out / f"run.json.partial-{os.getpid()}"
    partial.write_text(json.dumps(dict(identity, emoscope_version=__version__), indent=1))
    os.replace(partial, record)


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


def _acc(a: Accuracy) -> dict[str, float]:
    return {"top1": a.top1, "top5": a.top5, "n": a.n}


def _stats_for_layer(
    lv: LayerVectors, nm: NeutralMoments, index: int, prompt_readouts: torch.Tensor
) -> dict[str, torch.Tensor]:
    v = lv.vectors.double()
    cov = nm.cov[index].double()
    neutral_mean = nm.mean[index]
    prompt_scores = (prompt_readouts - lv.mean) @ lv.vectors.T
    return {
        "neutral_mean": neutral_mean,
        "residual_norm": nm.mean_norm[index].reshape(1),
        "neutral_score_mean": ((neutral_mean - lv.mean) @ lv.vectors.T).float(),
        "neutral_score_std": torch.einsum("eh,hk,ek->e", v, cov, v).clamp(min=0).sqrt().float(),
        "prompt_score_mean": prompt_scores.mean(dim=0),
        "prompt_score_std": prompt_scores.std(dim=0),
    }


def _valence_r(vectors: torch.Tensor, emotions: Sequence[str]) -> dict[str, Any]:
    norms = human_norms(emotions)
    p = geometry.pca(vectors, k=3)
    return geometry.norm_correlations(p.scores, emotions, norms)


@dataclass
class ExtractResult:
    bank: EmotionVectors
    report: dict[str, Any]
    out: Path


def extract(config: ExtractConfig, echo: Callable[[str], None] = _echo_stderr) -> ExtractResult:
    """Run the whole pipeline into ``config.out`` and return the bank and the report data.

    Example:
        >>> result = extract(ExtractConfig(out=Path("runs/demo")))
        >>> result.report["summary"]["test_top5"]
    """
    timer = Timer(echo)
    out = Path(config.out)
    recipe = config.recipe
    with timer.stage("load model"):
        dtype = preferred_dtype(config.device) if config.dtype == "auto" else config.dtype
        lm = load_model(config.model, dtype=dtype, device=config.device)
        echo(
            f"[emoscope] {lm.name}: {lm.n_layers} layers, hidden {lm.hidden_size}, {lm.dtype}, "
            f"{'cached' if lm.from_cache else 'first load'} in {lm.load_seconds:.1f}s"
        )
    with timer.stage("load corpus"):
        stories = load_stories(config.stories)
        dialogues = load_neutral(config.neutral)
        prompts = load_eval_prompts(config.eval_prompts)
        emotions = [e for e in EMOTIONS if any(s.emotion == e for s in stories)]
        if not emotions:
            raise EmoscopeError("The story corpus is empty.")
        corpus_hash = corpus_sha256(stories, dialogues)
        layers = (
            list(range(lm.n_layers))
            if config.layers is None
            else sorted(set(lm.check_layers(config.layers)))
        )
        prompts_hash = hashlib.sha256(json.dumps(prompts, sort_keys=True).encode()).hexdigest()
        prepare_run_dir(out, _run_identity(config, lm, corpus_hash, prompts_hash, layers))
    acts = out / "activations"
    with timer.stage(f"story activations ({len(stories)} stories)"):
        story_file = acts / "stories.safetensors"
        if story_file.exists():
            sm = load_text_means(story_file)
        else:
            sm = text_means(
                lm,
                [s.text for s in stories],
                layers,
                recipe.token_offset,
                add_special_tokens=True,
                max_batch_tokens=config.max_batch_tokens,
                checkpoint_dir=acts / "stories.ckpt",
                progress=config.progress,
                desc="story activations",
            )
            save_text_means(sm, story_file)
            clear_checkpoints(acts / "stories.ckpt")
    with timer.stage(f"neutral activations ({len(dialogues)} dialogues)"):
        neutral_file = acts / "neutral.safetensors"
        if neutral_file.exists():
            nm = load_neutral_moments(neutral_file)
        else:
            texts, special = _neutral_texts(lm, dialogues)
            nm = neutral_moments(
                lm,
                texts,
                layers,
                recipe.neutral_skip_first,
                special,
                max_batch_tokens=config.max_batch_tokens,
                progress=config.progress,
                checkpoint=acts / "neutral.ckpt.safetensors",
            )
            save_neutral_moments(nm, neutral_file)
            (acts / "neutral.ckpt.safetensors").unlink(missing_ok=True)
    implicit = prompts["implicit"]
    intensity = prompts["intensity"]
    intensity_texts = [t["template"].format(value=v) for t in intensity for v in t["values"]]
    with timer.stage("assistant-turn readouts"):
        prompt_file = acts / "prompts.safetensors"
        if prompt_file.exists():
            from safetensors.torch import load_file

            pr = load_file(str(prompt_file))
        else:
            pr = {
                "neutral": assistant_start_readouts(lm, _first_user_messages(dialogues), layers),
                "implicit": assistant_start_readouts(lm, [p["text"] for p in implicit], layers),
                "intensity": assistant_start_readouts(lm, intensity_texts, layers),
            }
            atomic_save(pr, prompt_file)

    with timer.stage("vectors and layer sweep"):
        index = {e: i for i, e in enumerate(emotions)}
        labels = torch.tensor([index[s.emotion] for s in stories])
        is_test = torch.tensor([s.split == "test" for s in stories])
        train = ~is_test
        train_topics = [s.topic for s, t in zip(stories, train.tolist()) if t]
        bases = {}
        cv: dict[tuple[float, int], Accuracy] = {}
        for i, layer in enumerate(layers):
            neutral_cov = (
                nm.cov[i] if recipe.neutral_pca == "tokens" else covariance_of(nm.text_means[:, i])
            )
            bases[layer] = neutral_basis(neutral_cov, recipe)
            by_level = cross_validated_accuracy(
                sm.means[train, i],
                labels[train],
                train_topics,
                len(emotions),
                bases[layer],
                recipe.story_levels,
                config.cv_folds,
            )
            cv.update({(level, layer): acc for level, acc in by_level.items()})
        level, default_layer = choose(cv)
        chosen = recipe.with_story_variance(level)
        per_layer: dict[int, LayerVectors] = {}
        stats: dict[str, torch.Tensor] = {}
        sweep: list[dict[str, Any]] = []
        for i, layer in enumerate(layers):
            x = sm.means[:, i]
            lv = build_layer(x[train], labels[train], len(emotions), bases[layer], chosen)
            per_layer[layer] = lv
            for name, value in _stats_for_layer(lv, nm, i, pr["neutral"][:, i]).items():
                stats[f"{name}.{layer}"] = value
            none = Accuracy(0, 0, 0)
            test_acc = (
                nearest_vector_accuracy(lv.vectors, lv.mean, x[is_test], labels[is_test])
                if is_test.any()
                else none
            )
            raw_acc = (
                nearest_vector_accuracy(lv.raw, lv.mean, x[is_test], labels[is_test])
                if is_test.any()
                else none
            )
            corr = _valence_r(lv.vectors, emotions)
            sweep.append(
                {
                    "layer": layer,
                    "test": _acc(test_acc),
                    "test_raw": _acc(raw_acc),
                    "cv_train": _acc(cv[(level, layer)]),
                    "pc1_valence_r": corr["pc1_valence"]["r"],
                    "projected_components": lv.n_components,
                    "neutral_components": int(bases[layer].shape[1]),
                    "residual_norm": float(nm.mean_norm[i]),
                }
            )
        selection = {
            "story_variance": level,
            "grid": list(recipe.story_levels),
            "cv_by_level": {
                str(lv_): max((cv[(lv_, la)].top1 + cv[(lv_, la)].top5) / 2 for la in layers)
                for lv_ in recipe.story_levels
            },
        }
        recipe = chosen
        two_thirds = two_thirds_layer(layers, lm.n_layers)

    with timer.stage("validation and geometry"):
        manifest = {
            "model": lm.name,
            "family": lm.adapter.family,
            "n_layers_model": lm.n_layers,
            "hidden_size": lm.hidden_size,
            "dtype": str(lm.dtype).removeprefix("torch."),
            "default_layer": default_layer,
            "default_layer_rule": "best cross-validated (train topics) top-1 + top-5, jointly with story_variance",
            "story_variance_selection": selection,
            "two_thirds_layer": two_thirds,
            "steer_layer": two_thirds,
            "corpus_sha256": corpus_hash,
            "n_stories_train": int(train.sum()),
            "n_stories_test": int(is_test.sum()),
            "n_neutral_dialogues": len(dialogues),
            "neutral_tokens": nm.count,
            "readout_mode": "centred",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        bank = bank_from_parts(emotions, per_layer, stats, manifest, recipe)
        analysis = analyse(lm, bank, sm, stories, pr, prompts, layers, default_layer)
        bank.save(out)

    report = {
        "emoscope_version": __version__,
        "model": lm.describe() | {"load_seconds": lm.load_seconds, "from_cache": lm.from_cache},
        "corpus": {
            "sha256": corpus_hash,
            "stories": len(stories),
            "train": int(train.sum()),
            "test": int(is_test.sum()),
            "emotions": len(emotions),
            "neutral_dialogues": len(dialogues),
            "short_stories": int(sm.short.sum()),
            "mean_tokens_averaged": float(sm.n_tokens.float().mean()),
        },
        "recipe": asdict(recipe),
        "story_variance_selection": selection,
        "default_layer": default_layer,
        "two_thirds_layer": two_thirds,
        "layer_sweep": sweep,
        **analysis,
    }
    d = next(s for s in sweep if s["layer"] == default_layer)
    report["summary"] = {
        "model": lm.name,
        "default_layer": default_layer,
        "test_top1": d["test"]["top1"],
        "test_top5": d["test"]["top5"],
        "cv_train_top1": d["cv_train"]["top1"],
        "cv_train_top5": d["cv_train"]["top5"],
        "pc1_valence_r": analysis["geometry"]["norms"]["pc1_valence"]["r"],
        "max_pc23_arousal_r": max(
            abs(analysis["geometry"]["norms"]["pc2_arousal"]["r"]),
            abs(analysis["geometry"]["norms"]["pc3_arousal"]["r"]),
        ),
        "implicit_accuracy": analysis["implicit"]["z_scored"]["accuracy"],
        "intensity_directions_held": analysis["intensity"]["held"],
        "intensity_directions_total": analysis["intensity"]["total"],
    }
    report["timings"] = {s.name: round(s.seconds, 2) for s in timer.stages}
    from emoscope.report import write_report

    with timer.stage("report"):
        write_report(report, bank, out)
    report["timings"] = {s.name: round(s.seconds, 2) for s in timer.stages}
    (out / "report.json").write_text(json.dumps(report, indent=1, default=float))
    return ExtractResult(bank, report, out)


def analyse(
    lm: LoadedModel,
    bank: EmotionVectors,
    sm: TextMeans,
    stories: Sequence[Story],
    pr: dict[str, torch.Tensor],
    prompts: dict[str, Any],
    layers: list[int],
    layer: int,
) -> dict[str, Any]:
    """Validation and geometry numbers for the report (all at ``layer`` unless stated)."""
    li = layers.index(layer)
    emotions = bank.emotions
    vectors = bank.vectors[layer]
    # Implicit prompts: the target among the 12 targets, raw centred and z-scored against neutral prompts.
    targets = [t for t in prompts["implicit_targets"] if t in emotions]
    rows = torch.tensor([emotions.index(t) for t in targets])
    usable = [i for i, p in enumerate(prompts["implicit"]) if p["emotion"] in targets]
    labels = [prompts["implicit"][i]["emotion"] for i in usable]
    implicit_readouts = pr["implicit"][usable]

    def implicit_at(lj: int, lay: int) -> tuple[dict[str, Any], dict[str, Any]]:
        scores = bank.scores(implicit_readouts[:, lj], lay)[:, rows]
        mean, std = (
            bank.stat("prompt_score_mean", lay)[rows],
            bank.stat("prompt_score_std", lay)[rows],
        )
        return (
            implicit_accuracy(z_scores(scores, mean, std), targets, labels),
            implicit_accuracy(scores, targets, labels),
        )

    by_layer = {lay: implicit_at(lj, lay) for lj, lay in enumerate(layers)}
    implicit_by_layer = [
        {"layer": lay, "z_scored": z["accuracy"], "centred": c["accuracy"]}
        for lay, (z, c) in by_layer.items()
    ]
    implicit = {
        "targets": targets,
        "layer": layer,
        "z_scored": by_layer[layer][0],
        "centred": by_layer[layer][1],
        "by_layer": implicit_by_layer,
        "prompts": [prompts["implicit"][i]["text"] for i in usable],
    }

    # Intensity templates: Spearman of each expected emotion's readout with the number.
    templates = []
    offset = 0
    held = total = 0
    for t in prompts["intensity"]:
        n = len(t["values"])
        readouts = bank.scores(pr["intensity"][offset : offset + n, li], layer)
        offset += n
        trends = {}
        for emotion, direction in t["expected"].items():
            if emotion not in emotions:
                continue
            trend = intensity_trend(
                t["values"], readouts[:, emotions.index(emotion)].tolist(), direction
            )
            trends[emotion] = trend
            held += trend["holds"]
            total += 1
        templates.append(
            {"id": t["id"], "template": t["template"], "values": t["values"], "trends": trends}
        )
    intensity = {"layer": layer, "templates": templates, "held": held, "total": total}

    # Geometry.
    sim = geometry.cosine_matrix(vectors)
    order = geometry.cluster_order(sim)
    clusters = geometry.kmeans_clusters(vectors, k=min(10, len(emotions)))
    p = geometry.pca(vectors, k=5)
    norms = human_norms(emotions)
    corr = geometry.norm_correlations(p.scores, emotions, norms)
    rsa_layers = (
        layers
        if len(layers) <= 14
        else [layers[round(i)] for i in np.linspace(0, len(layers) - 1, 14)]
    )
    rsa_l, rsa = geometry.representational_similarity(
        {lay: geometry.cosine_matrix(bank.vectors[lay]) for lay in rsa_layers}
    )
    by_cluster: dict[int, list[str]] = {}
    for e, c in zip(emotions, clusters):
        by_cluster.setdefault(c, []).append(e)
    valence_of = {
        c: float(np.mean([norms[e].valence for e in m if e in norms] or [5.0]))
        for c, m in by_cluster.items()
    }
    geometry_report = {
        "layer": layer,
        "cosine_order": [emotions[i] for i in order],
        "pca_variance_ratio": p.explained.tolist(),
        "pca_scores": {e: p.scores[i, :3].tolist() for i, e in enumerate(emotions)},
        "norms": corr,
        "n_rated": len(norms),
        "clusters": [
            sorted(by_cluster[c]) for c in sorted(by_cluster, key=lambda c: -valence_of[c])
        ],
        "nearest": geometry.nearest_neighbours(sim, emotions, 3),
        "rsa_layers": rsa_l,
        "rsa": rsa.tolist(),
        "rsa_mean_offdiag": float((rsa.sum() - np.trace(rsa)) / max(1, rsa.size - len(rsa))),
        "opposites": {e: emotions[int(np.argmin(sim[i]))] for i, e in enumerate(emotions)},
        "cosine": sim.round(4).tolist(),
    }
    lens_rows = [emotions.index(e) for e in CORE_EMOTIONS if e in emotions]
    lens = logit_lens(lm, vectors[lens_rows], k=10)
    per_emotion_test = _per_emotion_test(bank, sm, stories, layer)
    return {
        "implicit": implicit,
        "intensity": intensity,
        "geometry": geometry_report,
        "logit_lens": {emotions[r]: lens[i] for i, r in enumerate(lens_rows)},
        "per_emotion_test": per_emotion_test,
    }


def _per_emotion_test(
    bank: EmotionVectors, sm: TextMeans, stories: Sequence[Story], layer: int
) -> dict[str, Any]:
    """Rank of the true emotion for each test story, summarised per emotion."""
    test = [i for i, s in enumerate(stories) if s.split == "test"]
    if not test:
        return {}
    x = sm.at(layer)[test]
    scores = bank.scores(x, layer)
    out: dict[str, Any] = {}
    for row, i in enumerate(test):
        e = stories[i].emotion
        true = bank.emotions.index(e)
        rank = int((scores[row] > scores[row, true]).sum()) + 1
        entry = out.setdefault(e, {"ranks": [], "confused_with": []})
        entry["ranks"].append(rank)
        if rank > 1:
            entry["confused_with"].append(bank.emotions[int(scores[row].argmax())])
    return out
