"""Continuous-batching decoding: requests join and leave a running batch between steps.

:func:`emoscope.generation.decode_steps` runs one static batch: every row waits for the longest,
no request can join until the batch ends, and all rows share one steering and one set of
readouts. The :class:`Engine` keeps a queue of :class:`Request` objects instead, each with its
own sampling, steering and monitored emotions, and every :meth:`Engine.step` advances each
running request by one token.

How it works:

- KV cache: one slot per running request, allocated once per layer as
  ``[max_batch, kv_heads, max_tokens, head_dim]`` and reused. A request's token ``i`` sits at
  cache index ``i`` (its position). Running requests occupy slots ``0..n-1``; when one leaves,
  the last one moves into its slot, so a decode step attends over a view of the first ``n``
  slots and never gathers the cache.
- Prefill: newly admitted requests run together as one left-padded forward pass (the same
  arithmetic as :func:`~emoscope.generation.decode_steps`); their keys and values are written
  into their slots from index 0, and each request gets its first token.
- Decode: one forward pass for every running request, each row at its own position, with an
  attention mask over its own valid cache entries (and the sliding window where the model has
  one).
- Steering and readouts run inside those passes as one batched operation per hooked layer: a
  ``[rows, hidden]`` matrix added with a per-row position weight
  (:func:`emoscope.hooks.add_per_row`), and ``[rows, hidden] @ [emotions, hidden].T`` over the
  union of the emotions any running request monitors, split per request afterwards.

A request's greedy output does not depend on its neighbours or on when it joined, and a steered
request leaves the others untouched. The engine is single-threaded: call :meth:`Engine.step`
(or iterate a :class:`RequestHandle`) from one thread.
"""

from __future__ import annotations

import inspect
import itertools
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from emoscope.batching import padding_id
from emoscope.errors import EmoscopeError, UnsupportedArchitectureError
from emoscope.generation import SamplingConfig, eos_ids
from emoscope.hooks import ResidualReader, RowAddition, add_per_row
from emoscope.vectors import READOUT_MODES, SINK_NORM_RATIO, EmotionBank, centred_scores

if TYPE_CHECKING:
    from emoscope.steer import Steering

_UNBOUNDED = 2**62
DEFAULT_MAX_BATCH = 64
"""Slots of an engine built for a known set of prompts. On a 2-core CPU SmolLM2-135M decodes
91 tokens/s at 16 rows, 180 at 64 and 239 at 128 (``bench/generation.py``); 64 keeps the
cache of long replies within a few hundred MB while taking most of that gain."""
_POSITIONS = ("all", "prompt", "response")


@dataclass(frozen=True)
class Request:
    """One generation job: a prompt and everything that is its own.

    Args:
        prompt: token ids, or a string (chat-formatted as one user turn unless ``chat=False``).
        sampling: how to pick its tokens (``max_new_tokens``, temperature, top-p, seed, EOS,
            repetition penalty).
        steering: a :class:`~emoscope.steer.Steering` (needs the engine's bank), or ready-made
            vectors ``{layer: [hidden] tensor}`` already scaled.
        positions: where ready-made vectors apply: ``all``, ``prompt``, ``response`` or a
            ``(start, end)`` span of token indices (a ``Steering`` carries its own).
        emotions: monitored emotions, as names or indices into the engine's bank; each token
            then comes with its readout. ``None`` monitors nothing.
        on_token: called with every :class:`TokenEvent` of this request, at the end of the step
            that made it.
    """

    prompt: str | Sequence[int]
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    _: KW_ONLY
    chat: bool = True
    steering: Steering | Mapping[int, torch.Tensor] | None = None
    positions: str | tuple[int, int] = "all"
    emotions: Sequence[str | int] | None = None
    on_token: Callable[[TokenEvent], None] | None = None


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of one request, with the readout of the state that chose it."""

    request_id: int
    index: int
    """0-based index of the token within the reply."""
    token_id: int
    scores: torch.Tensor | None
    """``[emotions]`` float32 centred readouts, in the request's emotion order (None: not
    monitored)."""
    z: torch.Tensor | None
    """``[emotions]`` z-scores against neutral text (NaN at attention sinks; None without the
    bank's neutral statistics)."""
    sink: bool
    finished: bool
    reason: str | None
    """``eos`` or ``length`` on a request's last token, else None."""


class RequestHandle:
    """A submitted request: its state, its tokens and readouts so far, and ways to follow it.

    Iterating a handle streams its :class:`TokenEvent` objects, stepping the engine whenever
    none is ready (other requests advance too). :meth:`result` runs it to the end.
    """

    def __init__(
        self, engine: Engine, request_id: int, request: Request, prompt_ids: list[int]
    ) -> None:
        self._engine = engine
        self.id = request_id
        self.request = request
        self.prompt_ids = prompt_ids
        self.emotions: list[str] = []
        self.status = "waiting"
        self.finish_reason: str | None = None
        self.events: list[TokenEvent] = []

    def __repr__(self) -> str:
        return (
            f"RequestHandle(id={self.id}, status={self.status}, tokens={len(self.events)}, "
            f"finish_reason={self.finish_reason})"
        )

    @property
    def done(self) -> bool:
        return self.status == "finished"

    @property
    def tokens(self) -> list[int]:
        return [event.token_id for event in self.events]

    @property
    def text(self) -> str:
        return self._engine.lm.tokenizer.decode(self.tokens, skip_special_tokens=True)

    @property
    def scores(self) -> torch.Tensor | None:
        """``[tokens, emotions]`` readouts of the reply so far (None when not monitored)."""
        return self._stack("scores")

    @property
    def z(self) -> torch.Tensor | None:
        return self._stack("z")

    def _stack(self, name: str) -> torch.Tensor | None:
        values = [getattr(event, name) for event in self.events]
        if not self.emotions or any(v is None for v in values):
            return None
        return torch.stack(values) if values else torch.zeros(0, len(self.emotions))

    def cancel(self) -> None:
        """Stop this request; the others carry on undisturbed. Tokens so far are kept."""
        self._engine._cancel(self)

    def result(self) -> RequestHandle:
        """Step the engine until this request has finished."""
        while not self.done:
            self._engine.step()
        return self

    def __iter__(self) -> Iterator[TokenEvent]:
        seen = 0
        while True:
            while seen < len(self.events):
                seen += 1
                yield self.events[seen - 1]
            if self.done:
                return
            self._engine.step()


@dataclass(eq=False)
class _Running:
    """Engine-side state of an admitted request (its slot is its index in ``Engine._running``)."""

    handle: RequestHandle
    sampling: SamplingConfig
    steer: dict[int, torch.Tensor]
    window: tuple[int, int]
    """Steered positions ``lo <= p < hi``."""
    emotions: list[int]
    generator: torch.Generator | None
    length: int = 0
    """Cache entries written so far (prompt plus fed-back reply tokens)."""
    generated: int = 0
    reason: str | None = None

    @property
    def prompt_length(self) -> int:
        return len(self.handle.prompt_ids)


@dataclass
class _Readout:
    """One layer's readout matrices for the union of monitored emotions."""

    vectors: torch.Tensor
    centre: torch.Tensor | None
    z_mean: torch.Tensor | None
    z_std: torch.Tensor | None
    sink_norm: float
    cosine: bool = False


@dataclass
class _RowTable:
    """Per-row tensors for a run of consecutive slots, rebuilt only when membership changes."""

    temperature: torch.Tensor
    top_p: torch.Tensor
    penalty: torch.Tensor | None
    sampled: list[int]
    lo: torch.Tensor
    hi: torch.Tensor
    steer: dict[int, torch.Tensor]
    union: list[int]
    columns: list[torch.Tensor | None]
    readouts: dict[int, _Readout] = field(default_factory=dict)


class SlotCache:
    """Keys and values of the running requests: per layer ``[slots, kv_heads, max_tokens, dim]``.

    Allocated on a layer's first write (so head counts and dtype come from the model itself) and
    reused for every request after that.
    """

    def __init__(self, slots: int, max_tokens: int) -> None:
        self.slots, self.max_tokens = slots, max_tokens
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def layer(
        self, index: int, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if index not in self.keys:
            shape = (self.slots, key.shape[1], self.max_tokens)
            self.keys[index] = key.new_zeros(*shape, key.shape[3])
            self.values[index] = value.new_zeros(*shape, value.shape[3])
        return self.keys[index], self.values[index]

    def move(self, source: int, target: int, length: int) -> None:
        """Copy a slot's first ``length`` entries into another slot (every layer)."""
        for store in (self.keys, self.values):
            for tensor in store.values():
                tensor[target, :, :length] = tensor[source, :, :length]

    @property
    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for s in (self.keys, self.values) for t in s.values()
        )


class _PrefillPass:
    """The cache seen by a prefill pass: attend over the padded prompts, store them aligned.

    Row ``r`` is left-padded by ``pad[r]``; its keys and values are written to its slot with the
    padding removed, so that token ``i`` lands at index ``i``.
    """

    def __init__(self, cache: SlotCache, first: int, pad: torch.Tensor, width: int) -> None:
        self.cache, self.first, self.width = cache, first, width
        columns = torch.arange(width, device=pad.device).unsqueeze(0) + pad.unsqueeze(1)
        self.source = columns.clamp(max=width - 1)  # [rows, width]: column holding index j
        self._moved: dict[torch.device, torch.Tensor] = {}

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *_: Any, **__: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.cache.layer(layer_idx, key, value)
        rows = slice(self.first, self.first + key.shape[0])
        source = _on_device(self.source, key.device, self._moved)
        for new, store in ((key, keys), (value, values)):
            index = source[:, None, :, None].expand(-1, new.shape[1], -1, new.shape[3])
            store[rows, :, : self.width] = new.gather(2, index)
        return key, value

    def get_seq_length(self, *_: Any) -> int:
        return 0


class _DecodePass:
    """The cache seen by a decode pass: write each row's new entry at its own position."""

    def __init__(self, cache: SlotCache, positions: torch.Tensor, width: int) -> None:
        self.cache, self.positions, self.width = cache, positions, width
        self.rows = torch.arange(positions.shape[0], device=positions.device)
        self._rows_moved: dict[torch.device, torch.Tensor] = {}
        self._positions_moved: dict[torch.device, torch.Tensor] = {}

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *_: Any, **__: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.cache.layer(layer_idx, key, value)
        rows = _on_device(self.rows, key.device, self._rows_moved)
        positions = _on_device(self.positions, key.device, self._positions_moved)
        keys[rows, :, positions] = key[:, :, 0]
        values[rows, :, positions] = value[:, :, 0]
        n = key.shape[0]
        return keys[:n, :, : self.width], values[:n, :, : self.width]

    def get_seq_length(self, *_: Any) -> int:
        return self.width - 1


def _on_device(
    tensor: torch.Tensor, device: torch.device, moved: dict[torch.device, torch.Tensor]
) -> torch.Tensor:
    """``tensor`` on ``device``, copied at most once per pass (layers may sit on several)."""
    if tensor.device == device:
        return tensor
    if device not in moved:
        moved[device] = tensor.to(device)
    return moved[device]


def model_context(model: Any) -> int | None:
    """The longest sequence the model's position scheme allows, where its config says."""
    config = getattr(model.config, "text_config", None) or model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _mask_windows(model: Any) -> tuple[dict[str, int | None], bool]:
    """Attention kinds the model's layers use (name -> sliding window) and whether the model
    takes them as a ``{kind: mask}`` mapping."""
    config = getattr(model.config, "text_config", None) or model.config
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not layer_types:
        return {"full_attention": window if isinstance(window, int) else None}, False
    windows: dict[str, int | None] = {}
    for kind in set(layer_types):
        if kind == "full_attention":
            windows[kind] = None
        elif kind == "sliding_attention" and isinstance(window, int):
            windows[kind] = window
        else:
            raise UnsupportedArchitectureError(
                f"The decode engine does not support '{kind}' layers; use "
                "emoscope.generation.decode_rows for this model."
            )
    return windows, len(windows) > 1 or "full_attention" not in windows


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    value = getattr(torch, names.get(str(dtype), str(dtype)), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise EmoscopeError(f"Unknown dtype '{dtype}'. Use float32, bfloat16 or float16.")
    return value


class Engine:
    """Continuous-batching generation with per-request sampling, steering and readouts.

    Args:
        lm: the loaded model.
        bank: the emotion bank, needed for steering by emotion and for readouts.
        max_batch: requests running at once (KV cache slots).
        max_tokens: cache length per slot; a request's prompt plus ``max_new_tokens`` must fit.
        dtype: run the model in this dtype (e.g. ``"bfloat16"``); the model is cast in place.
            Readouts and steering arithmetic stay in float32. ``None`` keeps the model's dtype.
        monitor_layers: the layer (or band, averaged) readouts come from; default the bank's
            default layer, as in :class:`~emoscope.monitor.Monitor`.
        mode: readout mode, ``centred`` (default), ``projection`` or ``cosine`` (no z-scores),
            with the meanings of :class:`~emoscope.monitor.Monitor`.
        max_prefill_tokens: cap on padded prompt tokens admitted in one prefill pass (at least
            one request is always admitted).

    Example:
        >>> engine = Engine(lm, bank=bank, max_batch=8)
        >>> handle = engine.submit(Request("Tell me a story.", SamplingConfig(max_new_tokens=30),
        ...                                emotions=["happy", "calm"]))
        >>> for event in handle:
        ...     print(lm.tokenizer.decode([event.token_id]), event.z)
    """

    def __init__(
        self,
        lm: Any,
        *,
        bank: EmotionBank | None = None,
        max_batch: int = 16,
        max_tokens: int = 1024,
        dtype: torch.dtype | str | None = None,
        monitor_layers: int | Sequence[int] | None = None,
        mode: str = "centred",
        max_prefill_tokens: int = 8192,
        sink_norm_ratio: float = SINK_NORM_RATIO,
        allow_other_model: bool = False,
    ) -> None:
        if max_batch < 1 or max_tokens < 2 or max_prefill_tokens < 1:
            raise EmoscopeError("max_batch, max_prefill_tokens must be >= 1 and max_tokens >= 2.")
        if bank is not None:
            bank.check_model(lm, allow_other_model)
        if mode not in READOUT_MODES:
            raise EmoscopeError(f"Unknown readout mode '{mode}' (use {', '.join(READOUT_MODES)}).")
        self.mode = mode
        implementation = getattr(lm.model.config, "_attn_implementation", "eager")
        if implementation not in ("sdpa", "eager"):
            raise UnsupportedArchitectureError(
                f"The decode engine needs 'sdpa' or 'eager' attention (this model uses "
                f"'{implementation}'); load it with attn_implementation='sdpa'."
            )
        resolved = _resolve_dtype(dtype)
        if resolved is not None and resolved != lm.dtype:
            lm.model.to(resolved)
        self.lm, self.bank = lm, bank
        self.max_batch = max_batch
        self.context = model_context(lm.model)
        self.max_tokens = min(max_tokens, self.context) if self.context else max_tokens
        self.max_prefill_tokens = max_prefill_tokens
        self.device = lm.device
        self._layer_devices: dict[int, torch.device] = {}
        self._float_mask = implementation == "eager"
        self._windows, self._mask_mapping = _mask_windows(lm.model)
        self._eos = set(eos_ids(lm.model, lm.tokenizer))
        self._pad = padding_id(lm.tokenizer)
        self._vocab = int(lm.adapter.unembed(lm.model).weight.shape[0])
        self._keep_last = self._accepts("logits_to_keep")
        self.monitor_layers = self._monitor_band(monitor_layers)
        self._sink_ratio = sink_norm_ratio
        self._cache = SlotCache(max_batch, self.max_tokens)
        self._lengths = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self._next = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self._seen: torch.Tensor | None = None
        self._queue: deque[_Running] = deque()
        self._running: list[_Running] = []
        self._ids = itertools.count()
        self._version = 0
        self._tables: dict[tuple[int, int, int], _RowTable] = {}
        self._in_step = False
        self._callbacks: list[tuple[Callable[[TokenEvent], None], TokenEvent]] = []

    # ----- submitting --------------------------------------------------------------------

    def submit(self, request: Request) -> RequestHandle:
        """Check a request and queue it; anything wrong with it raises here, before any work."""
        if not isinstance(request, Request):
            raise EmoscopeError("submit() takes an emoscope.engine.Request.")
        ids = self._prompt_ids(request)
        total = len(ids) + request.sampling.max_new_tokens
        if self.context is not None and total > self.context:
            raise EmoscopeError(
                f"The prompt ({len(ids)} tokens) plus max_new_tokens "
                f"({request.sampling.max_new_tokens}) exceeds the model's context of "
                f"{self.context} tokens; shorten the prompt or lower max_new_tokens."
            )
        if total > self.max_tokens:
            raise EmoscopeError(
                f"The prompt ({len(ids)} tokens) plus max_new_tokens "
                f"({request.sampling.max_new_tokens}) exceeds the engine's {self.max_tokens} "
                "tokens per request; lower max_new_tokens or create the Engine with a larger "
                "max_tokens."
            )
        steer, positions = self._steering(request)
        emotions = self._emotions(request)
        handle = RequestHandle(self, next(self._ids), request, ids)
        if emotions and self.bank is not None:
            handle.emotions = [self.bank.emotions[i] for i in emotions]
        seed = request.sampling.seed
        generator = (
            torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        )
        state = _Running(
            handle, request.sampling, steer, _window(positions, len(ids)), emotions, generator
        )
        self._queue.append(state)
        return handle

    def _prompt_ids(self, request: Request) -> list[int]:
        prompt = request.prompt
        if isinstance(prompt, str):
            if not prompt.strip():
                raise EmoscopeError("The prompt is empty.")
            if request.chat:
                chat = self.lm.chat([{"role": "user", "content": prompt}])
                text, special = chat.text, chat.add_special_tokens
            else:
                text, special = prompt, True
            ids = list(self.lm.tokenizer(text, add_special_tokens=special)["input_ids"])
        else:
            ids = [int(t) for t in prompt]
            if any(not 0 <= t < self._vocab for t in ids):
                raise EmoscopeError(f"Prompt token ids must lie in 0..{self._vocab - 1}.")
        if not ids:
            raise EmoscopeError("The prompt has no tokens.")
        return ids

    def _steering(self, request: Request) -> tuple[dict[int, torch.Tensor], str | tuple]:
        steering = request.steering
        if steering is None:
            return {}, "all"
        if isinstance(steering, Mapping):
            vectors, positions = dict(steering), request.positions
            _check_positions(positions)
        else:
            if self.bank is None:
                raise EmoscopeError(
                    "Steering by emotion needs the bank: create the Engine with bank=..."
                )
            from emoscope.steer import steering_vectors

            vectors, positions = steering_vectors(self.bank, steering), steering.positions
        n_layers, hidden = self.lm.n_layers, self.lm.hidden_size
        out = {}
        for layer, vector in vectors.items():
            if not isinstance(layer, int) or not 0 <= layer < n_layers:
                raise EmoscopeError(
                    f"Steering layer {layer!r} is out of range: the model has layers "
                    f"0..{n_layers - 1}."
                )
            if not isinstance(vector, torch.Tensor) or tuple(vector.shape) != (hidden,):
                raise EmoscopeError(f"The steering vector for layer {layer} must be [{hidden}].")
            if not bool(torch.isfinite(vector).all()):
                raise EmoscopeError(f"The steering vector for layer {layer} is not finite.")
            out[layer] = vector.detach().to(self.device, torch.float32)
        return out, positions

    def _emotions(self, request: Request) -> list[int]:
        if request.emotions is None:
            return []
        if isinstance(request.emotions, str):
            raise EmoscopeError("emotions must be a list of names or indices, not one string.")
        if self.bank is None:
            raise EmoscopeError("Readouts need the bank: create the Engine with bank=...")
        out = []
        for emotion in request.emotions:
            if isinstance(emotion, int):
                if not 0 <= emotion < len(self.bank.emotions):
                    raise EmoscopeError(
                        f"Emotion index {emotion} is out of range (the bank has "
                        f"{len(self.bank.emotions)})."
                    )
                out.append(emotion)
            else:
                out.append(self.bank.index(emotion))
        return out

    def _monitor_band(self, layers: int | Sequence[int] | None) -> list[int]:
        if self.bank is None:
            return []
        band = [layers] if isinstance(layers, int) else list(layers or [self.bank.default_layer])
        return [self.bank.check_layer(layer) for layer in band]

    # ----- running -----------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return len(self._running)

    def step(self) -> list[TokenEvent]:
        """Admit waiting requests, advance every running one by a token, retire finished ones.

        Returns this step's events (also passed to each request's ``on_token``).
        """
        if self._in_step:
            raise EmoscopeError("Engine.step() is already running; it is not re-entrant.")
        self._in_step = True
        try:
            with torch.no_grad():  # not inference mode: the cache is also edited between passes
                self._retire()
                before = len(self._running)
                admitted = self._admit()
                events: list[TokenEvent] = []
                if before:
                    events += self._decode(before)
                if admitted:
                    events += self._prefill(before, admitted)
                self._retire()
        finally:
            self._in_step = False
        callbacks, self._callbacks = self._callbacks, []
        for callback, event in callbacks:
            callback(event)
        return events

    def run_until_done(self) -> None:
        """Step until no request is waiting or running."""
        while self._queue or self._running:
            self.step()

    def generate(self, requests: Sequence[Request]) -> list[RequestHandle]:
        """Submit all ``requests``, run them to the end and return their handles in order."""
        handles = [self.submit(request) for request in requests]
        self.run_until_done()
        return handles

    def close(self) -> None:
        """Cancel everything and free the cache."""
        for state in list(self._queue):
            state.handle.cancel()
        for state in list(self._running):
            state.handle.cancel()
        self._cache = SlotCache(self.max_batch, self.max_tokens)
        self._seen = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _cancel(self, handle: RequestHandle) -> None:
        if handle.done:
            return
        for state in self._queue:
            if state.handle is handle:
                self._queue.remove(state)
                break
        for state in self._running:
            if state.handle is handle:
                state.reason = "cancelled"
        handle.status, handle.finish_reason = "finished", "cancelled"
        if not self._in_step:
            with torch.no_grad():
                self._retire()

    def _admit(self) -> int:
        free = self.max_batch - len(self._running)
        admitted, width = 0, 0
        while self._queue and admitted < free:
            state = self._queue[0]
            if state.sampling.max_new_tokens == 0:
                self._queue.popleft()
                state.handle.status, state.handle.finish_reason = "finished", "length"
                continue
            wider = max(width, state.prompt_length)
            if admitted and wider * (admitted + 1) > self.max_prefill_tokens:
                break
            self._queue.popleft()
            state.handle.status = "running"
            self._running.append(state)
            admitted, width = admitted + 1, wider
        if admitted:
            self._version += 1
            self._tables.clear()
        return admitted

    def _retire(self) -> None:
        """Free the slots of finished and cancelled requests, moving the last ones into them."""
        done = [i for i, state in enumerate(self._running) if state.reason is not None]
        for index in reversed(done):
            state = self._running[index]
            last = len(self._running) - 1
            if index != last:
                moved = self._running[last]
                self._cache.move(last, index, moved.length)
                self._lengths[index] = self._lengths[last]
                self._next[index] = self._next[last]
                if self._seen is not None:
                    self._seen[index] = self._seen[last]
                self._running[index] = moved
            self._running.pop()
            if not state.handle.done:
                state.handle.status, state.handle.finish_reason = "finished", state.reason
        if done:
            self._version += 1
            self._tables.clear()

    # ----- the two kinds of pass -----------------------------------------------------------

    def _prefill(self, first: int, count: int) -> list[TokenEvent]:
        rows = self._running[first : first + count]
        table = self._table(first, first + count)
        lengths = [state.prompt_length for state in rows]
        width = max(lengths)
        ids = torch.full((count, width), self._pad, dtype=torch.long)
        for row, state in enumerate(rows):
            ids[row, width - lengths[row] :] = torch.tensor(state.handle.prompt_ids)
        ids = ids.to(self.device)
        pad = torch.tensor([width - n for n in lengths], device=self.device)
        column = torch.arange(width, device=self.device)
        positions = column.unsqueeze(0) - pad.unsqueeze(1)  # [rows, width]; < 0 on padding
        query, key = column.unsqueeze(1), column.unsqueeze(0)
        allowed = (key <= query).unsqueeze(0) & (key.unsqueeze(0) >= pad.view(-1, 1, 1))

        def mask_for(window: int | None) -> torch.Tensor:
            keep = allowed if window is None else allowed & (key > query - window).unsqueeze(0)
            # Padding queries attend to themselves only, so no row of the softmax is empty.
            return (keep | torch.eye(width, dtype=torch.bool, device=self.device)).unsqueeze(1)

        real = positions >= 0
        if self._seen is not None or table.penalty is not None:
            # Ids the output layer cannot produce, and padding, land in the spare last column.
            seen = self._seen_rows()[first : first + count]
            seen.zero_()
            seen.scatter_(1, torch.where(real & (ids < self._vocab), ids, self._vocab), True)
        weight = real & (positions >= table.lo.unsqueeze(1)) & (positions < table.hi.unsqueeze(1))
        logits, readout = self._forward(
            ids,
            positions.clamp(min=0),
            mask_for,
            _PrefillPass(self._cache, first, pad, width),
            table,
            weight,
        )
        tokens = self._choose(logits, table, rows, first)
        self._lengths[first : first + count] = torch.tensor(lengths, device=self.device)
        for state, length in zip(rows, lengths):
            state.length = length
        self._next[first : first + count] = tokens
        return self._emit(rows, tokens, readout, table)

    def _decode(self, count: int) -> list[TokenEvent]:
        rows = self._running[:count]
        table = self._table(0, count)
        width = max(state.length for state in rows) + 1
        lengths = self._lengths[:count]
        key = torch.arange(width, device=self.device).unsqueeze(0)
        allowed = key <= lengths.unsqueeze(1)

        def mask_for(window: int | None) -> torch.Tensor:
            keep = allowed if window is None else allowed & (key > lengths.unsqueeze(1) - window)
            return keep[:, None, None, :]

        positions = lengths.unsqueeze(1)
        weight = (positions >= table.lo.unsqueeze(1)) & (positions < table.hi.unsqueeze(1))
        logits, readout = self._forward(
            self._next[:count].unsqueeze(1),
            positions,
            mask_for,
            _DecodePass(self._cache, lengths.clone(), width),
            table,
            weight,
        )
        tokens = self._choose(logits, table, rows, 0)
        self._lengths[:count] += 1
        for state in rows:
            state.length += 1
        self._next[:count] = tokens
        return self._emit(rows, tokens, readout, table)

    def _forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        mask_for: Callable[[int | None], torch.Tensor],
        cache: _PrefillPass | _DecodePass,
        table: _RowTable,
        weight: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        masks = {
            kind: self._mask_format(mask_for(window)) for kind, window in self._windows.items()
        }
        mask: Any = masks if self._mask_mapping else next(iter(masks.values()))
        additions = {
            layer: RowAddition(vectors, weight.float()) for layer, vectors in table.steer.items()
        }
        extra = {"logits_to_keep": 1} if self._keep_last else {}
        readings: dict[int, torch.Tensor] = {}
        with add_per_row(self.lm.model, self.lm.adapter, additions):
            if table.readouts:
                with ResidualReader(
                    self.lm.model, self.lm.adapter, list(table.readouts), self._read(table)
                ) as reader:
                    out = self._call(ids, positions, mask, cache, extra)
                readings = {layer: reader.last(layer) for layer in table.readouts}
            else:
                out = self._call(ids, positions, mask, cache, extra)
            return out.logits[:, -1, :].float(), readings

    def _call(
        self, ids: torch.Tensor, positions: torch.Tensor, mask: Any, cache: Any, extra: dict
    ) -> Any:
        return self.lm.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            **extra,
        )

    def _mask_format(self, keep: torch.Tensor) -> torch.Tensor:
        if not self._float_mask:
            return keep
        dtype = self.lm.dtype
        return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(
            ~keep, torch.finfo(dtype).min
        )

    def _read(self, table: _RowTable) -> Callable[[int, torch.Tensor], torch.Tensor]:
        """Inside the pass: the readout and residual norm of each row's last position."""

        def transform(layer: int, hidden: torch.Tensor) -> torch.Tensor:
            last = hidden[:, -1]
            readout = table.readouts[layer]
            scores = centred_scores(last, readout.vectors, readout.centre)
            norm = last.float().norm(dim=-1, keepdim=True)
            if readout.cosine:
                scores = scores / norm.clamp(min=1e-12)
            return torch.cat([scores, norm], dim=-1)

        return transform

    # ----- choosing tokens and reporting them ----------------------------------------------

    def _choose(
        self, logits: torch.Tensor, table: _RowTable, rows: list[_Running], first: int
    ) -> torch.Tensor:
        """One token per row, each with its own temperature, top-p, penalty and generator."""
        if table.penalty is not None:
            seen = self._seen_rows()[first : first + len(rows), : self._vocab]
            penalised = torch.where(logits < 0, logits * table.penalty, logits / table.penalty)
            logits = torch.where(seen, penalised, logits)
        tokens = logits.argmax(dim=-1)
        if table.sampled:
            index = torch.tensor(table.sampled, device=logits.device)
            probs = torch.softmax(logits[index] / table.temperature[index].unsqueeze(1), dim=-1)
            top_p = table.top_p[index].unsqueeze(1)
            if bool((top_p < 1).any()):
                ordered, order = probs.sort(dim=-1, descending=True)
                keep = (ordered.cumsum(dim=-1) - ordered < top_p) | (top_p >= 1)
                probs = torch.zeros_like(probs).scatter(-1, order, ordered * keep)
            drawn = torch.empty(len(table.sampled), dtype=torch.long, device=logits.device)
            shared = [i for i, row in enumerate(table.sampled) if rows[row].generator is None]
            if shared:
                drawn[shared] = torch.multinomial(probs[shared], 1).squeeze(-1)
            for i, row in enumerate(table.sampled):  # a seeded request draws from its own stream
                generator = rows[row].generator
                if generator is not None:
                    drawn[i] = torch.multinomial(probs[i : i + 1], 1, generator=generator)[0, 0]
            tokens[index] = drawn
        if self._seen is not None:
            self._seen[first : first + len(rows)].scatter_(1, tokens.unsqueeze(1), True)
        return tokens

    def _emit(
        self,
        rows: list[_Running],
        tokens: torch.Tensor,
        readings: dict[int, torch.Tensor],
        table: _RowTable,
    ) -> list[TokenEvent]:
        scores, z, sinks = self._combine(readings, table) if readings else (None, None, None)
        events = []
        for row, (state, token) in enumerate(zip(rows, tokens.tolist())):
            state.generated += 1
            if state.sampling.stop_at_eos and token in self._eos:
                state.reason = "eos"
            elif state.generated >= state.sampling.max_new_tokens:
                state.reason = "length"
            columns = table.columns[row]
            row_scores = row_z = None
            sink = False
            if columns is not None and scores is not None:
                row_scores = scores[row, columns]
                row_z = z[row, columns] if z is not None else None
                sink = bool(sinks[row])
            event = TokenEvent(
                state.handle.id,
                state.generated - 1,
                token,
                row_scores,
                row_z,
                sink,
                state.reason is not None,
                state.reason,
            )
            state.handle.events.append(event)
            if state.handle.request.on_token is not None:
                self._callbacks.append((state.handle.request.on_token, event))
            events.append(event)
        return events

    def _combine(
        self, readings: dict[int, torch.Tensor], table: _RowTable
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The band's mean readout, mean z-score (NaN at sinks) and sink flags, on the CPU."""
        layers = list(readings)
        readings = {layer: reading.to(self.device) for layer, reading in readings.items()}
        sinks = torch.stack(
            [readings[layer][:, -1] > table.readouts[layer].sink_norm for layer in layers]
        ).any(dim=0)
        per_layer = {layer: readings[layer][:, :-1] for layer in layers}
        scores = torch.stack(list(per_layer.values())).mean(dim=0)
        z = None
        if all(table.readouts[layer].z_mean is not None for layer in layers):
            z = torch.stack(
                [
                    (per_layer[layer] - table.readouts[layer].z_mean) / table.readouts[layer].z_std
                    for layer in layers
                ]
            ).mean(dim=0)
            z = z.masked_fill(sinks.unsqueeze(1), float("nan")).cpu()
        return scores.cpu(), z, sinks.cpu()

    # ----- per-row tables ------------------------------------------------------------------

    def _seen_rows(self) -> torch.Tensor:
        if self._seen is None:
            self._seen = torch.zeros(
                self.max_batch, self._vocab + 1, dtype=torch.bool, device=self.device
            )
        return self._seen

    def _table(self, first: int, stop: int) -> _RowTable:
        key = (first, stop, self._version)
        if key not in self._tables:
            self._tables[key] = self._build_table(self._running[first:stop])
        return self._tables[key]

    def _build_table(self, rows: list[_Running]) -> _RowTable:
        device = self.device
        sampling = [state.sampling for state in rows]
        penalties = [s.repetition_penalty for s in sampling]
        steered = sorted({layer for state in rows for layer in state.steer})
        hidden = self.lm.hidden_size
        zeros = torch.zeros(hidden, device=device)
        union = sorted({e for state in rows for e in state.emotions})
        position = {e: i for i, e in enumerate(union)}
        table = _RowTable(
            temperature=torch.tensor([s.temperature for s in sampling], device=device),
            top_p=torch.tensor([s.top_p for s in sampling], device=device),
            penalty=(
                torch.tensor(penalties, device=device).unsqueeze(1)
                if any(p != 1 for p in penalties)
                else None
            ),
            sampled=[i for i, s in enumerate(sampling) if s.temperature > 0],
            lo=torch.tensor([state.window[0] for state in rows], device=device),
            hi=torch.tensor([state.window[1] for state in rows], device=device),
            steer={
                layer: torch.stack([state.steer.get(layer, zeros) for state in rows]).to(
                    self._layer_device(layer)
                )
                for layer in steered
            },
            union=union,
            columns=[
                torch.tensor([position[e] for e in state.emotions]) if state.emotions else None
                for state in rows
            ],
        )
        if union and self.bank is not None:
            table.readouts = {
                layer: self._readout_for(layer, union) for layer in self.monitor_layers
            }
        return table

    def _layer_device(self, layer: int) -> torch.device:
        """Where block ``layer`` runs: the vectors a table adds or reads there live there, moved
        once per table rather than once per step."""
        if layer not in self._layer_devices:
            self._layer_devices[layer] = self.lm.adapter.layer_device(self.lm.model, layer)
        return self._layer_devices[layer]

    def _readout_for(self, layer: int, union: list[int]) -> _Readout:
        bank, device = self.bank, self._layer_device(layer)
        assert bank is not None
        rows = torch.tensor(union)
        vectors = bank.vectors[layer][rows].to(device, torch.float32)
        z_mean = z_std = None
        if self.mode != "cosine":
            try:
                z_mean = bank.stat("neutral_score_mean", layer)[rows].to(device, torch.float32)
                z_std = bank.stat("neutral_score_std", layer)[rows].to(device, torch.float32)
                z_std = z_std.clamp(min=1e-6)
                if self.mode == "projection":
                    z_mean = centred_scores(
                        bank.stat("neutral_mean", layer).to(device), vectors
                    ).float()
            except EmoscopeError:
                z_mean = z_std = None
        try:
            sink_norm = self._sink_ratio * bank.residual_norm(layer)
        except EmoscopeError:
            sink_norm = float("inf")
        centre = (
            bank.stat("mean", layer).to(device, torch.float32) if self.mode == "centred" else None
        )
        return _Readout(
            vectors=vectors,
            centre=centre,
            z_mean=None if z_mean is None else z_mean.to(self.device),  # read after the pass
            z_std=None if z_std is None else z_std.to(self.device),
            sink_norm=sink_norm,
            cosine=self.mode == "cosine",
        )

    def _accepts(self, name: str) -> bool:
        try:
            return name in inspect.signature(self.lm.model.forward).parameters
        except (TypeError, ValueError):
            return False


def _check_positions(positions: str | tuple[int, int]) -> None:
    if isinstance(positions, str):
        if positions not in _POSITIONS:
            raise EmoscopeError(
                f"positions must be one of {', '.join(_POSITIONS)} or a (start, end) span."
            )
        return
    start, end = positions
    if not 0 <= start < end:
        raise EmoscopeError(f"Token span {positions} must satisfy 0 <= start < end.")


def _window(positions: str | tuple[int, int], prompt_length: int) -> tuple[int, int]:
    """Steered token positions ``lo <= p < hi`` of one request."""
    if positions == "all":
        return 0, _UNBOUNDED
    if positions == "prompt":
        return 0, prompt_length
    if positions == "response":
        return prompt_length, _UNBOUNDED
    start, end = positions  # type: ignore[misc]
    return int(start), int(end)


def engine_for(
    lm: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    lockstep: bool = False,
    max_batch: int = DEFAULT_MAX_BATCH,
    **options: Any,
) -> Engine:
    """An engine sized for a known set of tokenised prompts.

    Its cache holds the longest prompt plus ``max_new_tokens``. With ``lockstep=True`` every
    prompt gets a slot and all are admitted in the first pass, so the rows advance one token per
    step together (what step-by-step callers such as :meth:`Monitor.stream` expect); otherwise at
    most ``max_batch`` run at once and the rest join as slots free up.
    """
    if not prompts:
        raise EmoscopeError("Give at least one prompt.")
    longest = max(len(p) for p in prompts)
    slots = len(prompts) if lockstep else max(1, min(len(prompts), max_batch))
    if lockstep:
        options.setdefault("max_prefill_tokens", slots * longest)
    return Engine(lm, max_batch=slots, max_tokens=max(2, longest + max_new_tokens), **options)


def row_sampling(sampling: SamplingConfig, row: int) -> SamplingConfig:
    """The sampling of row ``row`` of a batch: a seeded batch gives each row its own stream
    (``seed + row``), so rows differ from each other yet each is reproducible on its own."""
    if sampling.seed is None or row == 0:
        return sampling
    return replace(sampling, seed=sampling.seed + row)
