"""Benchmark side of the peer workers: start one in its environment, time runs, collect results.

Imported by the benchmarks in bench/ (which run in emoscope's own .venv); the workers it starts
run under bench/.peers/<name>/bin/python. See common.py for the protocol.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import queue
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PEERS_ROOT = HERE.parent / ".peers"
RESULT_PREFIX = "RESULT "


def model_folder(name: str) -> Path:
    """The plain Hugging Face folder that ``emoscope.models.load_model(name)`` leaves in its cache.

    Call ``load_model(name)`` first: it builds and validates the folder. emoscope has no public
    function returning the folder; this mirrors what ``load_model`` does for an embedded model
    (``cache_root() / "models" / "<name>-<version of its weights package>"``) and checks it.
    """
    from emoscope.models import EMBEDDED, cache_root

    entry = EMBEDDED[name]
    version = importlib.metadata.version(entry.package.split("==")[0])
    folder = cache_root() / "models" / f"{entry.name}-{version}"
    if not (folder / "config.json").exists() or not (folder / "model.safetensors").exists():
        raise SystemExit(f"expected the cached model folder of {name} at {folder}")
    return folder


class PeerError(RuntimeError):
    """The peer could not be started or failed; the message is what the benchmark records."""


def peer_python(name: str) -> Path:
    return PEERS_ROOT / name / "bin" / "python"


def unavailable(name: str) -> str | None:
    """Why peer ``name`` cannot run here, or ``None`` when its environment is ready."""
    env = PEERS_ROOT / name
    error = env / "install-error.txt"
    if error.exists():
        lines = [line for line in error.read_text().splitlines() if line.strip()]
        return f"pip install failed: {lines[-1] if lines else '(no output)'}"
    if not (env / ".installed").exists() or not peer_python(name).exists():
        return f"environment {env} is missing; run `make bench-peers`"
    return None


def installed_versions(name: str) -> dict[str, str]:
    """Pinned versions recorded by setup.sh for the packages that matter here."""
    wanted = {"torch", "transformers", "transformer-lens", "nnsight", "repeng", "steering-vectors"}
    out: dict[str, str] = {}
    path = PEERS_ROOT / name / "versions.txt"
    if path.exists():
        for line in path.read_text().splitlines():
            package, _, version = line.partition("==")
            if package.lower().replace("_", "-") in wanted and version:
                out[package.lower().replace("_", "-")] = version
    return out


class Peer:
    """One worker process, alive for the whole benchmark so runs can be interleaved.

    Example:
        >>> peer = Peer("nnsight", "extract_worker.py", spec)
        >>> peer.ready()            # loads the model and warms up
        >>> seconds = peer.run()    # one timed run
        >>> info = peer.finish()    # final results, process exits
    """

    def __init__(
        self, name: str, worker: str, spec: dict[str, Any], threads: int, timeout: float = 900
    ) -> None:
        reason = unavailable(name)
        if reason:
            raise PeerError(reason)
        self.name, self.timeout = name, timeout
        self.stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in close())
        env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(threads)
        env["TOKENIZERS_PARALLELISM"] = "false"
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.pop("PYTHONPATH", None)
        self.process = subprocess.Popen(
            [str(peer_python(name)), str(HERE / worker)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            env=env,
            cwd=HERE,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self._send(json.dumps({**spec, "threads": threads}))
        self.versions: dict[str, str] = {}

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith(RESULT_PREFIX):
                self.lines.put(line[len(RESULT_PREFIX) :])
        self.lines.put(None)

    def _send(self, line: str) -> None:
        try:
            assert self.process.stdin is not None
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the process died; _receive reports why

    def _stderr_tail(self) -> str:
        self.stderr.seek(0)
        lines = [line for line in self.stderr.read().splitlines() if line.strip()]
        return lines[-1] if lines else "(no output)"

    def _receive(self, expected: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        try:
            line = self.lines.get(timeout=max(1.0, deadline - time.monotonic()))
        except queue.Empty:
            self.close()
            raise PeerError(f"{self.name}: no answer within {self.timeout:.0f} s") from None
        if line is None:
            self.process.wait()
            raise PeerError(
                f"{self.name} exited ({self.process.returncode}): {self._stderr_tail()}"
            )
        message = json.loads(line)
        if message.get("event") == "error":
            self.close()
            raise PeerError(f"{self.name}: {message['error']}")
        if message.get("event") != expected:
            self.close()
            raise PeerError(f"{self.name}: expected '{expected}', got {message}")
        return message

    def ready(self) -> dict[str, Any]:
        message = self._receive("ready")
        self.versions = message.get("versions", {})
        return message

    def run(self) -> float:
        self._send("run")
        return float(self._receive("time")["seconds"])

    def finish(self) -> dict[str, Any]:
        self._send("finish")
        message = self._receive("done")
        self.close()
        return message

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                assert self.process.stdin is not None
                self.process.stdin.close()
                self.process.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        self.stderr.close()


def cpu_name() -> str:
    """The processor's model name and whether it has bf16 matrix instructions."""
    import platform

    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        return name
    bf16 = sorted(flags & {"avx512_bf16", "amx_bf16"})
    return f"{name} ({', '.join(bf16) if bf16 else 'no avx512_bf16/amx_bf16'})"


def matmul_gflops(dtype: Any, size: int, repeats: int = 3) -> float:
    """GFLOP/s of one ``size x size`` matmul in ``dtype``: the best of ``repeats`` after a warm-up
    (on a shared VM single timings vary by 2x; the best is the closest to what the cores can do)."""
    import torch

    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    a[:64, :64] @ b[:64, :64]
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def interleaved(
    conditions: dict[str, Any], rounds: int, failed: dict[str, str] | None = None
) -> dict[str, list[float]]:
    """Time every condition once per round, rotating the order from round to round.

    ``conditions`` maps a name to a callable returning the seconds its measured work took. A
    peer that fails (:class:`PeerError`) is dropped from the rest of the run and its reason put
    in ``failed``; any other error propagates.
    """
    names = list(conditions)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if name not in times:
                continue
            try:
                times[name].append(conditions[name]())
            except PeerError as exc:
                if failed is None:
                    raise
                failed[name] = str(exc)
                del times[name]
    return times


def speed_ratio(ours: list[float], theirs: list[float]) -> float:
    """Our throughput over theirs on the same work: the median over rounds of their time / ours."""
    import statistics

    return statistics.median(t / o for o, t in zip(ours, theirs))


def write_json(
    path: Path, values: dict[str, Any], notes: dict[str, str], versions: dict[str, str]
) -> None:
    """A flat object of dotted keys, plus ``notes`` (key -> reason) and ``versions``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {**values, "notes": notes, "versions": versions}
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def _busy_and_total() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


def _process_ticks(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime


class OtherLoad:
    """The share of the machine's CPU time that processes other than ours used meanwhile.

    Other work on the same cores makes every timing noisy (with two threads per process, a
    descheduled thread stalls each parallel region), so the benchmarks report it. Linux only;
    ``share()`` is ``None`` elsewhere.
    """

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        try:
            self.start = _busy_and_total(), sum(_process_ticks(p) for p in pids)
        except (OSError, ValueError):
            self.start = None

    def share(self) -> float | None:
        if self.start is None:
            return None
        (busy0, total0), ours0 = self.start
        busy1, total1 = _busy_and_total()
        ours1 = sum(_process_ticks(p) for p in self.pids)
        if total1 <= total0:
            return None
        return max(0.0, ((busy1 - busy0) - (ours1 - ours0)) / (total1 - total0))


def ready_peers(
    starting: dict[str, tuple[Peer, float]], notes: dict[str, str], prefix: str
) -> dict[str, Peer]:
    """Wait for each started peer to load and warm up; one that fails gets a note instead."""
    peers: dict[str, Peer] = {}
    for condition, (peer, began) in starting.items():
        try:
            peer.ready()
            print(f"  {peer.name}: loaded and warmed up in {time.perf_counter() - began:.1f} s")
        except PeerError as exc:
            notes[f"{prefix}.vs_{condition}"] = str(exc)
            print(f"  {peer.name}: cannot run: {exc}")
            continue
        peers[condition] = peer
    return peers


def timed_rounds(
    conditions: dict[str, Any],
    peers: dict[str, Peer],
    rounds: int,
    values: dict[str, Any],
    notes: dict[str, str] | None = None,
    prefix: str = "",
) -> dict[str, list[float]]:
    """Time the conditions interleaved, and report how much other work shared the machine.

    A peer that fails while being timed is removed from ``peers`` (and gets no times), with the
    reason in ``notes[f"{prefix}.vs_{condition}"]``; the other conditions carry on.
    """
    other = OtherLoad([os.getpid(), *(peer.process.pid for peer in peers.values())])
    failed: dict[str, str] = {}
    times = interleaved(conditions, rounds, failed)
    for condition, reason in failed.items():
        print(f"  {condition}: failed while timing: {reason}")
        peers.pop(condition, None)
        if notes is not None:
            notes[f"{prefix}.vs_{condition}"] = f"failed while timing: {reason}"
    share = other.share()
    values["machine.other_cpu_share"] = None if share is None else round(share, 3)
    print("seconds per round (rounds rotate the order):")
    for name, seconds in times.items():
        print(f"  {name:20s} {' '.join(f'{t:7.2f}' for t in seconds)}")
    if share is not None:
        print(f"other processes used {share:.0%} of the machine's CPU time meanwhile")
        if share > 0.1:
            print("warning: other work shared the cores, so these times are noisy")
    return times
