"""Run model-written code and its tests in a separate, locked-down process.

Model code never runs in the emoscope process. Each run gets a fresh empty temporary directory,
an empty environment (no inherited secrets), a new session that is killed as a whole on timeout,
and resource limits: CPU seconds, address space, file size, open files, and no new processes.
Inside, an audit hook refuses sockets and process creation; where the kernel allows it the process
also gets user and network namespaces of its own: no capabilities (so the process limit holds
even when emoscope runs as root) and no network interface but loopback.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

CPU_SECONDS = 10
WALL_SECONDS = 20
MEMORY_BYTES = 1 << 30
FILE_BYTES = 4 << 20
OPEN_FILES = 64
CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
RESULT_MARK = "@@emoscope-result@@"

RUNNER = r"""
import importlib, json, sys, traceback

def _refuse(event, args):
    if event.startswith(("socket.", "subprocess.", "os.fork", "os.exec", "os.posix_spawn",
                         "os.spawn", "os.system", "pty.", "ctypes.")):
        raise PermissionError("blocked in the emoscope sandbox: " + event)

sys.addaudithook(_refuse)
sys.path.insert(0, ".")
results = {}
try:
    module = importlib.import_module(sys.argv[1])
    tests = sorted(name for name in dir(module) if name.startswith("test_"))
    for name in tests:
        try:
            getattr(module, name)()
            results[name] = "passed"
        except AssertionError as exc:
            results[name] = "failed: " + str(exc)[:200]
        except BaseException as exc:
            results[name] = "error: " + type(exc).__name__ + ": " + str(exc)[:200]
    outcome = {"collected": True, "tests": results}
except BaseException as exc:
    outcome = {"collected": False, "error": type(exc).__name__ + ": " + str(exc)[:300]}
sys.stdout.write("\n@@emoscope-result@@" + json.dumps(outcome) + "\n")
sys.stdout.flush()
"""


@dataclass
class SandboxResult:
    """What happened: per-test outcomes, or why the run was stopped."""

    collected: bool
    tests: dict[str, str]
    stopped: str | None
    """``timeout``, ``cpu``, ``memory``, ``killed`` or ``None`` when the run ended by itself."""
    error: str | None
    stdout_tail: str

    @property
    def passed(self) -> bool:
        return (
            self.collected
            and bool(self.tests)
            and all(v == "passed" for v in self.tests.values())
            and self.stopped is None
        )


def _limit(kind: int, value: int) -> None:
    try:
        resource.setrlimit(kind, (value, value))
    except (ValueError, OSError):
        _soft, hard = resource.getrlimit(kind)
        if hard != resource.RLIM_INFINITY and value > hard:
            resource.setrlimit(kind, (hard, hard))


def _prepare_child() -> None:
    """Runs in the child between fork and exec (single-threaded, no Python-level locks held).

    A new user namespace drops every capability the parent had (so even a root parent's child is
    held to the process limit) and lets the child have a network namespace of its own.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
            libc.unshare(CLONE_NEWNET)
    except Exception:
        pass  # the audit hook and the limits still apply
    _limit(resource.RLIMIT_CPU, CPU_SECONDS)
    _limit(resource.RLIMIT_AS, MEMORY_BYTES)
    _limit(resource.RLIMIT_FSIZE, FILE_BYTES)
    _limit(resource.RLIMIT_NOFILE, OPEN_FILES)
    _limit(resource.RLIMIT_CORE, 0)
    _limit(resource.RLIMIT_NPROC, 0)


def run_tests(
    files: Mapping[str, str], test_module: str, wall_seconds: float = WALL_SECONDS
) -> SandboxResult:
    """Write ``files`` into an empty directory and run every ``test_*`` function of
    ``test_module`` there, in a sandboxed interpreter."""
    with tempfile.TemporaryDirectory(prefix="emoscope-sandbox-") as folder:
        root = Path(folder)
        for name, content in files.items():
            target = root / name
            if target.parent != root:
                raise ValueError(f"Sandbox files live at the top level only (got {name}).")
            target.write_text(content, encoding="utf-8")
        (root / "_emoscope_runner.py").write_text(RUNNER, encoding="utf-8")
        process = subprocess.Popen(
            [sys.executable, "-I", "-S", "_emoscope_runner.py", test_module],
            cwd=root,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=_prepare_child,
        )
        stopped = None
        try:
            out, err = process.communicate(timeout=wall_seconds)
        except subprocess.TimeoutExpired:
            stopped = "timeout"
            _kill_group(process)
            out, err = process.communicate()
        finally:
            _kill_group(process)
    text = out.decode("utf-8", "replace")
    if stopped is None and process.returncode < 0:
        stopped = {
            signal.SIGXCPU: "cpu",
            signal.SIGKILL: "killed",
            signal.SIGXFSZ: "file_size",
        }.get(signal.Signals(-process.returncode), "killed")
    if RESULT_MARK in text:
        tail = text.rsplit(RESULT_MARK, 1)[1]
        try:
            outcome = json.loads(tail.strip().splitlines()[0])
        except (ValueError, IndexError):
            outcome = {"collected": False, "error": "unreadable result"}
    else:
        outcome = {"collected": False, "error": err.decode("utf-8", "replace")[-300:] or None}
    tests = outcome.get("tests", {}) if isinstance(outcome, dict) else {}
    if any("MemoryError" in v for v in tests.values()) or "MemoryError" in str(
        outcome.get("error")
    ):
        stopped = stopped or "memory"
    return SandboxResult(
        collected=bool(outcome.get("collected")),
        tests=tests,
        stopped=stopped,
        error=outcome.get("error"),
        stdout_tail=text[-500:],
    )


def _kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
