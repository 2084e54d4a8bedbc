"""emoscope serve: the OpenAI-compatible API with telemetry, bad input, the API key, the log,
and a real server process (the official openai client, a full queue, a client that leaves,
kill -9 in the middle of a stream)."""

from __future__ import annotations

import base64
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
import transformers as tf
from fastapi.testclient import TestClient

from conftest import char_tokenizer, synthetic_bank, tiny_config
from emoscope.cli import main
from emoscope.concepts import EMOTIONS
from emoscope.errors import EmoscopeError
from emoscope.models import wrap_model
from emoscope.server import ServerLimits, create_app
from emoscope.server.db import ConversationStore
from emoscope.server.security import check_exposure, is_loopback
from emoscope.server.stops import StopMatcher

LIMITS = ServerLimits(max_batch=4, max_queue=4, context_tokens=200, max_new_tokens=40)
ALWAYS = "happy > -1000 sigma for 2 tokens"  # fires on the second token of every reply


def ask(content: str = "hello there", **extra) -> dict:
    return {"model": "tiny-llama", "messages": [{"role": "user", "content": content}], **extra}


def events(text: str) -> list:
    """The data of each server-sent event, JSON-decoded except the closing [DONE]."""
    out = []
    for line in text.splitlines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


@pytest.fixture(scope="module")
def tiny(tiny_lm):
    lm = tiny_lm("llama")
    return lm, synthetic_bank(lm)


@pytest.fixture(scope="module")
def served(tiny, tmp_path_factory):
    lm, bank = tiny
    db = tmp_path_factory.mktemp("serve") / "log.db"
    with TestClient(create_app(lm, bank, db, limits=LIMITS)) as client:
        yield client, db


# ----- chat completions in process ------------------------------------------------------------


def test_reply_carries_telemetry_and_is_logged(served):
    client, _ = served
    body = ask(
        max_tokens=6,
        temperature=0,
        emoscope={
            "emotions": ["Calm", "sad"],
            "alerts": [ALWAYS],
            "steering": {"emotions": {"calm": 0.2}, "layers": [1], "positions": "response"},
            "top_k": 2,
            "ignore_eos": True,
        },
    )
    reply = client.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    data = reply.json()
    assert data["object"] == "chat.completion" and data["model"] == "tiny-llama"
    choice = data["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["role"] == "assistant"
    assert data["usage"]["completion_tokens"] == 6 and data["usage"]["prompt_tokens"] > 0
    scope = data["emoscope"]
    assert scope["emotions"] == ["calm", "sad", "happy"]  # the rule's emotion is reported too
    assert [t["index"] for t in scope["tokens"]] == list(range(6))
    assert "".join(t["text"] for t in scope["tokens"]) == choice["message"]["content"]
    for token in scope["tokens"]:
        assert set(token["scores"]) == {"calm", "sad", "happy"}
        assert len(token["top"]) == 2 and token["top"][0][1] >= token["top"][1][1]
    assert [(a["token_index"], a["emotion"]) for a in scope["alerts"]] == [(1, "happy")]

    logged = client.get(f"/v1/conversations/{scope['conversation_id']}").json()
    assert logged["status"] == "complete" and logged["reply"] == choice["message"]["content"]
    assert logged["messages"] == body["messages"] and logged["finish_reason"] == "length"
    assert logged["steering"] == {"emotions": {"calm": 0.2}, "layers": [1], "positions": "response"}
    assert [t["scores"] for t in logged["tokens"]] == [t["scores"] for t in scope["tokens"]]
    assert logged["alerts"][0]["rule"] == scope["alerts"][0]["rule"]

    alerts = client.get("/v1/alerts", params={"emotion": "happy"}).json()["data"]
    assert scope["conversation_id"] in {a["conversation_id"] for a in alerts}
    later = client.get("/v1/alerts", params={"since": time.time() + 60}).json()["data"]
    assert later == []
    iso = client.get("/v1/alerts", params={"since": "2000-01-01T00:00:00"}).json()["data"]
    assert len(iso) >= 1


def test_stream_follows_the_chunk_schema(served):
    client, _ = served
    body = ask(
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
        seed=3,
        emoscope={"emotions": ["afraid"], "alerts": [ALWAYS], "ignore_eos": True},
    )
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = events(response.read().decode())
    assert chunks[-1] == "[DONE]"
    first, *tokens, last, usage, _ = chunks
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in [first, *tokens, last])
    assert len({c["id"] for c in [first, *tokens, last]}) == 1
    assert [c["emoscope"]["tokens"][0]["index"] for c in tokens] == list(range(5))
    assert [len(c["emoscope"]["alerts"]) for c in tokens] == [0, 1, 0, 0, 0]
    assert last["choices"][0] == {
        "index": 0,
        "delta": {},
        "finish_reason": "length",
        "logprobs": None,
    }
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5
    text = "".join(c["choices"][0]["delta"]["content"] for c in tokens)
    logged = client.get(f"/v1/conversations/{first['emoscope']['conversation_id']}").json()
    assert logged["status"] == "complete" and logged["reply"] == text


def test_stop_sequence_ends_the_reply_before_it(served):
    client, _ = served
    greedy = ask(max_tokens=20, temperature=0, emoscope={"ignore_eos": True})
    full = client.post("/v1/chat/completions", json=greedy).json()
    text = full["choices"][0]["message"]["content"]
    stop = text[5:8]
    cut = client.post("/v1/chat/completions", json={**greedy, "stop": [stop, "never"]}).json()
    assert cut["choices"][0]["message"]["content"] == text[: text.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert cut["usage"]["completion_tokens"] < 20


def test_concurrent_requests_share_the_engine_and_keep_their_own_replies(served):
    client, _ = served

    def greedy(prompt: str) -> dict:
        body = ask(prompt, max_tokens=40, temperature=0, emoscope={"ignore_eos": True})
        return client.post("/v1/chat/completions", json=body).json()

    alone = greedy("the cat sat")["choices"][0]["message"]["content"]
    engine = client.app.state.engine
    step, widest = engine.step, []

    def counting_step():  # on the engine thread: how many rows share each pass
        widest.append(engine.running + engine.waiting)
        return step()

    engine.step = counting_step
    prompts = ["the cat sat", "a dog ran far away", "hi", "the cat sat", "one two three"]
    try:
        with ThreadPoolExecutor(5) as pool:
            replies = list(pool.map(greedy, prompts))
    finally:
        del engine.step
    assert max(widest) > 1
    assert replies[0]["choices"][0]["message"]["content"] == alone
    assert replies[3]["choices"][0]["message"]["content"] == alone
    ids = {r["emoscope"]["conversation_id"] for r in replies}
    assert len(ids) == 5
    for reply in replies:
        logged = client.get(f"/v1/conversations/{reply['emoscope']['conversation_id']}").json()
        assert logged["reply"] == reply["choices"][0]["message"]["content"]
    assert client.get("/health").json()["in_flight"] == 0


def test_models_emotions_and_score(served, tiny):
    client, _ = served
    _, bank = tiny
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == "tiny-llama" and models["object"] == "list"
    rows = client.get("/v1/emotions").json()["data"]
    assert [r["name"] for r in rows] == bank.emotions
    assert all(set(r) == {"name", "valence", "arousal", "cluster", "x", "y"} for r in rows)
    by_name = {r["name"]: r for r in rows}
    assert by_name["happy"]["valence"] > by_name["sad"]["valence"]
    assert by_name["happy"]["x"] > by_name["sad"]["x"]  # x is turned to rise with valence

    transcript = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    scored = client.post("/v1/score", json={"messages": transcript, "emotions": ["sad"]}).json()
    tokens = scored["tokens"]
    assert [t["index"] for t in tokens] == list(range(len(tokens)))
    assert {"user", "assistant"} <= {t["role"] for t in tokens}
    assert all(set(t["scores"]) == {"sad"} and len(t["top"]) <= 3 for t in tokens)


def test_static_dashboard_is_served(served):
    client, _ = served
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert client.get("/static/../app.py").status_code == 404


# ----- bad input -----------------------------------------------------------------------------

BAD = [
    (b"{not json", 400, "invalid_json", None),
    (b"[1, 2]", 400, "invalid_json", None),
    (
        b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
        400,
        "invalid_json",
        None,
    ),
    (ask(messages=[]), 400, None, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, None, "messages.0.role"),
    ({"messages": [{"role": "user", "content": 3}]}, 400, None, "messages.0.content"),
    (ask(temperature=3), 400, None, "temperature"),
    (ask(n=2), 400, None, "n"),
    (ask(tools=[{"type": "function"}]), 400, None, "tools"),
    (ask(model="gpt-4o"), 404, "model_not_found", "model"),
    (ask(max_tokens=41), 400, "max_tokens_exceeded", "max_tokens"),
    (ask("x " * 100, max_tokens=40), 400, "context_length_exceeded", "messages"),
    (ask(emoscope={"emotions": ["joyy"]}), 400, "unknown_emotion", "emoscope.emotions.0"),
    (ask(emoscope={"emotions": ["joyful"]}), 400, "unknown_emotion", "emoscope.emotions.0"),
    (ask(emoscope={"colour": 1}), 400, None, "emoscope.colour"),
    (ask(emoscope={"top_k": 5}), 400, None, "emoscope.top_k"),
    (ask(emoscope={"alerts": ["happy is high"]}), 400, "invalid_alert_rule", "emoscope.alerts.0"),
    (ask(emoscope={"alerts": ["gap:happy > 1"]}), 400, "invalid_alert_rule", "emoscope.alerts.0"),
    (
        ask(emoscope={"steering": {"emotions": {"calm": 1.5}}}),
        400,
        "strength_out_of_range",
        "emoscope.steering.emotions.calm",
    ),
    (
        ask(emoscope={"steering": {"emotions": {"nope": 0.1}}}),
        400,
        "unknown_emotion",
        "emoscope.steering.emotions.nope",
    ),
    (
        ask(emoscope={"steering": {"emotions": {"calm": 0.1}, "layers": [3]}}),
        400,
        "unknown_layer",
        "emoscope.steering.layers",
    ),
    (
        ask(emoscope={"steering": {"emotions": {"calm": 0.1}, "positions": "/etc/passwd"}}),
        400,
        None,
        "emoscope.steering.positions",
    ),
]


@pytest.mark.parametrize("body, status, code, param", BAD)
def test_bad_input_is_a_clear_4xx(served, body, status, code, param):
    client, _ = served
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = client.post("/v1/chat/completions", content=raw)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    if code:
        assert error["code"] == code
    if param:
        assert error["param"] == param


def test_other_bad_requests(served):
    client, _ = served
    huge = client.post("/v1/chat/completions", content=b"x" * (LIMITS.max_body_bytes + 1))
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
    missing = client.get("/v1/conversations/" + "0" * 32)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert client.get("/v1/conversations/..%2F..%2Fetc").status_code == 404
    assert client.get("/v1/alerts", params={"since": "yesterday"}).status_code == 400
    assert client.get("/v1/alerts", params={"emotion": "joyy"}).json()["error"]["param"]
    assert client.get("/v1/alerts", params={"limit": "lots"}).status_code == 400
    score = client.post("/v1/score", json={"messages": [{"role": "user", "content": "hi"}], "x": 1})
    assert score.status_code == 400 and score.json()["error"]["param"] == "x"
    assert client.get("/nowhere").json()["error"]["code"] == "not_found"
    assert client.get("/health").json()["in_flight"] == 0


def test_stop_matcher_holds_back_a_split_stop():
    matcher = StopMatcher(["END"])
    assert matcher.push("abc E") == ("abc ", False)
    assert matcher.push("N") == ("", False)
    assert matcher.push("x") == ("ENx", False)
    assert matcher.push("E") == ("", False)
    assert matcher.push("ND more") == ("", True)
    assert StopMatcher([]).push("END") == ("END", False)


# ----- the API key -----------------------------------------------------------------------------


def test_non_loopback_host_needs_a_key(tiny, tmp_path, monkeypatch, capsys):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")
    with pytest.raises(EmoscopeError, match="API key"):
        check_exposure("0.0.0.0", None)

    lm, bank = tiny
    folder = bank.save(tmp_path / "bank")
    monkeypatch.delenv("EMOSCOPE_API_KEY", raising=False)
    loads = []
    monkeypatch.setattr("emoscope.cli._model_for", lambda *a: loads.append(a) or lm)
    code = main(["serve", "--bank", str(folder), "--host", "0.0.0.0", "--db", str(tmp_path / "d")])
    assert code == 2 and not loads  # refused before any model is loaded
    assert capsys.readouterr().err.startswith("error: Listening on 0.0.0.0")

    # With the key from the environment, serve() builds an app that checks it on every route.
    import uvicorn

    built = {}
    monkeypatch.setenv("EMOSCOPE_API_KEY", "s3cret")
    monkeypatch.setattr(
        uvicorn.Server, "run", lambda self, sockets: built.update(app=self.config.app)
    )
    monkeypatch.setattr("emoscope.server.app.listening_socket", lambda host, port: _socket(host))
    assert (
        main(["serve", "--bank", str(folder), "--host", "0.0.0.0", "--db", str(tmp_path / "d")])
        == 0
    )
    with TestClient(built["app"]) as client:
        for path in ("/v1/models", "/", "/static/vendor/uPlot.min.css", "/health"):
            denied = client.get(path)
            assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
        wrong = client.get("/v1/models", headers={"Authorization": "Bearer s3cres"})
        assert wrong.status_code == 401 and "Wrong" in wrong.json()["error"]["message"]
        bearer = {"Authorization": "Bearer s3cret"}
        assert client.get("/v1/models", headers=bearer).status_code == 200
        chat = client.post("/v1/chat/completions", json=ask(max_tokens=2), headers=bearer)
        assert chat.status_code == 200
        basic = base64.b64encode(b"anyone:s3cret").decode()
        assert client.get("/", headers={"Authorization": f"Basic {basic}"}).status_code == 200


class _socket:
    """Stands in for the listening socket when uvicorn is not run."""

    def __init__(self, host: str) -> None:
        self.host = host

    def getsockname(self) -> tuple[str, int]:
        return self.host, 8000


# ----- the log ---------------------------------------------------------------------------------


def test_log_export_writes_every_conversation(served, tmp_path, capsys):
    client, db = served
    client.post("/v1/chat/completions", json=ask(max_tokens=3))
    out = tmp_path / "log.jsonl"
    assert main(["log", "export", "--db", str(db), "--out", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines and all(r["status"] in ("complete", "incomplete") for r in lines)
    assert all("tokens" in r and "alerts" in r and "messages" in r for r in lines)
    assert main(["log", "export", "--db", str(tmp_path / "absent.db")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_a_store_left_in_progress_is_marked_incomplete(tmp_path):
    store = ConversationStore(tmp_path / "x.db")
    record = {"id": "a" * 32, "created": 1.0, "model": "m", "messages": [], "emotions": []}
    store.begin({**record, "rules": [], "sampling": {}}).result()
    store.close()
    reopened = ConversationStore(tmp_path / "x.db")
    assert reopened.recovered == 1
    assert reopened.conversation("a" * 32)["status"] == "incomplete"
    reopened.close()


# ----- the real model ---------------------------------------------------------------------------


def test_real_model_chat_template_and_roles(smollm, tmp_path):
    bank = synthetic_bank(smollm, emotions=EMOTIONS, layers=(20,))
    bank.stats["residual_norm.20"] = torch.tensor([240.0])  # SmolLM2's average norm there
    app = create_app(smollm, bank, tmp_path / "log.db", limits=LIMITS)
    transcript = [
        {"role": "system", "content": "You are brief."},
        {"role": "user", "content": "My exam is tomorrow."},
        {"role": "assistant", "content": "You will do fine."},
    ]
    with TestClient(app) as client:
        scored = client.post("/v1/score", json={"messages": transcript, "emotions": ["afraid"]})
        roles = [t["role"] for t in scored.json()["tokens"]]
        assert {"system", "user", "assistant", "format"} <= set(roles)
        body = {"model": "smollm2-135m-instruct", "messages": transcript[:2], "max_tokens": 4}
        reply = client.post("/v1/chat/completions", json={**body, "temperature": 0}).json()
        assert reply["choices"][0]["message"]["content"].strip()
        assert len(reply["emoscope"]["tokens"][0]["top"]) == 3


# ----- a real server process ----------------------------------------------------------------------


class ServerProcess:
    """``emoscope serve`` on a free loopback port, for one model folder, bank and log."""

    def __init__(self, root: Path, model: Path, bank: Path) -> None:
        self.root, self.model, self.bank, self.db = root, model, bank, root / "log.db"
        self.process: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> None:
        command = [
            sys.executable, "-m", "emoscope.cli", "serve", "--bank", str(self.bank),
            "--model", str(self.model), "--port", "0", "--db", str(self.db),
            "--max-batch", "1", "--max-queue", "0", "--context", "1200", "--max-new-tokens", "1000",
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.pop("EMOSCOPE_API_KEY", None)
        stderr = (self.root / "stderr.txt").open("a")
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env
        )
        line = self.process.stdout.readline()
        assert "http://127.0.0.1:" in line, (self.root / "stderr.txt").read_text()[-3000:]
        self.url = line.split()[2].rstrip("/")
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError("the server did not answer within 60 s")

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("process")
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tiny_config("llama"), dtype=torch.float32)
    model.save_pretrained(root / "model")
    char_tokenizer().save_pretrained(root / "model")
    lm = wrap_model(model, char_tokenizer(), str((root / "model").resolve()))
    bank = synthetic_bank(lm).save(root / "bank")
    process = ServerProcess(root, root / "model", bank)
    process.start()
    yield process
    process.stop()


def long_stream(server: ServerProcess) -> tuple[httpx.Client, httpx.Response]:
    """A streamed reply of 1000 tokens, open after its first chunk has arrived."""
    client = httpx.Client(timeout=30)
    body = {
        "model": "model",
        "messages": [{"role": "user", "content": "tell me everything"}],
        "max_tokens": 1000,
        "stream": True,
        "emoscope": {"ignore_eos": True, "emotions": ["calm"]},
    }
    request = client.build_request("POST", f"{server.url}/v1/chat/completions", json=body)
    response = client.send(request, stream=True)
    assert response.status_code == 200
    response.lines = response.iter_lines()  # kept: closing it would close the response
    first = next(line for line in response.lines if line.startswith("data: "))
    response.conversation_id = json.loads(first[6:])["emoscope"]["conversation_id"]
    next(line for line in response.lines if line.startswith("data: "))  # a token exists
    return client, response


def test_openai_client_against_a_real_server(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["model"]
    telemetry = {"emotions": ["calm", "happy"], "alerts": [ALWAYS], "ignore_eos": True}
    request = dict(
        model="model",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=5,
        temperature=0.8,
        top_p=0.9,
        seed=7,
        extra_body={"emoscope": telemetry},
    )
    raw = client.chat.completions.with_raw_response.create(**request)
    completion = raw.parse()
    scope = raw.http_response.json()["emoscope"]
    assert (
        completion.choices[0].finish_reason == "length" and completion.usage.completion_tokens == 5
    )
    assert len(scope["tokens"]) == 5 and scope["alerts"][0]["token_index"] == 1
    assert completion.model_extra["emoscope"]["conversation_id"] == scope["conversation_id"]

    again = client.chat.completions.create(**request)
    assert again.choices[0].message.content == completion.choices[0].message.content  # seeded

    stream = client.chat.completions.create(
        model="model",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=8,
        temperature=0,
        stop=["\n\n\n\n"],
        stream=True,
        extra_body={"emoscope": telemetry},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    tokens = [t for c in chunks for t in c.model_extra["emoscope"]["tokens"]]
    alerts = [a for c in chunks for a in c.model_extra["emoscope"]["alerts"]]
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert [t["index"] for t in tokens] == list(range(len(tokens))) and alerts
    conversation = chunks[0].model_extra["emoscope"]["conversation_id"]
    logged = httpx.get(f"{server.url}/v1/conversations/{conversation}").json()
    assert logged["reply"] == text and logged["status"] == "complete"

    with pytest.raises(openai.BadRequestError, match="Unknown emotion"):
        client.chat.completions.create(
            model="model",
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"emoscope": {"emotions": ["joyy"]}},
        )


def test_full_queue_is_429_and_a_client_that_leaves_frees_its_slot(server):
    client, stream = long_stream(server)
    busy = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": "model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        timeout=30,
    )
    assert busy.status_code == 429 and busy.headers["retry-after"].isdigit()
    assert busy.json()["error"]["code"] == "rate_limit_exceeded"
    stream.close()
    client.close()
    deadline = time.time() + 20
    while server.health()["in_flight"] and time.time() < deadline:
        time.sleep(0.05)
    assert server.health() | {"in_flight": 0, "running": 0} == server.health()
    logged = httpx.get(f"{server.url}/v1/conversations/{stream.conversation_id}").json()
    assert logged["status"] == "incomplete" and 0 < len(logged["tokens"]) < 1000


def test_kill_during_a_stream_keeps_every_completed_reply(server):
    done = []
    for prompt in ("first", "second"):
        reply = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"model": "model", "messages": [{"role": "user", "content": prompt}],
                  "max_tokens": 4, "emoscope": {"emotions": ["sad"], "alerts": [ALWAYS]}},
            timeout=30,
        ).json()  # fmt: skip
        done.append(reply)
    client, stream = long_stream(server)
    server.kill()
    client.close()
    with sqlite3.connect(server.db) as db:  # as the killed server left it
        left = dict(db.execute("SELECT id, status FROM conversations").fetchall())
    assert left[stream.conversation_id] == "in_progress"
    server.start()  # the same log
    for reply in done:
        logged = httpx.get(
            f"{server.url}/v1/conversations/{reply['emoscope']['conversation_id']}"
        ).json()
        assert logged["status"] == "complete"
        assert logged["reply"] == reply["choices"][0]["message"]["content"]
        assert [t["scores"] for t in logged["tokens"]] == [
            t["scores"] for t in reply["emoscope"]["tokens"]
        ]
        assert len(logged["alerts"]) == len(reply["emoscope"]["alerts"]) == 1
    interrupted = httpx.get(f"{server.url}/v1/conversations/{stream.conversation_id}").json()
    assert interrupted["status"] == "incomplete"
    listed = httpx.get(f"{server.url}/v1/conversations").json()["data"]
    assert all(c["status"] != "in_progress" for c in listed)
