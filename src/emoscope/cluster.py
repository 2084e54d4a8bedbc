"""Scale-out on Ray: many processes, GPUs or machines, each holding the model once.

Work is cut into shards (a run of length-sorted texts, a block of experiment prompts, a group of
corpus cells). A pool of Ray actors, one model each, takes shards as they become free. The driver
writes every finished shard to a checkpoint folder before counting it, so an interrupted run
resumes exactly like a single-process one, and a worker that dies has its shard sent to another
worker (a fresh one is started in its place) without anything being counted twice: a shard's
result is accepted once, keyed by the shard.

The reductions merge exactly: per-text means are placed by index, and neutral-text moments are
combined from each shard's count, mean and covariance (the parallel form of the variance).

Ray is an optional extra (``pip install 'emoscope[ray]'``); nothing here imports it until a
pool is made. Results travel through Ray's object store between processes of one cluster, which
trusts its members; no file on disk is ever unpickled.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from emoscope.errors import EmoscopeError
from emoscope.files import atomic_save_tensors

SHARDS_PER_WORKER = 4
"""Shards per worker: enough to balance uneven shards, few enough to keep the overhead small."""


def require_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise EmoscopeError(
            "Ray is not installed: pip install 'emoscope[ray]' (or run without --ray)."
        ) from None
    return ray


@dataclass(frozen=True)
class ModelSpec:
    """What a worker loads: the same arguments :func:`~emoscope.models.load_model` took."""

    model: str
    dtype: str = "float32"
    device: str = "cpu"
    max_memory: Mapping[Any, str] | None = None

    @classmethod
    def of(cls, lm: Any) -> ModelSpec:
        load = getattr(lm, "extra", {}).get("load")
        if not load:
            raise EmoscopeError(
                f"{lm.name} was built in memory, so Ray workers cannot load it: save it with "
                "save_pretrained and load that folder with emoscope.load_model."
            )
        return cls(load["model"], load["dtype"], load["device"], load["max_memory"])

    @property
    def gpus(self) -> int:
        """GPUs one copy of the model spans: those a ``device="auto"`` memory plan names (the
        worker sees its own GPUs as 0, 1, ...), else one."""
        if self.device == "auto" and self.max_memory:
            return max(1, sum(1 for key in self.max_memory if isinstance(key, int)))
        return 1

    def load(self) -> Any:
        from emoscope.models import load_model

        return load_model(self.model, self.dtype, self.device, self.max_memory)


class _Worker:
    """One Ray actor: loads the model once, then runs whatever task a shard names."""

    def __init__(self, spec: ModelSpec, threads: int) -> None:
        torch.set_num_threads(max(1, threads))
        self.lm = spec.load()
        self.cache: dict[str, Any] = {}

    def pid(self) -> int:
        return os.getpid()

    def run(self, task: str, payload: dict[str, Any]) -> Any:
        return TASKS[task](self, **payload)


class RayPool:
    """Model-holding workers on a Ray cluster; :meth:`imap` sends them shards.

    Args:
        spec: the model every worker loads (``ModelSpec.of(lm)`` for an already loaded one).
        address: a running cluster (``ray://host:10001`` or ``auto``); ``None`` or ``"local"``
            starts a Ray runtime on this machine for the length of the pool.
        workers: how many; default one per GPU when the model goes on GPUs, else one per CPU.
        cpus_per_worker / gpus_per_worker: Ray resources per worker (defaults: 1 CPU; on GPUs
            as many as ``spec.gpus``: one, or the GPUs a ``device="auto"`` memory plan names).
        max_replacements: how many dead workers may be replaced before the run gives up.
    """

    def __init__(
        self,
        spec: ModelSpec,
        address: str | None = None,
        workers: int | None = None,
        cpus_per_worker: int | None = None,
        gpus_per_worker: float | None = None,
        max_replacements: int = 8,
    ) -> None:
        ray = require_ray()
        self.spec = spec
        self._ray = ray
        self._owns_runtime = False
        if not ray.is_initialized():
            local = address in (None, "", "local")
            try:
                ray.init(
                    address=None if local else address,
                    include_dashboard=False,
                    logging_level="ERROR",
                    log_to_driver=False,
                    configure_logging=False,
                )
            except Exception as exc:  # a wrong address, a cluster that does not answer
                raise EmoscopeError(
                    f"Cannot start or reach Ray at {address or 'local'}: {exc}"
                ) from None
            self._owns_runtime = local
        resources = ray.cluster_resources()
        on_gpu = spec.device not in ("cpu",) and resources.get("GPU", 0) >= 1
        if gpus_per_worker is None:
            gpus_per_worker = spec.gpus if on_gpu else 0
        if cpus_per_worker is None:
            cpus_per_worker = 1
        if workers is None:
            if gpus_per_worker:
                workers = max(1, int(resources.get("GPU", 0) // gpus_per_worker))
            else:
                workers = max(1, int(resources.get("CPU", 1) // cpus_per_worker))
        if workers < 1:
            raise EmoscopeError(f"workers must be at least 1 (got {workers}).")
        self._options = {"num_cpus": cpus_per_worker, "num_gpus": gpus_per_worker}
        self._threads = int(cpus_per_worker)
        self._actor_class = ray.remote(_Worker)
        self.replacements_left = max_replacements
        self.stats = {"shards": 0, "rerun": 0, "replaced": 0}
        self.actors = [self._start() for _ in range(workers)]
        try:
            self.pids = ray.get([actor.pid.remote() for actor in self.actors])
        except Exception as exc:
            self.close()
            raise EmoscopeError(
                f"A Ray worker could not load {spec.model}: {_cause(exc)}"
            ) from None

    @property
    def workers(self) -> int:
        return len(self.actors)

    def _start(self) -> Any:
        return self._actor_class.options(**self._options).remote(self.spec, self._threads)

    def imap(
        self, task: str, payloads: Sequence[dict[str, Any]], desc: str = "", progress: bool = True
    ) -> Iterator[tuple[int, Any]]:
        """``(shard number, result)`` for every payload, in the order they finish.

        A shard whose worker dies is queued again and the worker replaced; an error raised by
        the task itself (bad input) stops the run with that error.
        """
        ray = self._ray
        queue = deque(range(len(payloads)))
        idle = list(range(len(self.actors)))
        running: dict[Any, tuple[int, int]] = {}
        delivered: set[int] = set()
        bar = tqdm(total=len(payloads), desc=desc, unit="shard", disable=not progress)
        try:
            while queue or running:
                while queue and idle:
                    slot, shard = idle.pop(), queue.popleft()
                    ref = self.actors[slot].run.remote(task, payloads[shard])
                    running[ref] = (slot, shard)
                ready, _ = ray.wait(list(running), num_returns=1)
                slot, shard = running.pop(ready[0])
                try:
                    result = ray.get(ready[0])
                except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as exc:
                    self._replace(slot, exc)
                    queue.appendleft(shard)
                    idle.append(slot)
                    self.stats["rerun"] += 1
                    continue
                except ray.exceptions.RayTaskError as exc:
                    raise _as_emoscope_error(exc) from None
                idle.append(slot)
                if shard in delivered:  # a duplicate can never count twice
                    continue
                delivered.add(shard)
                self.stats["shards"] += 1
                bar.update(1)
                yield shard, result
        finally:
            bar.close()
            for ref in running:
                with contextlib.suppress(Exception):  # already finished or its worker gone
                    ray.cancel(ref)

    def _replace(self, slot: int, exc: BaseException) -> None:
        if self.replacements_left <= 0:
            raise EmoscopeError(f"Ray workers keep dying; giving up: {_cause(exc)}")
        self.replacements_left -= 1
        self.stats["replaced"] += 1
        self.actors[slot] = self._start()
        self.pids[slot] = self._ray.get(self.actors[slot].pid.remote())

    def close(self) -> None:
        for actor in self.actors:
            with contextlib.suppress(Exception):  # already gone
                self._ray.kill(actor)
        self.actors = []
        if self._owns_runtime:
            self._ray.shutdown()
            self._owns_runtime = False

    def __enter__(self) -> RayPool:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


def _cause(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    if cause is not None:
        text = str(cause).strip()
        return text.splitlines()[0] if text else type(cause).__name__
    # an actor that died carries the remote traceback as text: keep its "SomeError: why" line
    lines = str(exc).strip().splitlines()
    raised = [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b: ", line)]
    if raised:
        return raised[-1].split(": ", 1)[1]
    return lines[0] if lines else type(exc).__name__


def _as_emoscope_error(exc: Any) -> EmoscopeError:
    cause = getattr(exc, "cause", None)
    if isinstance(cause, EmoscopeError):
        return cause
    return EmoscopeError(f"A Ray worker failed: {_cause(exc)}")


# ----- sharding ----------------------------------------------------------------------------------


def length_shards(sizes: Sequence[int], count: int) -> list[list[int]]:
    """Indices cut into about ``count`` runs of length-sorted items with similar total size, so
    each shard pads little and takes about as long as the others."""
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    if not order:
        return []
    target = max(1, math.ceil(sum(max(1, sizes[i]) for i in order) / max(1, count)))
    shards: list[list[int]] = [[]]
    total = 0
    for i in order:
        if shards[-1] and total >= target:
            shards.append([])
            total = 0
        shards[-1].append(i)
        total += max(1, sizes[i])
    return shards


def run_sharded(
    pool: RayPool,
    task: str,
    sizes: Sequence[int],
    payload: Callable[[list[int]], dict[str, Any]],
    checkpoint: Path,
    desc: str,
    progress: bool = True,
) -> list[tuple[list[int], dict[str, torch.Tensor]]]:
    """Run ``task`` over every item not yet in ``checkpoint`` and return all shards' results.

    Each result is a dict of tensors; it is written to ``checkpoint`` (with the shard's item
    indices) as soon as it arrives, so a rerun sends only the items no finished shard covers.
    """
    checkpoint.mkdir(parents=True, exist_ok=True)
    finished: list[tuple[list[int], dict[str, torch.Tensor]]] = []
    for path in sorted(checkpoint.glob("shard-*.safetensors")):
        data = load_file(str(path))
        finished.append((data.pop("index").tolist(), data))
    done = {i for index, _ in finished for i in index}
    todo = [i for i in range(len(sizes)) if i not in done]
    shards = [
        [todo[j] for j in shard]
        for shard in length_shards([sizes[i] for i in todo], pool.workers * SHARDS_PER_WORKER)
    ]
    payloads = [payload(shard) for shard in shards]
    for number, result in pool.imap(task, payloads, desc, progress):
        index = shards[number]
        atomic_save_tensors(
            {"index": torch.tensor(index), **result},
            checkpoint / f"shard-{index[0]:07d}-{uuid.uuid4().hex[:8]}.safetensors",
        )
        finished.append((index, result))
    return finished


# ----- extraction --------------------------------------------------------------------------------


def _texts_payload(texts: Sequence[str], **options: Any) -> Callable[[list[int]], dict[str, Any]]:
    """A shard's task arguments: its texts and the options every shard shares."""
    return lambda index: {"texts": [texts[i] for i in index], **options}


def text_means(
    pool: RayPool,
    texts: Sequence[str],
    layers: Sequence[int],
    token_offset: int,
    add_special_tokens: bool,
    max_batch_tokens: int,
    checkpoint: Path,
    progress: bool = True,
    desc: str = "activations",
) -> Any:
    """:func:`emoscope.activations.text_means` spread over the pool (same result, by index)."""
    from emoscope.activations import TextMeans

    parts = run_sharded(
        pool,
        "text_means",
        [len(t) for t in texts],
        _texts_payload(
            texts,
            layers=list(layers),
            token_offset=token_offset,
            add_special_tokens=add_special_tokens,
            max_batch_tokens=max_batch_tokens,
        ),
        checkpoint,
        desc,
        progress,
    )
    means = torch.zeros(len(texts), len(layers), parts[0][1]["means"].shape[-1] if parts else 0)
    n_tokens = torch.zeros(len(texts), dtype=torch.long)
    short = torch.zeros(len(texts), dtype=torch.bool)
    for index, data in parts:
        where = torch.tensor(index)
        means[where], n_tokens[where] = data["means"], data["n_tokens"]
        short[where] = data["short"].bool()
    return TextMeans(means, list(layers), n_tokens, short)


def neutral_moments(
    pool: RayPool,
    texts: Sequence[str],
    layers: Sequence[int],
    skip_first: int,
    add_special_tokens: bool,
    max_batch_tokens: int,
    checkpoint: Path,
    progress: bool = True,
) -> Any:
    """:func:`emoscope.activations.neutral_moments` spread over the pool; each shard's moments
    are merged exactly (:func:`emoscope.activations.merge_moments`)."""
    from emoscope.activations import NeutralMoments, merge_moments

    parts = run_sharded(
        pool,
        "neutral_moments",
        [len(t) for t in texts],
        _texts_payload(
            texts,
            layers=list(layers),
            skip_first=skip_first,
            add_special_tokens=add_special_tokens,
            max_batch_tokens=max_batch_tokens,
        ),
        checkpoint,
        "neutral activations",
        progress,
    )
    moments = [
        (
            index,
            NeutralMoments(
                list(layers),
                int(d["count"][0]),
                d["mean"],
                d["cov"],
                d["mean_norm"],
                d["text_means"],
            ),
        )
        for index, d in parts
    ]
    return merge_moments(moments, len(texts))


def speaker_means(
    pool: RayPool,
    rendered: Sequence[Any],
    layers: Sequence[int],
    checkpoint: Path,
    progress: bool = True,
    desc: str = "speaker activations",
) -> torch.Tensor:
    """:func:`emoscope.speakers.speaker_means` spread over the pool."""
    parts = run_sharded(
        pool,
        "speaker_means",
        [len(r.text) for r in rendered],
        lambda index: {"rendered": [rendered[i] for i in index], "layers": list(layers)},
        checkpoint,
        desc,
        progress,
    )
    first = parts[0][1]["means"]
    out = torch.zeros(len(rendered), *first.shape[1:])
    for index, data in parts:
        out[torch.tensor(index)] = data["means"]
    return out


# ----- experiments and generation ------------------------------------------------------------


def split_evenly(count: int, parts: int) -> list[range]:
    """``count`` items as ``parts`` contiguous, nearly equal ranges (none empty)."""
    parts = max(1, min(parts, count))
    edges = [round(k * count / parts) for k in range(parts + 1)]
    return [range(edges[k], edges[k + 1]) for k in range(parts) if edges[k] < edges[k + 1]]


def generate_ids(
    pool: RayPool,
    prompts: Sequence[list[int]],
    samplings: Sequence[Any],
    group: int,
    progress: bool = False,
) -> Iterator[tuple[int, list[int]]]:
    """``(prompt index, generated ids)`` as each group of ``group`` prompts finishes on some
    worker's engine (each prompt has its own sampling and seed, so where it ran does not
    matter)."""
    groups = split_evenly(len(prompts), math.ceil(len(prompts) / max(1, group)))
    payloads = [
        {"prompts": [prompts[i] for i in g], "samplings": [samplings[i] for i in g]} for g in groups
    ]
    for number, rows in pool.imap("generate_ids", payloads, "generating", progress):
        yield from zip(groups[number], rows, strict=True)


class RayScorer:
    """An experiment scorer whose forced-choice scoring and generation run on the pool.

    Everything else (the probes, token readouts for a trace) stays on the driver's own
    :class:`~emoscope.experiments.scoring.Scorer`; each chunk of prompts is split evenly over
    the workers and put back in order.
    """

    def __init__(self, local: Any, pool: RayPool) -> None:
        self.local, self.pool = local, pool
        self.key = uuid.uuid4().hex
        self._bank = pool._ray.put(local.bank)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.local, name)

    def _spread(self, method: str, items: Sequence[Any], desc: str, **extra: Any) -> list[Any]:
        parts = split_evenly(len(items), self.pool.workers)
        payloads = [
            {
                "key": self.key,
                "bank": self._bank,
                "probes": list(self.local.probes),
                "layers": list(self.local.steer_layers),
                "method": method,
                "items": [items[i] for i in part],
                **{k: ([v[i] for i in part] if k == "seeds" else v) for k, v in extra.items()},
            }
            for part in parts
        ]
        out: list[Any] = [None] * len(items)
        for number, results in self.pool.imap("score", payloads, desc, self.local.progress):
            for i, result in zip(parts[number], results, strict=True):
                out[i] = result
        return out

    def score(self, items: Sequence[Any], desc: str = "scoring") -> list[Any]:
        return self._spread("score", items, desc) if items else []

    def generate(
        self, items: Sequence[Any], sampling: Any, seeds: Sequence[int], desc: str = "generating"
    ) -> list[Any]:
        if not items:
            return []
        return self._spread("generate", items, desc, sampling=sampling, seeds=list(seeds))


# ----- what a worker runs ------------------------------------------------------------------------


def _text_means_task(worker: _Worker, texts: list[str], **options: Any) -> dict[str, torch.Tensor]:
    from emoscope.activations import text_means

    result = text_means(worker.lm, texts, progress=False, **options)
    return {
        "means": result.means,
        "n_tokens": result.n_tokens,
        "short": result.short.to(torch.uint8),
    }


def _neutral_task(worker: _Worker, texts: list[str], **options: Any) -> dict[str, torch.Tensor]:
    from emoscope.activations import neutral_moments

    m = neutral_moments(worker.lm, texts, progress=False, **options)
    return {
        "count": torch.tensor([m.count]),
        "mean": m.mean,
        "cov": m.cov,
        "mean_norm": m.mean_norm,
        "text_means": m.text_means,
    }


def _speaker_task(
    worker: _Worker, rendered: list[Any], layers: list[int]
) -> dict[str, torch.Tensor]:
    from emoscope.speakers import speaker_means

    return {"means": speaker_means(worker.lm, rendered, layers, progress=False)}


def _score_task(
    worker: _Worker,
    key: str,
    bank: Any,
    probes: list[str],
    layers: list[int],
    method: str,
    items: list[Any],
    **extra: Any,
) -> list[Any]:
    from emoscope.experiments.scoring import Scorer

    if key not in worker.cache:
        if not hasattr(bank, "emotions"):  # an object-store reference: fetch it once
            bank = require_ray().get(bank)
        worker.cache[key] = Scorer(worker.lm, bank, probes, layers, progress=False)
    scorer = worker.cache[key]
    if method == "score":
        return scorer.score(items)
    return scorer.generate(items, extra["sampling"], extra["seeds"])


def _generate_ids_task(
    worker: _Worker, prompts: list[list[int]], samplings: list[Any]
) -> list[list[int]]:
    from emoscope.engine import Request, engine_for

    longest = max(s.max_new_tokens for s in samplings)
    with engine_for(worker.lm, prompts, longest, max_batch=len(prompts)) as engine:
        handles = engine.generate(
            [Request(ids, s, chat=False) for ids, s in zip(prompts, samplings, strict=True)]
        )
    return [handle.tokens for handle in handles]


TASKS: dict[str, Callable[..., Any]] = {
    "text_means": _text_means_task,
    "neutral_moments": _neutral_task,
    "speaker_means": _speaker_task,
    "score": _score_task,
    "generate_ids": _generate_ids_task,
}
