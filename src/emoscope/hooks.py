"""The one place where emoscope touches a model: architecture adapters and residual-stream hooks.

Layer ``i`` always means the output of decoder block ``i`` (0-based), which is Hugging Face's
``hidden_states[i + 1]`` for every block but the last (HF applies the final norm to its last
entry; emoscope reports the block output itself there too).

Three context managers cover all uses, and all always remove their hooks, also on error:

- :class:`ResidualReader` records (or reduces on the fly) the residual stream at chosen layers;
- :func:`add_to_residual` adds vectors at chosen layers and token positions, during a single
  forward pass or across KV-cached generation steps;
- :func:`add_per_row` adds a different vector to each row of a batch, each at its own
  positions (used by :mod:`emoscope.engine`, where every request has its own steering).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from emoscope.errors import EmoscopeError, UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Where one architecture family keeps its decoder blocks, final norm and unembedding.

    Each attribute is a list of dotted paths tried in order, so one family covers both its
    text-only and its multimodal wrappers.
    """

    family: str
    layers_paths: tuple[str, ...]
    norm_paths: tuple[str, ...]
    unembed_paths: tuple[str, ...] = ("lm_head",)

    def _find(self, model: nn.Module, paths: tuple[str, ...], what: str) -> Any:
        for path in paths:
            obj: Any = model
            for part in path.split("."):
                obj = getattr(obj, part, None)
                if obj is None:
                    break
            if obj is not None:
                return obj
        raise UnsupportedArchitectureError(
            f"Could not find the {what} of this {self.family}-family model (tried {', '.join(paths)})."
        )

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return self._find(model, self.layers_paths, "decoder blocks")

    def final_norm(self, model: nn.Module) -> nn.Module:
        return self._find(model, self.norm_paths, "final norm")

    def unembed(self, model: nn.Module) -> nn.Module:
        return self._find(model, self.unembed_paths, "unembedding")

    def n_layers(self, model: nn.Module) -> int:
        return len(self.layers(model))

    def hidden_size(self, model: nn.Module) -> int:
        config = getattr(model.config, "text_config", None) or model.config
        for attr in ("hidden_size", "n_embd", "d_model"):
            if getattr(config, attr, None):
                return int(getattr(config, attr))
        return int(self.unembed(model).weight.shape[1])

    def input_device(self, model: nn.Module) -> torch.device:
        return execution_device(model.get_input_embeddings())

    def layer_device(self, model: nn.Module, layer: int) -> torch.device:
        """Where block ``layer``'s residual lives: with a model spread over devices (or offloaded),
        vectors go there once instead of following the input device."""
        return execution_device(self.layers(model)[layer])


def execution_device(module: nn.Module) -> torch.device:
    """The device a module computes on. accelerate's offloading keeps weights on ``meta`` and
    records where they are brought to run; otherwise it is where the first parameter is."""
    hook = getattr(module, "_hf_hook", None)
    for part in [hook, *getattr(hook, "hooks", ())]:  # a SequentialHook holds several
        device = getattr(part, "execution_device", None)
        if device is not None:
            return torch.device(device)
    for parameter in module.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return torch.device("cpu")


_DECODER = ("model.layers", "model.language_model.layers", "language_model.model.layers")
_NORM = ("model.norm", "model.language_model.norm", "language_model.model.norm")

FAMILIES: dict[str, ArchitectureAdapter] = {
    a.family: a
    for a in (
        ArchitectureAdapter("llama", _DECODER, _NORM),
        ArchitectureAdapter("mistral", _DECODER, _NORM),
        ArchitectureAdapter("qwen2", _DECODER, _NORM),
        ArchitectureAdapter("qwen3", _DECODER, _NORM),
        ArchitectureAdapter("gemma2", _DECODER, _NORM),
        ArchitectureAdapter("gemma3", _DECODER, _NORM),
        ArchitectureAdapter("phi3", _DECODER, _NORM),
        ArchitectureAdapter("olmo2", _DECODER, _NORM),
        ArchitectureAdapter("gpt2", ("transformer.h",), ("transformer.ln_f",)),
        ArchitectureAdapter(
            "gpt-neox",
            ("gpt_neox.layers",),
            ("gpt_neox.final_layer_norm",),
            ("embed_out", "lm_head"),
        ),
    )
}

# config.model_type -> family
MODEL_TYPES: dict[str, str] = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
    "olmo2": "olmo2",
    "gpt2": "gpt2",
    "gpt_neox": "gpt-neox",
}


def register_adapter(model_type: str, adapter: ArchitectureAdapter) -> None:
    """Teach emoscope a new architecture (``config.model_type``) without patching it."""
    FAMILIES[adapter.family] = adapter
    MODEL_TYPES[model_type] = adapter.family


def adapter_for(model: nn.Module) -> ArchitectureAdapter:
    model_type = getattr(model.config, "model_type", "?")
    family = MODEL_TYPES.get(model_type)
    if family is None:
        raise UnsupportedArchitectureError(
            f"Architecture '{model_type}' is not supported. Supported families: "
            f"{', '.join(sorted(FAMILIES))}. A new family can be added with "
            "emoscope.hooks.register_adapter()."
        )
    adapter = FAMILIES[family]
    adapter.layers(model)  # fail now, not in the middle of a run
    return adapter


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _with_hidden(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


class _StopForward(Exception):
    """Raised inside the last needed block so the rest of the model (and the LM head) never runs."""


class ResidualReader:
    """Record the residual stream at ``layers`` on every forward pass while the context is open.

    Args:
        model: the transformers model.
        adapter: its :class:`ArchitectureAdapter`.
        layers: block indices to read.
        transform: optional ``f(layer, hidden) -> tensor`` applied inside the hook, so that
            only the reduced result (a story mean, a score per emotion) is kept, never the
            per-token tensor.
        stop_after_last: skip every block after the last requested one (and the LM head);
            only for passes whose logits are not needed, see :meth:`run`.

    Example:
        >>> with ResidualReader(lm.model, lm.adapter, [3, 10]) as reader:
        ...     lm.model(**batch)
        >>> reader.readings[10][0].shape  # [batch, tokens, hidden]
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: ArchitectureAdapter,
        layers: Sequence[int],
        transform: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
        stop_after_last: bool = False,
    ) -> None:
        self.model, self.adapter = model, adapter
        self.layers = sorted(set(layers))
        if not self.layers:
            raise EmoscopeError("Name at least one layer to read.")
        self.transform = transform
        self.stop_after_last = stop_after_last
        self.readings: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.layers}
        self._handles: list[Any] = []

    def _hook(self, layer: int) -> Callable[..., None]:
        last = self.layers[-1]

        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            hidden = _hidden(output)
            value = self.transform(layer, hidden) if self.transform else hidden.detach()
            self.readings[layer].append(value)
            if self.stop_after_last and layer == last:
                raise _StopForward

        return hook

    def __enter__(self) -> ResidualReader:
        blocks = self.adapter.layers(self.model)
        for layer in self.layers:
            if not 0 <= layer < len(blocks):
                raise EmoscopeError(f"Layer {layer} is out of range (0..{len(blocks) - 1}).")
        try:
            for layer in self.layers:
                self._handles.append(blocks[layer].register_forward_hook(self._hook(layer)))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def run(self, **inputs: Any) -> None:
        """One forward pass (no gradients, no cache); returns early when ``stop_after_last``."""
        with torch.inference_mode(), suppress(_StopForward):
            self.model(**inputs, use_cache=False)

    def last(self, layer: int) -> torch.Tensor:
        return self.readings[layer][-1]

    def clear(self) -> None:
        for values in self.readings.values():
            values.clear()


class PassTracker:
    """Knows which absolute token positions the current forward pass covers.

    A pre-hook on the top-level model reads the KV cache length before each pass, so position
    rules keep working across the prefill and every decoding step of ``generate``.
    """

    def __init__(self) -> None:
        self.start = 0
        self.length: int | None = None

    def pre_hook(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        tokens = kwargs.get("input_ids")
        if tokens is None and args:
            tokens = args[0]
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        cache = kwargs.get("past_key_values")
        self.start = (
            int(cache.get_seq_length())
            if cache is not None and hasattr(cache, "get_seq_length")
            else 0
        )
        self.length = int(tokens.shape[1]) if tokens is not None else None


PositionRule = Callable[[int, int, torch.device], "torch.Tensor | None"]
"""``rule(start, length, device)`` -> a ``[batch or 1, length]`` weight for the positions
``start .. start+length-1`` of the padded sequence, or ``None`` to leave this pass alone."""


def all_positions(start: int, length: int, device: torch.device) -> torch.Tensor:
    return torch.ones(1, length, device=device)


def positions_from(first: int) -> PositionRule:
    """Every position from ``first`` on (e.g. the generated response: ``first`` = prompt length)."""

    def rule(start: int, length: int, device: torch.device) -> torch.Tensor | None:
        if start + length <= first:
            return None
        index = torch.arange(start, start + length, device=device)
        return (index >= first).float().unsqueeze(0)

    return rule


def positions_before(end: int) -> PositionRule:
    """Every position before ``end`` (e.g. the prompt)."""

    def rule(start: int, length: int, device: torch.device) -> torch.Tensor | None:
        if start >= end:
            return None
        index = torch.arange(start, start + length, device=device)
        return (index < end).float().unsqueeze(0)

    return rule


def positions_mask(mask: torch.Tensor) -> PositionRule:
    """An explicit ``[batch, tokens]`` mask over the padded sequence (later positions: none)."""

    def rule(start: int, length: int, device: torch.device) -> torch.Tensor | None:
        if start >= mask.shape[1]:
            return None
        part = mask[:, start : start + length].to(device=device, dtype=torch.float32)
        if part.shape[1] < length:
            part = torch.nn.functional.pad(part, (0, length - part.shape[1]))
        return part

    return rule


@contextmanager
def add_to_residual(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    additions: Mapping[int, torch.Tensor],
    positions: PositionRule = all_positions,
) -> Iterator[PassTracker]:
    """Add ``additions[layer]`` to the output of decoder block ``layer`` at chosen positions.

    Vectors are ``[hidden]`` (same for every row) or ``[batch, hidden]`` (one per row). The
    hooks are removed when the block exits, whatever happens inside it.

    Example:
        >>> with add_to_residual(lm.model, lm.adapter, {12: 4.0 * unit}, positions_from(n_prompt)):
        ...     lm.model.generate(**batch, max_new_tokens=20)
    """
    blocks = adapter.layers(model)
    tracker = PassTracker()
    handles = []
    prepared: dict[int, torch.Tensor] = {}
    for layer, vector in additions.items():
        if not 0 <= layer < len(blocks):
            raise EmoscopeError(f"Layer {layer} is out of range (0..{len(blocks) - 1}).")
        if vector.dim() not in (1, 2):
            raise EmoscopeError("Steering vectors must be [hidden] or [batch, hidden].")
        prepared[layer] = vector if vector.dim() == 2 else vector.unsqueeze(0)

    def make_hook(layer: int) -> Callable[..., Any]:
        def hook(module: nn.Module, _inputs: Any, output: Any) -> Any:
            hidden = _hidden(output)
            length = hidden.shape[1]
            start = tracker.start if tracker.length == length else 0
            weight = positions(start, length, hidden.device)
            if weight is None:
                return output
            delta = prepared[layer]
            if delta.device != hidden.device or delta.dtype != hidden.dtype:
                delta = prepared[layer] = delta.to(hidden.device, hidden.dtype)
            hidden = hidden + weight.to(hidden.dtype).unsqueeze(-1) * delta.unsqueeze(1)
            return _with_hidden(output, hidden)

        return hook

    try:
        handles.append(model.register_forward_pre_hook(tracker.pre_hook, with_kwargs=True))
        for layer in prepared:
            # Prepended, so a reader on the same block sees the steered residual.
            handles.append(blocks[layer].register_forward_hook(make_hook(layer), prepend=True))
        yield tracker
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class RowAddition:
    """A different vector for every row of a batch: ``weight[r, t] * vectors[r]`` at token ``t``.

    ``vectors`` is ``[rows, hidden]`` (zeros for rows left alone) and ``weight`` is
    ``[rows, tokens]``, so each row chooses its own positions (prompt, reply, a span).
    """

    vectors: torch.Tensor
    weight: torch.Tensor


@contextmanager
def add_per_row(
    model: nn.Module, adapter: ArchitectureAdapter, additions: Mapping[int, RowAddition]
) -> Iterator[None]:
    """Add each row's own vector to the output of decoder block ``layer``, in float32.

    One batched operation per layer, whatever the number of rows: the residual is lifted to
    float32, the weighted vectors are added and the sum is cast back. A row whose vector (or
    weight) is zero comes out bit-identical, also in bfloat16, so steering one request never
    disturbs its neighbours. Hooks are prepended (a reader on the same block sees the steered
    residual) and removed on exit, also on error.
    """
    blocks = adapter.layers(model)
    for layer, addition in additions.items():
        if not 0 <= layer < len(blocks):
            raise EmoscopeError(f"Layer {layer} is out of range (0..{len(blocks) - 1}).")
        if addition.vectors.dim() != 2 or addition.weight.dim() != 2:
            raise EmoscopeError(
                "Per-row additions need [rows, hidden] vectors and [rows, tokens] weights."
            )

    def make_hook(addition: RowAddition) -> Callable[..., Any]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
            hidden = _hidden(output)
            weight = addition.weight.to(hidden.device, torch.float32).unsqueeze(-1)
            vectors = addition.vectors.to(hidden.device, torch.float32).unsqueeze(1)
            return _with_hidden(output, (hidden.float() + weight * vectors).to(hidden.dtype))

        return hook

    handles = []
    try:
        for layer, addition in additions.items():
            handles.append(blocks[layer].register_forward_hook(make_hook(addition), prepend=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
