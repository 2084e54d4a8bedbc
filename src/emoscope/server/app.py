"""The web application: OpenAI-compatible chat completions with emotion telemetry, transcript
scoring, the emotion map, the conversation log, and the dashboard's static files.

One :class:`~emoscope.engine.Engine` serves every request (:mod:`emoscope.server.worker`);
handlers only validate, wait and format, so a slow client never holds up the others.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from emoscope.engine import Engine
from emoscope.errors import EmoscopeError
from emoscope.monitor import Monitor
from emoscope.server.completions import Admission, ChatService, Reply, wait_for
from emoscope.server.db import ConversationStore
from emoscope.server.emotion_map import emotion_map
from emoscope.server.errors import APIError, bad_request, error_body
from emoscope.server.limits import ServerLimits
from emoscope.server.schemas import ChatCompletionRequest, ScoreRequest
from emoscope.server.security import APIKeyMiddleware, check_exposure
from emoscope.server.telemetry import number, strongest
from emoscope.server.validation import (
    chat_plan,
    check_emotions,
    decode_json,
    parse,
    prompt_ids,
    reject_unsupported,
    turns_of,
)
from emoscope.server.worker import EngineWorker
from emoscope.vectors import EmotionBank

STATIC = Path(__file__).with_name("static")
CONVERSATION_ID = re.compile(r"^[0-9a-f]{32}$")
T = TypeVar("T")


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


def served_model_id(lm: Any) -> str:
    """The id clients name the model by: a folder or file is known by its own name only, so no
    server path appears in the API."""
    path = Path(lm.name)
    if path.suffix == ".gguf" or (path.is_absolute() and path.exists()):
        return path.name
    return str(lm.name)


def has_z_scores(bank: EmotionBank) -> bool:
    layer = bank.default_layer
    return all(
        f"{name}.{layer}" in bank.stats for name in ("neutral_score_mean", "neutral_score_std")
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    too_large = APIError(
        413,
        f"The request body is larger than this server's limit of {limit} bytes.",
        code="request_too_large",
    )
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def until_disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(until_disconnected(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientGone()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def sse(data: Any) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False, allow_nan=False)}\n\n".encode()


class EventStream(StreamingResponse):
    """Server-sent events that stop, and close their generator, the moment the client leaves,
    even while nothing is being sent (a request still waiting for a slot)."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as group:

            async def stream() -> None:
                try:
                    await self.stream_response(send)
                except OSError:  # the client went away mid-send
                    pass
                finally:
                    with anyio.CancelScope(shield=True):
                        await self.body_iterator.aclose()  # type: ignore[attr-defined]
                    group.cancel_scope.cancel()

            group.start_soon(stream)
            await until_disconnected(receive)
            group.cancel_scope.cancel()


async def stream_reply(reply: Reply) -> AsyncIterator[bytes]:
    try:
        yield sse(reply.chunk({"role": "assistant", "content": ""}))
        async for shown, token in reply.steps():
            yield sse(reply.chunk({"content": shown}, token=token))
        await reply.complete()  # in the log before the client sees the end
        yield sse(reply.chunk({}, finish_reason=reply.finish_reason))
        if reply.plan.include_usage:
            yield sse(reply.usage_chunk())
        yield b"data: [DONE]\n\n"
    except APIError as exc:
        reply.abandon()
        yield sse(exc.body())
        yield b"data: [DONE]\n\n"
    finally:
        reply.abandon()  # nothing to do once complete


def create_app(
    lm: Any,
    bank: EmotionBank,
    db_path: Path | str,
    *,
    api_key: str | None = None,
    cors_origins: Sequence[str] = (),
    limits: ServerLimits | None = None,
    clusters: dict[str, int] | None = None,
    allow_other_model: bool = False,
) -> FastAPI:
    """The emoscope web application for one model and bank.

    Args:
        lm: the loaded model; the app's engine thread is the only user of it from now on.
        bank: its emotion bank.
        db_path: SQLite file of the conversation log (created if missing).
        api_key: when given, every route needs it (``Authorization: Bearer KEY``).
        cors_origins: origins allowed to call the API from a browser (none by default).
        limits: request and load limits (:class:`ServerLimits` defaults).
        clusters: emotion -> cluster for the emotion map (default: k-means on the bank).
        allow_other_model: use a bank built for a differently named model of the same size.

    Example:
        >>> app = create_app(lm, bank, "emoscope.db")
        >>> uvicorn.run(app, host="127.0.0.1", port=8000)
    """
    limits = limits or ServerLimits()
    if api_key is not None and not api_key.strip():
        raise EmoscopeError("The API key is empty.")
    engine = Engine(
        lm,
        bank=bank,
        max_batch=limits.max_batch,
        max_tokens=limits.context_tokens,
        allow_other_model=allow_other_model,
    )
    monitor = Monitor(lm, bank, allow_other_model=allow_other_model)
    emotions = emotion_map(bank, clusters)
    store = ConversationStore(db_path)
    worker = EngineWorker(engine)
    admission = Admission(limits.max_in_flight)
    model_id = served_model_id(lm)
    chat = ChatService(
        lm=lm,
        bank=bank,
        worker=worker,
        store=store,
        admission=admission,
        model_id=model_id,
    )
    z_available = has_z_scores(bank)
    capacity = engine.max_tokens

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            worker.stop()
            store.close()

    app = FastAPI(
        title="emoscope",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.engine, app.state.store, app.state.limits = engine, store, limits

    if api_key is not None:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )

    # ----- errors: always the OpenAI shape -------------------------------------------------

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        body = error_body(str(exc.detail), "invalid_request_error", None, code)
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first["loc"][1:]) or None
        body = error_body(f"Invalid '{param}': {first['msg']}.", "invalid_request_error", param)
        return JSONResponse(body, status_code=400)

    @app.exception_handler(Exception)
    async def server_error(_: Request, exc: Exception) -> JSONResponse:
        print(f"emoscope serve: {type(exc).__name__}: {exc}", file=sys.stderr)
        body = error_body("Internal server error.", "server_error", None, "internal_error")
        return JSONResponse(body, status_code=500)

    def check_model(requested: str | None) -> None:
        if requested and requested != model_id:
            raise APIError(
                404,
                f"The model '{requested}' is not served here; this server runs '{model_id}'.",
                param="model",
                code="model_not_found",
            )

    async def json_body(request: Request) -> Any:
        return decode_json(await read_body(request, limits.max_body_bytes))

    # ----- the OpenAI-compatible API --------------------------------------------------------

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        entry = {"id": model_id, "object": "model", "created": 0, "owned_by": "emoscope"}
        return {"object": "list", "data": [entry]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        data = await json_body(request)
        if isinstance(data, dict):
            reject_unsupported(data)
        body = parse(ChatCompletionRequest, data)
        check_model(body.model)
        plan = chat_plan(body, lm=lm, bank=bank, limits=limits, z_available=z_available)
        reply = await chat.open(plan)
        if plan.stream:
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return EventStream(stream_reply(reply), headers=headers)

        async def run() -> None:
            async for _ in reply.steps():
                pass
            await reply.complete()

        try:
            await unless_client_leaves(request, run())
        except ClientGone:
            return Response(status_code=499)
        finally:
            reply.abandon()  # nothing to do once complete
        return JSONResponse(reply.completion())

    # ----- emoscope's own routes -------------------------------------------------------------

    @app.get("/v1/emotions")
    async def emotion_list() -> dict[str, Any]:
        return {"data": emotions}

    @app.post("/v1/score")
    async def score(request: Request) -> dict[str, Any]:
        body = parse(ScoreRequest, await json_body(request))
        check_model(body.model)
        reported = check_emotions(bank, body.emotions, "emotions")
        if body.top_k > len(bank.emotions):
            raise bad_request(
                f"top_k is {body.top_k}; the bank has {len(bank.emotions)} emotions.",
                param="top_k",
            )
        turns = turns_of(body.messages)

        def work() -> Any:  # engine thread
            size = len(prompt_ids(lm, turns, generation=False))
            if size > capacity:
                raise APIError(
                    400,
                    f"The messages take {size} tokens; this server reads at most {capacity}.",
                    param="messages",
                    code="context_length_exceeded",
                )
            return monitor.score(turns)

        admission.enter()
        try:
            readout = await wait_for(worker.call(work))
        finally:
            admission.leave()
        values = readout.z if readout.z is not None else readout.scores
        columns = [readout.emotions.index(e) for e in reported]
        rows = values.float().tolist()
        return {
            "tokens": [
                {
                    "index": i,
                    "text": text,
                    "role": readout.roles[i] if readout.roles else None,
                    "scores": {e: number(rows[i][c]) for e, c in zip(reported, columns)},
                    "top": strongest(readout.emotions, rows[i], body.top_k),
                }
                for i, text in enumerate(readout.tokens)
            ]
        }

    @app.get("/v1/conversations")
    async def conversations(limit: int = 50) -> dict[str, Any]:
        if not 1 <= limit <= 1000:
            raise bad_request("limit must be between 1 and 1000.", param="limit")
        return {"data": await asyncio.to_thread(store.conversations, limit)}

    @app.get("/v1/conversations/{conversation_id}")
    async def conversation(conversation_id: str) -> dict[str, Any]:
        found = None
        if CONVERSATION_ID.match(conversation_id):
            found = await asyncio.to_thread(store.conversation, conversation_id)
        if found is None:
            raise APIError(
                404,
                f"No conversation '{conversation_id}'.",
                param="conversation_id",
                code="not_found",
            )
        return found

    @app.get("/v1/alerts")
    async def alerts(
        emotion: str | None = None, since: str | None = None, limit: int = 100
    ) -> dict[str, Any]:
        name = None if emotion is None else check_emotions(bank, [emotion], "emotion")[0]
        if not 1 <= limit <= 1000:
            raise bad_request("limit must be between 1 and 1000.", param="limit")
        found = await asyncio.to_thread(store.alerts, name, parse_since(since), limit)
        return {"data": found}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok" if worker.alive else "stopped",
            "model": model_id,
            "running": engine.running,
            "waiting": engine.waiting,
            "in_flight": admission.in_flight,
            "max_in_flight": limits.max_in_flight,
        }

    # ----- the dashboard ------------------------------------------------------------------------

    @app.get("/", response_model=None)
    async def index() -> Response:
        page = STATIC / "index.html"
        if not page.is_file():
            raise APIError(404, "The dashboard is not installed.", code="not_found")
        return FileResponse(page, media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC, check_dir=False), name="static")
    return app


def parse_since(since: str | None) -> float | None:
    """``since`` as seconds since the epoch: a number, or an ISO 8601 date and time."""
    if since is None or not since.strip():
        return None
    try:
        return float(since)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(since.strip()).timestamp()
    except ValueError:
        raise bad_request(
            f"since={since!r} is neither seconds since the epoch nor an ISO 8601 time.",
            param="since",
        ) from None


def listening_socket(host: str, port: int) -> socket.socket:
    """Bind now, so a taken port is one clear error before the model is in use."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        raise EmoscopeError(f"Cannot listen on {host}:{port}: {exc.strerror or exc}.") from None
    return sock


def serve(
    lm: Any,
    bank: EmotionBank,
    db_path: Path | str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    cors_origins: Sequence[str] = (),
    limits: ServerLimits | None = None,
    clusters: dict[str, int] | None = None,
    allow_other_model: bool = False,
    log_level: str = "warning",
) -> None:
    """Serve :func:`create_app` with uvicorn until interrupted.

    Listening beyond loopback needs an API key (:func:`~emoscope.server.security.check_exposure`).
    """
    import uvicorn

    check_exposure(host, api_key)
    app = create_app(
        lm,
        bank,
        db_path,
        api_key=api_key,
        cors_origins=cors_origins,
        limits=limits,
        clusters=clusters,
        allow_other_model=allow_other_model,
    )
    sock = listening_socket(host, port)
    shown = f"[{host}]" if ":" in host else host
    print(f"emoscope serve: http://{shown}:{sock.getsockname()[1]}/ ({served_model_id(lm)})")
    if app.state.store.recovered:
        print(
            f"emoscope serve: {app.state.store.recovered} conversation(s) a previous server left "
            "in progress are marked incomplete"
        )
    sys.stdout.flush()
    config = uvicorn.Config(
        app, log_level=log_level, timeout_graceful_shutdown=5, server_header=False
    )
    uvicorn.Server(config).run(sockets=[sock])
