"""The one thread that owns the engine, and with it the model and the tokenizer.

The engine is single-threaded, and the model carries hooks while a step runs, so nothing else
may touch either: web handlers hand work to this thread through a queue (submit a request,
cancel one, or run a function between steps, such as scoring a transcript) and get results back
through futures and per-request callbacks. Between commands the thread steps the engine while
any request is waiting or running, so all requests share every forward pass.
"""

from __future__ import annotations

import queue
import sys
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from emoscope.engine import Engine, Request, RequestHandle, TokenEvent
from emoscope.errors import EmoscopeError

T = TypeVar("T")
Deliver = Callable[[TokenEvent | BaseException], None]
"""Called on the engine thread with each event of a request, or once with the error that ended
it; it must be quick and must not raise."""

_IDLE_WAIT = 0.5


class ShuttingDown(EmoscopeError):
    """The worker is stopping: the request was not run, or not to its end."""


class EngineWorker:
    """Runs ``engine.step()`` in a background thread for every submitted request.

    Example:
        >>> worker = EngineWorker(engine)
        >>> worker.start()
        >>> handle = worker.submit(lambda: Request(ids), deliver).result()
        >>> worker.cancel(handle.id)
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._deliver: dict[int, Deliver] = {}
        self._handles: dict[int, RequestHandle] = {}
        self._thread = threading.Thread(target=self._run, name="emoscope-engine", daemon=True)
        self._stopping = False

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """End every request with an error and stop the thread."""
        if self._thread.is_alive():
            self._commands.put(("stop", None))
            self._thread.join(timeout)
        self._stopping = True
        self._refuse_queued()

    # ----- from any thread -------------------------------------------------------------------

    def submit(self, prepare: Callable[[], Request], deliver: Deliver) -> Future[RequestHandle]:
        """Build a request on the engine thread (``prepare`` may tokenize and refuse it) and
        submit it; ``deliver`` then gets its events. The future holds the handle or the error."""
        future: Future[RequestHandle] = Future()
        self._send("submit", (prepare, deliver, future), future)
        return future

    def cancel(self, request_id: int) -> None:
        """Stop a request and free its slot; events not yet delivered are dropped."""
        self._commands.put(("cancel", request_id))

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run ``fn`` on the engine thread between two steps."""
        future: Future[T] = Future()
        self._send("call", (fn, future), future)
        return future

    def _send(self, kind: str, payload: Any, future: Future[Any]) -> None:
        if self._stopping or not self._thread.is_alive():
            future.set_exception(ShuttingDown("The server is shutting down."))
            return
        self._commands.put((kind, payload))

    # ----- on the engine thread --------------------------------------------------------------

    def _run(self) -> None:
        while True:
            busy = bool(self.engine.running or self.engine.waiting)
            try:
                command = self._commands.get(block=not busy, timeout=None if busy else _IDLE_WAIT)
            except queue.Empty:
                command = None
            while command is not None:
                try:
                    carry_on = self._execute(command)
                except Exception:  # a bug: report it and keep serving
                    traceback.print_exc(file=sys.stderr)
                    carry_on = True
                if not carry_on:
                    self._shut_down()
                    return
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            if self.engine.running or self.engine.waiting:
                self._step()

    def _execute(self, command: tuple[str, Any]) -> bool:
        kind, payload = command
        if kind == "stop":
            return False
        if kind == "cancel":
            handle = self._handles.pop(payload, None)
            self._deliver.pop(payload, None)
            if handle is not None:
                handle.cancel()
        elif kind == "submit":
            prepare, deliver, future = payload
            if future.set_running_or_notify_cancel():
                try:
                    handle = self.engine.submit(prepare())
                except BaseException as exc:
                    future.set_exception(exc)
                else:
                    self._handles[handle.id] = handle
                    self._deliver[handle.id] = deliver
                    future.set_result(handle)
        elif kind == "call":
            fn, future = payload
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:
                    future.set_exception(exc)
        return True

    def _step(self) -> None:
        try:
            events = self.engine.step()
        except Exception as exc:  # a bug: fail the requests in flight, keep serving
            traceback.print_exc(file=sys.stderr)
            self._fail_all(exc)
            return
        for event in events:
            deliver = self._deliver.get(event.request_id)
            if deliver is not None:
                deliver(event)
            if event.finished:
                self._deliver.pop(event.request_id, None)
                self._handles.pop(event.request_id, None)

    def _fail_all(self, exc: BaseException) -> None:
        deliveries = list(self._deliver.values())
        self._deliver.clear()
        self._handles.clear()
        try:
            self.engine.close()  # cancels everything and frees the cache
        except Exception:
            traceback.print_exc(file=sys.stderr)
        for deliver in deliveries:
            deliver(exc)

    def _shut_down(self) -> None:
        self._stopping = True
        self._fail_all(ShuttingDown("The server is shutting down."))
        self._refuse_queued()

    def _refuse_queued(self) -> None:
        """Answer every command still queued (sent while the thread was stopping)."""
        while True:
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind in ("submit", "call"):
                future = payload[-1]
                if future.set_running_or_notify_cancel():
                    future.set_exception(ShuttingDown("The server is shutting down."))
