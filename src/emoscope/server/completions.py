"""Chat completions on the shared engine: admission, streaming of telemetry, and the log.

A :class:`Reply` lives on the event loop. Its tokens arrive from the engine thread through
``loop.call_soon_threadsafe`` into an ``asyncio.Queue``; stop sequences are applied here; the
finished reply is committed to the log before the client sees its end. A reply that ends any
other way (the client left, the server failed) is logged as incomplete and its engine row is
cancelled at once, so its slot goes to the next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sys
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future
from typing import Any

from emoscope.engine import Request, RequestHandle, TokenEvent
from emoscope.errors import EmoscopeError
from emoscope.server.db import ConversationStore
from emoscope.server.errors import APIError
from emoscope.server.stops import StopMatcher
from emoscope.server.telemetry import ReplyReader, TokenUpdate
from emoscope.server.validation import ChatPlan, check_fits, prompt_ids
from emoscope.server.worker import EngineWorker, ShuttingDown
from emoscope.vectors import EmotionBank

RETRY_AFTER_SECONDS = 2


class Admission:
    """Counts requests in flight (on the event loop) and refuses the one too many with 429."""

    def __init__(self, limit: int) -> None:
        self.limit, self.in_flight = limit, 0

    def enter(self) -> None:
        if self.in_flight >= self.limit:
            raise APIError(
                429,
                f"The server is busy ({self.in_flight} requests running or queued); retry in "
                f"{RETRY_AFTER_SECONDS} s.",
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1


async def wait_for(future: Future[Any]) -> Any:
    """Await a future of another thread; an :class:`EmoscopeError` becomes a 400 or 503."""
    try:
        return await asyncio.wrap_future(future)
    except APIError:
        raise
    except ShuttingDown as exc:
        raise APIError(503, str(exc), type="server_error", code="shutting_down") from None
    except EmoscopeError as exc:
        raise APIError(400, str(exc)) from None


class ChatService:
    """Runs chat requests on the engine thread and records them in the log."""

    def __init__(
        self,
        *,
        lm: Any,
        bank: EmotionBank,
        worker: EngineWorker,
        store: ConversationStore,
        admission: Admission,
        model_id: str,
    ) -> None:
        self.lm, self.bank, self.worker, self.store = lm, bank, worker, store
        self.admission, self.model_id = admission, model_id

    async def open(self, plan: ChatPlan) -> Reply:
        """Admit, submit and log a request; a refusal raises before any reply exists."""
        self.admission.enter()
        reply = Reply(self, plan)
        try:
            await reply.start()
        except BaseException:
            reply.abandon()
            raise
        return reply


class Reply:
    """One reply in progress: its tokens so far, the shown text, and how it ended."""

    def __init__(self, service: ChatService, plan: ChatPlan) -> None:
        self.service, self.plan = service, plan
        self.id = secrets.token_hex(16)
        self.created = time.time()
        self.handle_id: int | None = None
        self.prompt_tokens = 0
        self.tokens: list[TokenUpdate] = []
        self.alerts: list[dict[str, Any]] = []
        self.text = ""
        self.finish_reason: str | None = None
        self._updates: asyncio.Queue[TokenUpdate | BaseException] = asyncio.Queue()
        self._stops = StopMatcher(plan.stop)
        self._submitted: Future[RequestHandle] | None = None
        self._logged = False  # its in-progress record has been sent to the log
        self._ended = False  # generation is over (finished, stopped or cancelled)
        self._closed = False  # logged as it ended, and its admission released

    async def start(self) -> None:
        """Submit to the engine (the prompt is tokenized and checked there), then record the
        request as in progress; the client sees nothing before that record is committed."""
        service, plan = self.service, self.plan
        loop = asyncio.get_running_loop()
        reader = ReplyReader(
            service.lm.tokenizer, service.bank.emotions, plan.emotions, plan.top_k, plan.rules
        )
        capacity = service.worker.engine.max_tokens
        updates = self._updates

        def prepare() -> Request:  # engine thread
            ids = prompt_ids(service.lm, plan.turns)
            check_fits(len(ids), plan.sampling.max_new_tokens, capacity)
            return Request(
                ids, plan.sampling, chat=False, steering=plan.steering, emotions=reader.monitored
            )

        def deliver(item: TokenEvent | BaseException) -> None:  # engine thread
            result: TokenUpdate | BaseException
            try:
                result = item if isinstance(item, BaseException) else reader.read(item)
            except Exception as exc:
                result = exc
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening
                loop.call_soon_threadsafe(updates.put_nowait, result)

        self._submitted = service.worker.submit(prepare, deliver)
        handle: RequestHandle = await wait_for(self._submitted)
        self.handle_id, self.prompt_tokens = handle.id, len(handle.prompt_ids)
        self._logged = True
        logged = service.store.begin(
            {
                "id": self.id,
                "created": self.created,
                "model": service.model_id,
                "messages": plan.turns,
                "steering": plan.steering_record,
                "emotions": plan.emotions,
                "rules": [rule.describe() for rule in plan.rules],
                "sampling": plan.sampling_record(),
                "prompt_tokens": self.prompt_tokens,
            }
        )
        try:
            await asyncio.wrap_future(logged)
        except Exception as exc:
            raise APIError(
                500, f"The conversation log could not be written: {exc}", type="server_error"
            ) from None

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)

    async def steps(self) -> AsyncIterator[tuple[str, TokenUpdate]]:
        """Each token with the text it adds to the shown reply (stop sequences held back)."""
        while not self._ended:
            item = await self._updates.get()
            if isinstance(item, BaseException):
                self._ended = True
                raise APIError(
                    500, f"Generation failed: {item}", type="server_error", code="engine_error"
                )
            self.tokens.append(item)
            self.alerts.extend(item.alerts)
            shown, stopped = self._stops.push(item.text)
            if stopped:
                self.finish_reason, self._ended = "stop", True
                if not item.finished and self.handle_id is not None:
                    self.service.worker.cancel(self.handle_id)
            elif item.finished:
                shown += self._stops.flush()
                self.finish_reason = "length" if item.reason == "length" else "stop"
                self._ended = True
            self.text += shown
            yield shown, item

    async def complete(self) -> None:
        """Commit the finished reply; the client is told it is complete only after this."""
        if self._closed:
            return
        self._closed = True
        try:
            await asyncio.wrap_future(self._log("complete"))
        except Exception as exc:
            print(f"emoscope serve: reply {self.id} was not logged: {exc}", file=sys.stderr)
        finally:
            self.service.admission.leave()

    def abandon(self) -> None:
        """End a reply that will not complete: free its engine row and log it incomplete.

        Nothing here awaits, so it is safe in a task that is being cancelled.
        """
        if self._closed:
            return
        self._closed = True
        if not self._ended:
            if self.handle_id is not None:
                self.service.worker.cancel(self.handle_id)
            elif self._submitted is not None:  # still being submitted: cancel once it is
                self._submitted.add_done_callback(self._cancel_submitted)
        self._ended = True
        if self._logged:
            self.log_incomplete()
        self.service.admission.leave()

    def _cancel_submitted(self, future: Future[RequestHandle]) -> None:
        if not future.cancelled() and future.exception() is None:
            self.service.worker.cancel(future.result().id)

    def log_incomplete(self) -> None:
        self._log("incomplete")

    def _log(self, status: str) -> Future[None]:
        return self.service.store.finish(
            self.id,
            status=status,
            reply=self.text,
            finish_reason=self.finish_reason,
            tokens=[t.record() for t in self.tokens],
            alerts=self.alerts,
            prompt_tokens=self.prompt_tokens or None,
        )

    # ----- the OpenAI shapes ------------------------------------------------------------------

    @property
    def completion_id(self) -> str:
        return f"chatcmpl-{self.id}"

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def completion(self) -> dict[str, Any]:
        """The non-streaming response body."""
        return {
            "id": self.completion_id,
            "object": "chat.completion",
            "created": int(self.created),
            "model": self.service.model_id,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": self.text},
                    "finish_reason": self.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": self.usage(),
            "emoscope": {
                "conversation_id": self.id,
                "emotions": self.plan.emotions,
                "tokens": [t.entry() for t in self.tokens],
                "alerts": self.alerts,
            },
        }

    def chunk(
        self,
        delta: dict[str, Any],
        *,
        finish_reason: str | None = None,
        token: TokenUpdate | None = None,
    ) -> dict[str, Any]:
        """One streamed ``chat.completion.chunk`` with that token's telemetry."""
        return {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": int(self.created),
            "model": self.service.model_id,
            "choices": [
                {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            ],
            "emoscope": {
                "conversation_id": self.id,
                "tokens": [] if token is None else [token.entry()],
                "alerts": [] if token is None else token.alerts,
            },
        }

    def usage_chunk(self) -> dict[str, Any]:
        """The last chunk when the client asked for ``stream_options.include_usage``."""
        return {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": int(self.created),
            "model": self.service.model_id,
            "choices": [],
            "usage": self.usage(),
            "emoscope": {"conversation_id": self.id, "tokens": [], "alerts": []},
        }
