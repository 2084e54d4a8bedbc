"""The emotion vector bank: build it from story and neutral activations, save, load and read it.

Recipe (Sofroniew et al., 2026): per layer, the mean activation over each emotion's training
stories minus the mean of those per-emotion means; then project out the top principal components
of emotionally neutral text (enough to explain ``neutral_variance`` of its variance); then scale
to unit length. The unprojected ("raw") vectors are kept as well.

emoscope adds one optional denoising step, off in the paper's recipe: also project out the top
principal components of the *within-emotion* story variation (``story_variance``), the
directions along which stories of one emotion differ from each other (topic, setting, narrator,
writing style). Chosen by cross-validation within the training split, it sharpens held-out
accuracy on unseen topics.

On disk a bank is a folder:

- ``vectors.safetensors``: ``layer.{i}`` float32 ``[emotions, hidden]`` unit rows, manifest order;
- ``stats.safetensors``: per layer ``mean.{i}`` (the centring point), ``neutral_mean.{i}`` and
  ``residual_norm.{i}`` (average residual norm on neutral text); per layer and emotion
  ``raw.{i}``, ``neutral_score_mean.{i}`` / ``neutral_score_std.{i}`` (each emotion's centred
  readout over neutral-text tokens) and ``prompt_score_mean.{i}`` / ``prompt_score_std.{i}``
  (the same at the start of the assistant turn of neutral prompts);
- ``manifest.json``: model, layers, default layer, every recipe choice, corpus hash, version.

A bank may also hold *families* of vectors built from other corpora (speaker and deflection
vectors, :mod:`emoscope.speakers`). Family ``f`` stores ``{f}.layer.{i}`` ``[its emotions,
hidden]`` in ``vectors.safetensors`` and its own statistics as ``{f}.{name}.{i}`` in
``stats.safetensors``; ``manifest.json`` lists it under ``families: {f: {emotions, source,
default_layer}}``. The story vectors keep their plain names, so readers that know nothing of
families still work. :meth:`EmotionBank.family` gives a family as a bank of its own, which
:class:`~emoscope.monitor.Monitor`, :class:`~emoscope.steer.Steerer`, the exports and the report
accept like any other.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from emoscope import __version__
from emoscope.concepts import resolve_emotion, resolve_emotions
from emoscope.errors import BankMismatchError, EmoscopeError
from emoscope.files import atomic_save_tensors, atomic_write_json

BANK_FORMAT = "emoscope-bank/1"
READOUT_MODES = ("projection", "cosine", "centred")
PER_EMOTION_STATS = frozenset(
    {
        "raw",
        "neutral_score_mean",
        "neutral_score_std",
        "prompt_score_mean",
        "prompt_score_std",
        "user_score_mean",
        "user_score_std",
    }
)
FAMILY_STATS = PER_EMOTION_STATS | {"mean"}
"""The statistics a family has of its own; the others (neutral mean, residual norm) are shared."""
STORY_FAMILY = "story"
"""The name of a bank's own (story) vectors wherever a family is asked for."""
NEUTRAL_PCA_MODES = ("tokens", "texts")


@dataclass(frozen=True)
class Recipe:
    """Every choice the paper leaves open, with emoscope's default; all go into the manifest."""

    token_offset: int = 50
    """Story tokens before this offset are not averaged (the emotion is not yet apparent)."""
    neutral_variance: float = 0.5
    """Fraction of neutral-text variance whose principal components are projected out (0: none)."""
    neutral_pca: str = "tokens"
    """Fit the neutral PCA over token positions (``tokens``) or over per-dialogue means (``texts``)."""
    neutral_skip_first: int = 1
    """Neutral positions skipped at the start of each dialogue (the attention-sink token)."""
    story_variance: float | str = "auto"
    """Fraction of within-emotion story variance whose principal components are also projected
    out (0: the paper's recipe). ``auto`` picks it from ``story_variance_grid`` together with the
    default layer, by cross-validation over training topics."""
    story_variance_grid: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
    centring: str = "mean-of-emotion-means"
    story_format: str = "raw"
    """Stories are read as plain text, not wrapped in a chat turn."""

    def __post_init__(self) -> None:
        if not 0 <= self.neutral_variance < 1:
            raise EmoscopeError(
                f"neutral_variance must be in [0, 1) (got {self.neutral_variance})."
            )
        if self.neutral_pca not in NEUTRAL_PCA_MODES:
            raise EmoscopeError(f"neutral_pca must be one of {NEUTRAL_PCA_MODES}.")
        if self.token_offset < 0:
            raise EmoscopeError("token_offset must be >= 0.")
        if self.story_variance != "auto" and not (
            isinstance(self.story_variance, int | float) and 0 <= self.story_variance < 1
        ):
            raise EmoscopeError(
                f"story_variance must be 'auto' or in [0, 1) (got {self.story_variance!r})."
            )

    def with_story_variance(self, value: float) -> Recipe:
        from dataclasses import replace

        return replace(self, story_variance=float(value))

    @property
    def story_levels(self) -> tuple[float, ...]:
        return (
            self.story_variance_grid
            if self.story_variance == "auto"
            else (float(self.story_variance),)
        )


SINK_NORM_RATIO = 4.0
"""A token whose residual norm exceeds this multiple of the layer's neutral-text average is an
attention sink, and every readout leaves it out. Measured: ordinary tokens stay within 1.5x on
SmolLM2 and Gemma 3; the sink reaches 12-145x on SmolLM2 (layers 15-28) and 6-16x on Gemma 3
(layers 6-12)."""


def centred_scores(
    hidden: torch.Tensor, vectors: torch.Tensor, centre: torch.Tensor | None = None
) -> torch.Tensor:
    """``(hidden - centre) @ vectors.T``: every centred readout in emoscope goes through here.

    Computed as ``hidden @ vectors.T - centre @ vectors.T`` so that a batch of token states is
    never copied to subtract the centre; ``centre=None`` gives the plain projection.
    """
    h = hidden.float()
    v = vectors.to(h.device, torch.float32)
    scores = h @ v.T
    if centre is not None:
        scores = scores - centre.to(h.device, torch.float32) @ v.T
    return scores


def two_thirds_layer(layers: Sequence[int], n_layers: int | None = None) -> int:
    """The available layer nearest two thirds of the model's depth (the paper's "mid-late" layer).

    ``n_layers`` is the model's depth; without it the deepest available layer stands in.
    """
    depth = n_layers if n_layers is not None else max(layers) + 1
    target = round(2 / 3 * (depth - 1))
    return min(layers, key=lambda layer: (abs(layer - target), layer))


def class_means(x: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """``[n_classes, hidden]`` mean of the rows of ``x`` with each label (all classes needed)."""
    sums = torch.zeros(n_classes, x.shape[1], dtype=torch.float64).index_add_(0, labels, x.double())
    counts = torch.bincount(labels, minlength=n_classes).double()
    if (counts == 0).any():
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise EmoscopeError(f"No training stories for emotion indices {missing}.")
    return (sums / counts.unsqueeze(1)).float()


def eigen(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, clamped at 0) and eigenvectors of a covariance, in float64."""
    values, vectors = torch.linalg.eigh(cov.double())
    return values.flip(0).clamp(min=0), vectors.flip(1)


def top_components(values: torch.Tensor, vectors: torch.Tensor, variance: float) -> torch.Tensor:
    """``[hidden, k]`` leading eigenvectors that together explain ``variance`` (from :func:`eigen`)."""
    if variance <= 0:
        return torch.zeros(vectors.shape[0], 0)
    share = values.cumsum(0) / values.sum()
    k = int((share < variance).sum()) + 1
    return vectors[:, :k].float()


def principal_components(cov: torch.Tensor, variance: float) -> torch.Tensor:
    """``[hidden, k]`` top eigenvectors of ``cov`` that together explain ``variance``."""
    if variance <= 0:
        return torch.zeros(cov.shape[0], 0)
    return top_components(*eigen(cov), variance)


def orthonormal_span(columns: torch.Tensor, tolerance: float = 1e-6) -> torch.Tensor:
    """An orthonormal basis of the span of ``columns`` (rank-aware: dependent columns drop out)."""
    if columns.shape[1] == 0:
        return columns
    u, s, _ = torch.linalg.svd(columns.double(), full_matrices=False)
    rank = int((s > tolerance * s.max()).sum())
    if rank >= columns.shape[0]:
        raise EmoscopeError(
            "The directions to project out span the whole residual space; lower neutral_variance "
            "or story_variance."
        )
    return u[:, :rank].float()


def project_out(v: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    return v - (v @ basis) @ basis.T if basis.numel() else v


def unit_rows(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def covariance_of(rows: torch.Tensor) -> torch.Tensor:
    centred = rows.double() - rows.double().mean(dim=0)
    return centred.T @ centred / max(1, rows.shape[0] - 1)


@dataclass
class LayerVectors:
    """One layer's vectors and the statistics readouts and steering need."""

    vectors: torch.Tensor
    raw: torch.Tensor
    mean: torch.Tensor
    n_components: int


def neutral_basis(neutral_cov: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """``[hidden, k]`` neutral-text principal components to project out."""
    return principal_components(neutral_cov, recipe.neutral_variance)


def build_layers(
    story_means: torch.Tensor,
    labels: torch.Tensor,
    n_emotions: int,
    basis: torch.Tensor,
    story_variances: Sequence[float],
) -> list[LayerVectors]:
    """Vectors for one layer at several story-variance levels, from one eigendecomposition.

    ``story_means`` is ``[stories, hidden]`` with integer ``labels``; ``basis`` holds the neutral
    components (:func:`neutral_basis`). Level ``v`` additionally projects out the within-emotion
    story directions that explain ``v`` of the stories' variance around their emotion's mean.
    """
    per_emotion = class_means(story_means, labels, n_emotions)
    centre = per_emotion.mean(dim=0)
    diff = per_emotion - centre
    within = (
        eigen(covariance_of(story_means - per_emotion[labels]))
        if any(v > 0 for v in story_variances)
        else None
    )
    out = []
    for variance in story_variances:
        full = basis
        if variance > 0 and within is not None:
            full = orthonormal_span(torch.cat([basis, top_components(*within, variance)], dim=1))
        out.append(
            LayerVectors(unit_rows(project_out(diff, full)), unit_rows(diff), centre, full.shape[1])
        )
    return out


def build_layer(
    story_means: torch.Tensor,
    labels: torch.Tensor,
    n_emotions: int,
    basis: torch.Tensor,
    recipe: Recipe,
) -> LayerVectors:
    """:func:`build_layers` at the recipe's story variance (a number here; the caller resolves
    ``auto``)."""
    level = float(recipe.story_variance)  # type: ignore[arg-type]
    return build_layers(story_means, labels, n_emotions, basis, [level])[0]


@dataclass
class EmotionBank:
    """A bank of unit emotion vectors at one or more layers, plus what readouts need.

    Example:
        >>> bank = EmotionBank.load("runs/demo", model=lm)
        >>> bank.vector("calm", bank.default_layer).shape
        torch.Size([576])
    """

    emotions: list[str]
    layers: list[int]
    vectors: dict[int, torch.Tensor]
    stats: dict[str, torch.Tensor]
    manifest: dict[str, Any] = field(default_factory=dict)
    family_vectors: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)
    """``{family: {layer: [emotions, hidden]}}`` (see :meth:`family`)."""

    @property
    def families(self) -> list[str]:
        """The vector families this bank holds besides its story vectors."""
        return list(self.family_vectors)

    def family(self, name: str | None) -> EmotionBank:
        """One family as a bank of its own: its emotions, vectors, centring point, calibration
        and default layer; ``story`` (or ``None``) is the bank itself.

        Example:
            >>> present = bank.family("present")        # the present-speaker vectors
            >>> es.Monitor(lm, present).score(chat_text)
        """
        if name in (STORY_FAMILY, None):
            return self
        if name not in self.family_vectors:
            held = ", ".join([STORY_FAMILY, *self.family_vectors])
            hint = (
                ""
                if self.family_vectors
                else " (it was built before speaker families existed: re-run `emoscope extract`)"
            )
            raise EmoscopeError(f"This bank has no '{name}' vector family{hint}; it holds: {held}.")
        info = self.manifest.get("families", {}).get(name, {})
        prefix = f"{name}."
        stats = {key: value for key, value in self.stats.items() if _is_shared_stat(key)}
        stats.update(
            {
                key[len(prefix) :]: value
                for key, value in self.stats.items()
                if key.startswith(prefix)
            }
        )
        manifest = {k: v for k, v in self.manifest.items() if k != "families"}
        manifest.update(
            emotions=list(info["emotions"]),
            default_layer=info.get("default_layer"),
            vector_family=name,
            vector_family_source=info.get("source"),
        )
        return EmotionBank(
            list(info["emotions"]), list(self.layers), self.family_vectors[name], stats, manifest
        )

    def add_family(
        self,
        name: str,
        emotions: Sequence[str],
        layer_vectors: Mapping[int, LayerVectors],
        statistics: Mapping[str, torch.Tensor],
        info: Mapping[str, Any],
    ) -> None:
        """Store a family built at every layer of the bank; ``statistics`` are keyed
        ``{stat}.{layer}`` (the family's own, :data:`FAMILY_STATS`) and ``info`` goes into the
        manifest beside its emotions (``source``, ``default_layer``, ...)."""
        if name == STORY_FAMILY or not name.isidentifier():
            raise EmoscopeError(f"'{name}' cannot name a vector family.")
        if sorted(layer_vectors) != self.layers:
            raise EmoscopeError(f"Family '{name}' must have vectors at every layer of the bank.")
        self.family_vectors[name] = {layer: lv.vectors for layer, lv in layer_vectors.items()}
        for layer, lv in layer_vectors.items():
            self.stats[f"{name}.raw.{layer}"] = lv.raw
            self.stats[f"{name}.mean.{layer}"] = lv.mean
        for key, value in statistics.items():
            if key.rsplit(".", 1)[0] in FAMILY_STATS:
                self.stats[f"{name}.{key}"] = value
        families = dict(self.manifest.get("families") or {})
        families[name] = {"emotions": list(emotions), **info}
        self.manifest["families"] = families

    @property
    def default_layer(self) -> int:
        layer = self.manifest.get("default_layer")
        return int(layer) if layer is not None else two_thirds_layer(self.layers, self._depth)

    @property
    def steer_layer(self) -> int:
        """Default steering layer: about two thirds of the depth (the paper's "mid-late" layer)."""
        layer = self.manifest.get("steer_layer")
        if layer is not None and int(layer) in self.vectors:
            return int(layer)
        return two_thirds_layer(self.layers, self._depth)

    @property
    def _depth(self) -> int | None:
        depth = self.manifest.get("n_layers_model")
        return int(depth) if depth is not None else None

    @property
    def model_name(self) -> str:
        return str(self.manifest.get("model", "?"))

    @property
    def hidden_size(self) -> int:
        return int(next(iter(self.vectors.values())).shape[1])

    def check_layer(self, layer: int | None) -> int:
        if layer is None:
            return self.default_layer
        if layer not in self.vectors:
            raise EmoscopeError(
                f"Layer {layer} is not in this bank (it has layers {self.layers[0]}..{self.layers[-1]}: "
                f"{', '.join(map(str, self.layers))})."
            )
        return layer

    def index(self, emotion: str) -> int:
        name = resolve_emotion(emotion)
        if name not in self.emotions:
            raise EmoscopeError(f"Emotion '{name}' is not in this bank.")
        return self.emotions.index(name)

    def vector(self, emotion: str, layer: int | None = None) -> torch.Tensor:
        return self.vectors[self.check_layer(layer)][self.index(emotion)]

    def stat(self, name: str, layer: int) -> torch.Tensor:
        key = f"{name}.{layer}"
        if key not in self.stats:
            raise EmoscopeError(f"This bank has no '{name}' statistics for layer {layer}.")
        return self.stats[key]

    def residual_norm(self, layer: int) -> float:
        return float(self.stat("residual_norm", layer))

    def subset(
        self, emotions: Sequence[str] | None = None, layers: Sequence[int] | None = None
    ) -> EmotionBank:
        """A bank restricted to some emotions and/or layers (statistics follow; families, which
        have emotions of their own, are left out: take :meth:`family` first to subset one)."""
        names = resolve_emotions(emotions) if emotions is not None else list(self.emotions)
        rows = torch.tensor([self.index(n) for n in names])
        keep = [
            self.check_layer(layer) for layer in (layers if layers is not None else self.layers)
        ]
        vectors = {layer: self.vectors[layer][rows] for layer in keep}
        stats = {}
        for key, value in self.stats.items():
            name, layer = key.rsplit(".", 1)
            if int(layer) in keep and "." not in name:
                stats[key] = value[rows] if name in PER_EMOTION_STATS else value
        manifest = dict(self.manifest, emotions=names, layers=keep)
        manifest.pop("families", None)
        if manifest.get("default_layer") not in keep:
            manifest["default_layer"] = two_thirds_layer(keep, self._depth)
        return EmotionBank(names, keep, vectors, stats, manifest)

    def check_model(self, model: Any, allow_other_model: bool = False) -> None:
        """Refuse to be used with a model other than the one the bank was built from.

        ``allow_other_model`` accepts a different name (the same weights saved elsewhere); the
        hidden size and layer count must still fit.
        """
        hidden = getattr(model, "hidden_size", None)
        name = getattr(model, "name", None)
        if hidden is not None and hidden != self.hidden_size:
            raise BankMismatchError(
                f"This bank was built for '{self.model_name}' (hidden size {self.hidden_size}); "
                f"the model in use, '{name}', has hidden size {hidden}."
            )
        if name is not None and name != self.model_name and not allow_other_model:
            raise BankMismatchError(
                f"This bank was built for model '{self.model_name}', not '{name}'. Extract a bank "
                "for this model with `emoscope extract`, or pass allow_other_model=True if the two "
                "are the same weights under different names."
            )
        n_layers = getattr(model, "n_layers", None)
        if n_layers is not None and max(self.layers) >= n_layers:
            raise BankMismatchError(
                f"This bank uses layer {max(self.layers)}; the model has {n_layers} layers."
            )

    def scores(
        self, hidden: torch.Tensor, layer: int | None = None, mode: str = "centred"
    ) -> torch.Tensor:
        """Readout of ``hidden`` (``[..., hidden]``) on every emotion: ``[..., emotions]``.

        Modes: ``projection`` (dot product with the unit vector), ``cosine`` (divided by the
        activation's norm), ``centred`` (projection after subtracting the bank's centring point).
        """
        layer = self.check_layer(layer)
        vectors = self.vectors[layer]
        if mode == "centred":
            return centred_scores(hidden, vectors, self.stat("mean", layer))
        if mode == "projection":
            return centred_scores(hidden, vectors)
        if mode == "cosine":
            norm = hidden.float().norm(dim=-1, keepdim=True).clamp(min=1e-12)
            return centred_scores(hidden, vectors) / norm
        raise EmoscopeError(f"Unknown readout mode '{mode}' (use {', '.join(READOUT_MODES)}).")

    def save(self, folder: Path | str) -> Path:
        """Write the bank's three files; each appears complete or not at all."""
        folder = Path(folder)
        tensors = {f"layer.{layer}": self.vectors[layer].float() for layer in self.layers}
        for name, by_layer in self.family_vectors.items():
            tensors.update({f"{name}.layer.{layer}": v.float() for layer, v in by_layer.items()})
        atomic_save_tensors(tensors, folder / "vectors.safetensors")
        atomic_save_tensors(
            {k: v.float() if v.is_floating_point() else v for k, v in self.stats.items()},
            folder / "stats.safetensors",
        )
        manifest = dict(
            self.manifest,
            format=BANK_FORMAT,
            emotions=self.emotions,
            layers=self.layers,
            hidden_size=self.hidden_size,
            emoscope_version=self.manifest.get("emoscope_version", __version__),
        )
        atomic_write_json(folder / "manifest.json", manifest)
        return folder

    @classmethod
    def load(
        cls, folder: Path | str, model: Any = None, allow_other_model: bool = False
    ) -> EmotionBank:
        """Read a bank folder; with ``model``, refuse one built for a different model.

        A damaged bank (a manifest without its keys, a layer missing from the vectors) is
        reported as such, never as a bare ``KeyError``.
        """
        folder = Path(folder)
        manifest_path = folder / "manifest.json"
        if not manifest_path.exists():
            raise EmoscopeError(
                f"{folder} is not a vector bank (no manifest.json). Run `emoscope extract` first."
            )
        try:
            manifest = json.loads(manifest_path.read_text("utf-8"))
        except ValueError as exc:
            raise EmoscopeError(f"{manifest_path} is not valid JSON: {exc}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != BANK_FORMAT:
            found = manifest.get("format") if isinstance(manifest, dict) else None
            raise EmoscopeError(f"{folder} holds format {found!r}, expected {BANK_FORMAT}.")
        emotions, layers, hidden_size = _manifest_shape(manifest, manifest_path)
        try:
            tensors = load_file(str(folder / "vectors.safetensors"))
            stats = (
                load_file(str(folder / "stats.safetensors"))
                if (folder / "stats.safetensors").exists()
                else {}
            )
        except Exception as exc:
            raise EmoscopeError(f"Cannot read the bank in {folder}: {exc}") from None
        missing = [layer for layer in layers if f"layer.{layer}" not in tensors]
        if missing:
            raise EmoscopeError(
                f"{folder / 'vectors.safetensors'} has no vectors for layer(s) "
                f"{', '.join(map(str, missing))} that the manifest lists; the bank is damaged. "
                "Re-run `emoscope extract`."
            )
        vectors = {layer: tensors[f"layer.{layer}"] for layer in layers}
        for layer, v in vectors.items():
            if tuple(v.shape) != (len(emotions), hidden_size):
                raise EmoscopeError(
                    f"layer.{layer} has shape {tuple(v.shape)}; the manifest says "
                    f"({len(emotions)}, {hidden_size})."
                )
        families = _load_families(manifest, tensors, layers, hidden_size, folder)
        bank = cls(emotions, layers, vectors, stats, manifest, families)
        if model is not None:
            bank.check_model(model, allow_other_model)
        return bank


def _load_families(
    manifest: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    layers: Sequence[int],
    hidden_size: int,
    folder: Path,
) -> dict[str, dict[int, torch.Tensor]]:
    """The families the manifest lists, each checked against its tensors."""
    listed = manifest.get("families") or {}
    if not isinstance(listed, dict):
        raise EmoscopeError(f"{folder / 'manifest.json'}: 'families' must be an object.")
    out: dict[str, dict[int, torch.Tensor]] = {}
    for name, info in listed.items():
        emotions = info.get("emotions") if isinstance(info, dict) else None
        if not isinstance(emotions, list) or not emotions:
            raise EmoscopeError(
                f"{folder / 'manifest.json'}: family '{name}' lists no emotions; the bank is "
                "damaged. Re-run `emoscope extract`."
            )
        by_layer = {}
        for layer in layers:
            v = tensors.get(f"{name}.layer.{layer}")
            if v is None or tuple(v.shape) != (len(emotions), hidden_size):
                found = "missing" if v is None else f"shape {tuple(v.shape)}"
                raise EmoscopeError(
                    f"{folder / 'vectors.safetensors'}: {name}.layer.{layer} is {found}; the "
                    f"manifest says ({len(emotions)}, {hidden_size}). Re-run `emoscope extract`."
                )
            by_layer[layer] = v
        out[str(name)] = by_layer
    return out


def _is_shared_stat(key: str) -> bool:
    """A story statistic that every family shares (``neutral_mean.{i}``, ``residual_norm.{i}``)."""
    name = key.rsplit(".", 1)[0]
    return "." not in name and name not in FAMILY_STATS


def _manifest_shape(manifest: Mapping[str, Any], path: Path) -> tuple[list[str], list[int], int]:
    """The emotions, layers and hidden size a manifest promises, checked for type."""
    missing = [key for key in ("emotions", "layers", "hidden_size") if key not in manifest]
    if missing:
        raise EmoscopeError(
            f"{path} lacks {', '.join(repr(k) for k in missing)}; the bank is damaged. "
            "Re-run `emoscope extract`."
        )
    emotions, layers, hidden_size = (
        manifest["emotions"],
        manifest["layers"],
        manifest["hidden_size"],
    )
    if (
        not isinstance(emotions, list)
        or not all(isinstance(e, str) for e in emotions)
        or not isinstance(layers, list)
        or not all(isinstance(x, int) for x in layers)
        or not layers
        or not isinstance(hidden_size, int)
    ):
        raise EmoscopeError(
            f"{path}: 'emotions' must be a list of names, 'layers' a non-empty list of integers "
            "and 'hidden_size' an integer; the bank is damaged. Re-run `emoscope extract`."
        )
    return list(emotions), [int(x) for x in layers], int(hidden_size)


def bank_from_parts(
    emotions: Sequence[str],
    layer_vectors: Mapping[int, LayerVectors],
    extra_stats: Mapping[str, torch.Tensor],
    manifest: Mapping[str, Any],
    recipe: Recipe,
) -> EmotionBank:
    layers = sorted(layer_vectors)
    stats = dict(extra_stats)
    for layer, lv in layer_vectors.items():
        stats[f"raw.{layer}"] = lv.raw
        stats[f"mean.{layer}"] = lv.mean
    full_manifest = dict(manifest)
    full_manifest.update(
        recipe=asdict(recipe),
        token_offset=recipe.token_offset,
        neutral_variance=recipe.neutral_variance,
        neutral_components={str(layer): lv.n_components for layer, lv in layer_vectors.items()},
        emoscope_version=__version__,
    )
    return EmotionBank(
        list(emotions),
        layers,
        {layer: layer_vectors[layer].vectors for layer in layers},
        stats,
        full_manifest,
    )
