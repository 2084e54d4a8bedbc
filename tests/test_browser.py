"""The web dashboard in a real browser, against a real `emoscope serve` on a tiny model.

Run with `make test-browser` (installs Chromium and Playwright where missing) or
`pytest -m browser`; the default run leaves these tests out.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import transformers as tf

from conftest import char_tokenizer, synthetic_bank, tiny_config
from emoscope.models import wrap_model

pytestmark = pytest.mark.browser

CHROMIUM = Path(os.environ.get("EMOSCOPE_CHROMIUM", "/usr/bin/chromium"))
EMOTIONS = ("desperate", "calm", "happy", "afraid", "angry", "sad", "hopeful", "proud")
START_TIMEOUT = 180.0
REPLY_TIMEOUT = 60_000  # ms


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def emoscope_command() -> list[str]:
    script = Path(sys.executable).with_name("emoscope")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from emoscope.cli import main; sys.exit(main())"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny random llama and a bank of random vectors for it, saved as folders."""
    root = tmp_path_factory.mktemp("dashboard")
    model_dir, bank_dir = root / "model", root / "bank"
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tiny_config("llama"), dtype=torch.float32)
    tokenizer = char_tokenizer()
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    # a folder model is named by its resolved path: the bank records that name
    lm = wrap_model(model, tokenizer, str(model_dir.resolve()))
    synthetic_bank(lm, emotions=EMOTIONS, layers=(1, 2, 3)).save(bank_dir)
    return model_dir, bank_dir


@contextmanager
def serving(assets: tuple[Path, Path], root: Path, api_key: str | None = None) -> Iterator[str]:
    """`emoscope serve` on a free loopback port for as long as the block runs; yields its URL."""
    model_dir, bank_dir = assets
    port = free_port()
    command = [
        *emoscope_command(),
        "serve",
        "--model",
        str(model_dir),
        "--bank",
        str(bank_dir),
        "--port",
        str(port),
        "--db",
        str(root / "log.db"),
    ]
    if api_key:
        command += ["--api-key", api_key]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = f"http://127.0.0.1:{port}"
    with (root / "server.log").open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=root)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while True:
                if process.poll() is not None:
                    pytest.fail(
                        f"emoscope serve exited ({process.returncode}):\n{server_log(root)}"
                    )
                try:
                    request = urllib.request.Request(f"{url}/v1/models", headers=headers)
                    with urllib.request.urlopen(request, timeout=2) as response:
                        if response.status == 200:
                            break
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"emoscope serve did not answer in time:\n{server_log(root)}")
                time.sleep(0.5)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def server(assets, tmp_path_factory) -> Iterator[str]:
    with serving(assets, tmp_path_factory.mktemp("server")) as url:
        yield url


def server_log(root: Path) -> str:
    return (root / "server.log").read_text(errors="replace")[-4000:]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="Playwright is not installed (make test-browser)"
    )
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (make test-browser installs it)")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM))
        yield chromium
        chromium.close()


class Page:
    """A fresh browser tab on the dashboard, recording script errors and dialogs."""

    def __init__(self, browser, url: str, *, password: str | None = None, ready: bool = True):
        credentials = None if password is None else {"username": "", "password": password}
        self.context = browser.new_context(
            viewport={"width": 1400, "height": 900}, http_credentials=credentials
        )
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("dialog", self._dialog)
        self.page.set_default_timeout(REPLY_TIMEOUT)
        self.page.goto(url)
        if ready:
            self.page.wait_for_selector("body[data-ready]")

    def _dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def settings(self, *, max_tokens: int = 12) -> None:
        """Greedy, fixed-length replies, so that two replies differ only by what was changed."""
        self.page.fill("#max-tokens", str(max_tokens))
        self.page.fill("#temperature", "0")
        self.page.check("#ignore-eos")

    def send(self, text: str):
        """Send a message and wait for its reply to finish; returns the reply's element."""
        replies = self.page.locator(".msg.assistant")
        before = replies.count()
        self.page.fill("#message", text)
        self.page.press("#message", "Enter")
        self.page.wait_for_function(
            "n => document.querySelectorAll('.msg.assistant[data-done]').length > n", arg=before
        )
        reply = replies.nth(before)
        assert reply.get_attribute("data-done") == "done", self.page.inner_text("#error-text")
        return reply

    def means(self, reply) -> dict[str, float]:
        return json.loads(reply.locator(".readout").get_attribute("data-means"))

    def close(self) -> None:
        self.context.close()


@pytest.fixture()
def dashboard(browser, server) -> Iterator[Page]:
    tab = Page(browser, server)
    yield tab
    try:
        assert not tab.errors, f"script errors on the page: {tab.errors}"
    finally:
        tab.close()


def test_reply_streams_tinted_tokens_into_chat_chart_and_map(dashboard):
    page = dashboard.page
    assert page.locator("#map .dot").count() == len(EMOTIONS)
    chips = page.locator("#monitored .chip .name").all_inner_texts()
    assert chips == ["desperate", "calm", "happy", "afraid", "angry"]

    dashboard.settings()
    reply = dashboard.send("hello, how are you?")
    tokens = reply.locator(".tok")
    count = tokens.count()
    assert count == 12
    # every token carries its z-score for the tint emotion and is coloured by it
    tint = page.input_value("#tint")
    assert tint == "desperate"
    zs = [float(z) for z in tokens.evaluate_all("spans => spans.map(s => s.dataset.z)")]
    assert len(zs) == count
    colours = tokens.evaluate_all("spans => spans.map(s => getComputedStyle(s).backgroundColor)")
    assert any(c not in ("rgba(0, 0, 0, 0)", "transparent") for c in colours)

    # hovering a token shows its top emotions
    tokens.nth(3).hover()
    tip = page.locator("#tip")
    tip.wait_for(state="visible")
    text = tip.inner_text()
    assert "top emotions" in text.lower() and tint in text
    assert any(name in text.split("top emotions", 1)[-1].lower() for name in EMOTIONS)

    # the chart holds one point per token, the readout one mean per monitored emotion
    page.wait_for_function(f"document.querySelector('#chart').dataset.tokens === '{count}'")
    assert page.locator("#chart canvas").count() >= 1
    legend = page.locator("#chart .u-legend").inner_text()
    assert all(name in legend for name in chips)
    assert set(dashboard.means(reply)) == set(chips)

    # a second reply extends the same chart
    dashboard.send("tell me more")
    page.wait_for_function(f"document.querySelector('#chart').dataset.tokens === '{2 * count}'")

    # the map marks where the conversation is, with its trail and the monitored emotions named
    assert page.locator("#map-now").get_attribute("visibility") == "visible"
    assert page.locator("#map .steps circle").count() > 1
    labels = page.locator("#map .label").all_text_contents()
    assert all(any(label.startswith(name) for label in labels) for name in chips)


def test_steering_slider_changes_the_next_reply(dashboard):
    page = dashboard.page
    dashboard.settings()
    plain = dashboard.send("the rent is due tomorrow.")
    assert page.locator(".msg.assistant .badge").first.inner_text() == "unsteered"
    before = dashboard.means(plain)

    page.click("#new-chat")
    page.fill("#steer-picker input", "cal")
    page.locator("#steer-picker li", has_text="calm").first.click()
    assert page.input_value("#steer-picker input") == "calm"
    page.focus("#strength")
    page.keyboard.press("End")  # the slider's top: +0.50
    assert page.inner_text("#strength-value") == "+0.50"
    assert "calm +0.50" in page.inner_text("#steer-summary")

    steered = dashboard.send("the rent is due tomorrow.")
    assert "steered calm +0.50" in steered.locator(".badge").inner_text()
    after = dashboard.means(steered)
    assert after != before
    assert after["calm"] > before["calm"] + 0.1, (before, after)

    # steering applies to the reply it was set for; resetting it turns it off again
    page.click("#steer-reset")
    assert page.inner_text("#steer-summary") == "next reply: unsteered"


def test_markup_in_messages_is_shown_as_text(dashboard):
    page = dashboard.page
    dashboard.settings(max_tokens=4)
    payload = (
        "<script>window.__injected = 1; alert(1)</script>"
        '<img src="x" onerror="window.__injected = 2; alert(2)"><b>bold?</b>'
    )
    dashboard.send(payload)
    user = page.locator(".msg.user .text").last
    assert user.inner_text() == payload
    assert page.locator("#chat script, #chat img, #chat b").count() == 0
    assert page.evaluate("window.__injected") is None
    assert dashboard.dialogs == []


def test_uploaded_transcript_is_scored_and_shown(dashboard, tmp_path):
    page = dashboard.page
    transcript = [
        {"role": "user", "content": "my cat is missing and it is raining."},
        {"role": "assistant", "content": "i am sorry. let us look together."},
    ]
    path = tmp_path / "talk.json"
    path.write_text(json.dumps(transcript))
    page.set_input_files("#upload", str(path))
    page.wait_for_selector("#chat[data-transcript='talk.json']")

    scored = page.locator(".msg.scored")
    roles = scored.evaluate_all("boxes => boxes.map(b => b.dataset.role)")
    assert "user" in roles and "assistant" in roles
    tokens = page.locator(".msg.scored .tok")
    count = tokens.count()
    assert count > 0
    assert page.locator(".msg.scored .tok[data-z]").count() > 0
    text = scored.evaluate_all("boxes => boxes.map(b => b.querySelector('.text').textContent)")
    assert any("let us look together." in t for t in text), text
    page.wait_for_function(f"document.querySelector('#chart').dataset.tokens === '{count}'")
    assert "Scored talk.json" in page.inner_text("#chat .notice")

    # a transcript that is not a list of messages is refused on the page
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"text": "no messages here"}))
    page.set_input_files("#upload", str(bad))
    page.locator("#error").wait_for(state="visible")
    assert "role" in page.inner_text("#error-text")


def test_api_key_field_sends_the_key(browser, assets, tmp_path):
    key = "k3y-for-the-dashboard"
    with serving(assets, tmp_path, api_key=key) as url:
        # the page itself asks for the key as a password; the field sends it to the API
        tab = Page(browser, url, password=key, ready=False)
        page = tab.page
        try:
            page.wait_for_selector("body[data-ready], #error:not([hidden])")
            page.fill("#api-key", key)
            page.press("#api-key", "Enter")
            page.wait_for_selector("body[data-ready]")
            tab.settings(max_tokens=3)
            tab.send("hello")

            page.fill("#api-key", "not-the-key")
            page.press("#api-key", "Enter")
            page.fill("#message", "hello again")
            page.press("#message", "Enter")
            page.wait_for_selector(".msg.assistant[data-done='failed']")
            assert "API key" in page.inner_text("#error-text")

            page.fill("#api-key", key)
            page.press("#api-key", "Enter")
            tab.send("hello once more")
            stored = page.evaluate(
                "[sessionStorage.getItem('emoscope.apiKey'), localStorage.length]"
            )
            assert stored == [key, 0]
            assert not tab.errors, tab.errors
        finally:
            tab.close()
