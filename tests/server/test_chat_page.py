"""The web chat page (photoninfer/server/static/) in a real headless Chromium against the real server.

Starts `python -m photoninfer serve --port <free> --max-num-seqs 8` (bundled SmolLM2), then drives the page
with playwright: a streamed answer, its stats, the live engine panel, Stop, errors, conversations across a
reload. Writes a screenshot to $PHOTONINFER_ARTIFACTS (default tests/artifacts/)/chat_page.png.

Needs Debian's chromium and the playwright python package — and deliberately FAILS (not skips) without them:
    apt-get install -y chromium
    pip install playwright        # never `playwright install`: the test uses /usr/bin/chromium
Set PHOTONINFER_CHROMIUM to use another Chromium binary, or PHOTONINFER_CHAT_PAGE_URL to test an
already running server instead of starting one.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("PHOTONINFER_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
INSTALL_HINT = "install with: apt-get install -y chromium && pip install playwright (do not run `playwright install`)"
SERVER_START_TIMEOUT_S = 75

pytestmark = pytest.mark.timeout(150)


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        pytest.fail(f"the playwright python package is missing ({e}); {INSTALL_HINT}", pytrace=False)
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"no Chromium executable at {CHROMIUM}; {INSTALL_HINT}", pytrace=False)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read().decode())


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    external = os.environ.get("PHOTONINFER_CHAT_PAGE_URL")
    if external:
        yield external.rstrip("/")
        return
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [sys.executable, "-m", "photoninfer", "serve", "--port", str(port), "--max-num-seqs", "8"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"`{' '.join(cmd[1:])}` exited with {proc.returncode}:\n{_tail(log_path)}", pytrace=False)
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not healthy after {SERVER_START_TIMEOUT_S}s:\n{_tail(log_path)}", pytrace=False)
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture()
def page(browser, server_url):
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    pg.page_errors = []  # uncaught exceptions in the page
    pg.requests = []  # every URL the page asked for
    pg.on("pageerror", lambda e: pg.page_errors.append(str(e)))
    pg.on("request", lambda r: pg.requests.append(r.url))
    pg.goto(server_url + "/")
    pg.wait_for_selector("#message-input")
    yield pg
    context.close()


def _artifact_dir() -> Path:
    d = Path(os.environ.get("PHOTONINFER_ARTIFACTS") or REPO / "tests" / "artifacts")
    d.mkdir(parents=True, exist_ok=True)
    return d


# ---------------------------------------------------------------------------------------------- helpers
def _set_settings(page, *, max_tokens=None, temperature=None, system_prompt=None):
    if page.is_hidden("#settings-panel"):
        page.click("#settings-button")
    if max_tokens is not None:
        page.fill("#max-tokens", str(max_tokens))
    if temperature is not None:
        page.fill("#temperature", str(temperature))
    if system_prompt is not None:
        page.fill("#system-prompt", system_prompt)
    page.click("#settings-close")
    assert page.is_hidden("#settings-panel")


def _send(page, text):
    page.fill("#message-input", text)
    page.press("#message-input", "Enter")


def _wait_answer_done(page, n_assistant, timeout=45_000):
    """Waits until the n-th assistant message (1-based) carries its final stats; returns its locator."""
    page.wait_for_function(
        """n => { const m = document.querySelectorAll('.message.assistant');
                  return m.length >= n && m[n - 1].querySelector('.answer-stats[data-final="true"]') !== null; }""",
        arg=n_assistant,
        timeout=timeout,
    )
    return page.locator(".message.assistant").nth(n_assistant - 1)


def _stats(msg) -> dict[str, str]:
    return {k: msg.locator(f'.answer-stats [data-stat="{k}"]').inner_text() for k in ("tokens", "tps", "ttft")}


def _engine_json(server_url):
    return _get_json(server_url + "/api/engine")


# ---------------------------------------------------------------------------------------------- tests
def test_markdown_renderer_escapes_model_text(page):
    r = lambda s: page.evaluate("s => window.PhotonInferChat.renderMarkdown(s)", s)  # noqa: E731
    html = r('<img src=x onerror="alert(1)"> and <script>alert(2)</script>')
    assert "<img" not in html and "<script" not in html and "&lt;img" in html
    html = r("```html\n<b>x</b>\n```")
    assert "<pre" in html and "&lt;b&gt;x&lt;/b&gt;" in html
    html = r("**bold** and *it* and `a<b`\n\n- one\n- two\n\n1. first\n2. second")
    assert "<strong>bold</strong>" in html and "<em>it</em>" in html and "<code>a&lt;b</code>" in html
    assert "<ul><li>one</li><li>two</li></ul>" in html and "<ol><li>first</li><li>second</li></ol>" in html
    html = r('[x](javascript:alert(1)) [y](https://e.x/"onmouseover=")')
    assert 'href="javascript' not in html  # only http(s) links become links
    assert 'href="https://e.x/&quot;onmouseover=&quot;"' in html
    assert not page.page_errors


def test_chat_page_end_to_end(page, server_url):
    t_start = time.monotonic()
    # --- model name from /v1/models
    page.wait_for_function("() => !['…', 'model unavailable'].includes(document.querySelector('#model-name').textContent)")
    model = _get_json(server_url + "/v1/models")["data"][0]["id"]
    assert page.inner_text("#model-name") == model
    assert page.is_visible("[data-testid=empty-state]")

    # --- conversation A: a streamed answer; record the answer's length at every DOM change
    _set_settings(page, max_tokens=24, temperature=0)
    page.evaluate(
        """() => {
            window.__lengths = [];
            new MutationObserver(() => {
                const m = document.querySelectorAll('.message.assistant .content');
                if (m.length) window.__lengths.push(m[m.length - 1].textContent.length);
            }).observe(document.querySelector('#messages'), {subtree: true, childList: true, characterData: true});
        }"""
    )
    first_prompt = "Write a short poem about the sea."
    _send(page, first_prompt)
    page.wait_for_selector("#stop-button:visible")
    answer = _wait_answer_done(page, 1)
    lengths = page.evaluate("window.__lengths")
    final_len = len(answer.locator(".content").inner_text())
    grew = sorted({n for n in lengths if 0 < n})
    assert final_len > 0, "empty answer"
    assert len(grew) >= 2 and grew[0] < grew[-1], f"answer did not stream (lengths seen: {lengths[:50]})"
    assert page.is_visible("#send-button") and page.is_hidden("#stop-button")

    stats = _stats(answer)
    m = re.fullmatch(r"(\d+) tokens?", stats["tokens"])
    assert m and 1 <= int(m.group(1)) <= 24, stats
    assert re.fullmatch(r"\d+(\.\d+)? tok/s", stats["tps"]), stats
    assert re.fullmatch(r"TTFT \d+(\.\d+)? (ms|s)", stats["ttft"]), stats

    # --- engine panel shows live numbers from /api/engine
    page.wait_for_function("() => /^\\d+ \\/ [1-9]\\d*$/.test(document.querySelector('#engine-kv').textContent)")
    assert re.fullmatch(r"\d+", page.inner_text("#engine-running"))
    assert re.fullmatch(r"\d+", page.inner_text("#engine-waiting"))
    assert re.fullmatch(r"\d+(\.\d+)?", page.inner_text("#engine-tps"))
    assert page.inner_text("#engine-model").strip() not in ("", "–")

    # --- errors from the API are shown in the conversation (a 401 faked for one request asks for a key)
    def fake_401(route):
        route.fulfill(
            status=401,
            content_type="application/json",
            body=json.dumps({"error": {"message": "Invalid API key", "type": "invalid_request_error", "param": None, "code": None}}),
        )

    page.route("**/v1/chat/completions", fake_401)
    _send(page, "This one is rejected.")
    err = page.wait_for_selector(".message.error")
    assert "Invalid API key" in err.inner_text() and "401" in err.inner_text()
    assert page.is_visible("#settings-panel") and page.evaluate("document.activeElement.id") == "api-key"
    page.click("#settings-close")
    page.unroute("**/v1/chat/completions", fake_401)
    assert page.is_visible("#send-button")

    # --- conversation B: Stop aborts a long generation, the server drops the request, the page stays usable
    page.click("#new-chat")
    assert page.is_visible("[data-testid=empty-state]")
    assert page.locator(".conversation-item").count() == 1
    _set_settings(page, max_tokens=2000)
    long_prompt = "Count from 1 to 500, one number per line."
    _send(page, long_prompt)
    page.wait_for_function(
        "() => { const m = document.querySelector('.message.assistant .content'); return m && m.textContent.length > 0; }"
    )
    try:  # let the 1 s engine poll catch the running request, if the answer lasts that long
        page.wait_for_function("() => +document.querySelector('#engine-running').textContent >= 1", timeout=1500)
    except Exception:
        pass
    assert page.is_visible("#stop-button"), "the long answer ended by itself before Stop could be clicked"
    page.click("#stop-button")
    page.wait_for_selector("#send-button:visible")
    assert page.is_hidden("#stop-button")
    stopped = page.locator(".message.assistant").first
    assert "stopped" in (stopped.get_attribute("class") or "")
    assert stopped.locator('.answer-stats [data-stat="finish"]').inner_text() == "stopped"
    assert re.fullmatch(r"\d+ tokens?", stopped.locator('.answer-stats [data-stat="tokens"]').inner_text())
    len_after_stop = len(stopped.locator(".content").inner_text())
    deadline = time.monotonic() + 10
    while _engine_json(server_url)["running"] != 0:
        assert time.monotonic() < deadline, "the server kept generating after the browser aborted the request"
        time.sleep(0.2)
    assert len(stopped.locator(".content").inner_text()) == len_after_stop, "text kept arriving after Stop"

    _set_settings(page, max_tokens=12)
    _send(page, "Now just say hello.")
    after_stop = _wait_answer_done(page, 2)
    assert after_stop.locator(".content").inner_text().strip()
    assert page.locator(".conversation-item").count() == 2

    # --- both conversations and the settings survive a reload; B is still the open one
    page.reload()
    page.wait_for_selector(".message.assistant")
    assert page.locator(".conversation-item").count() == 2
    assert page.locator(".conversation-item.active").inner_text().startswith(long_prompt[:20])
    assert page.locator(".message.user").count() == 2
    assert "stopped" in (page.locator(".message.assistant").first.get_attribute("class") or "")
    assert page.input_value("#max-tokens") == "12"
    page.wait_for_function("() => /^\\d+ \\/ [1-9]\\d*$/.test(document.querySelector('#engine-kv').textContent)")
    shot = _artifact_dir() / "chat_page.png"
    page.screenshot(path=str(shot))

    # --- switch to A (as it was), delete B
    page.locator(".conversation-item", has_text=first_prompt[:20]).locator(".conversation-open").click()
    assert page.locator(".message.user").count() == 2
    assert page.locator(".message.error").count() == 1
    assert _stats(page.locator(".message.assistant").first) == stats
    b = page.locator(".conversation-item", has_text=long_prompt[:20])
    b.locator(".conversation-delete").click()
    b.locator(".conversation-delete").click()  # the second click confirms
    page.wait_for_function("() => document.querySelectorAll('.conversation-item').length === 1")
    assert page.locator(".message.user").count() == 2  # A, the open conversation, is untouched

    # --- narrow window: the sidebar becomes a drawer
    page.set_viewport_size({"width": 400, "height": 800})
    page.wait_for_function("() => document.querySelector('#sidebar').getBoundingClientRect().right <= 0")
    page.click("#sidebar-toggle")
    page.wait_for_function("() => document.querySelector('#sidebar').getBoundingClientRect().x >= 0")
    page.keyboard.press("Escape")
    page.wait_for_function("() => document.querySelector('#sidebar').getBoundingClientRect().right <= 0")
    assert page.is_visible("#message-input") and page.is_visible("#send-button")
    page.screenshot(path=str(_artifact_dir() / "chat_page_narrow.png"))

    # --- no uncaught errors, nothing fetched from outside the server (works offline)
    assert not page.page_errors, page.page_errors
    foreign = [u for u in page.requests if not (u.startswith(server_url) or u.startswith("data:"))]
    assert not foreign, f"the page fetched from outside the server: {foreign}"
    print(f"chat page test body took {time.monotonic() - t_start:.1f}s; screenshot {shot}")
