"""The chat page the server serves at /, driven in headless Chromium (Debian's chromium package,
through Playwright's Python package) against the server on the demo model."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import ctrl_c_default, read_line, time_limit

from mlx_mla import web

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# The README's picture of the page: written where this names (MLX_MLA_SCREENSHOT=docs/chat.png),
# so that a test run leaves the checkout as it was.
SCREENSHOT_ENV = "MLX_MLA_SCREENSHOT"
HOSTILE = "<img src=x onerror=window.__pwned=1><script>window.__pwned=2</script>"


def missing_browser() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright; no browser download needed)"
    if not shutil.which(CHROMIUM):
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    return None


class Server:
    """The server on the demo model with a conversation folder, restartable on the same port (the
    page's saved conversations belong to its origin)."""

    def __init__(self, folder: Path, log: Path, *flags: str):
        self.folder, self.log, self.flags, self.port = folder, log, flags, 0
        self.start()

    def start(self):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        flags = ["--port", str(self.port), "--prompt-cache-dir", str(self.folder), *self.flags]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlx_mla.server", *flags],
            stdout=subprocess.PIPE,
            stderr=self.log.open("a"),
            text=True,
            env=env,
            preexec_fn=ctrl_c_default,
        )
        line = read_line(self.process, startups=20)
        if "Serving" not in line:
            self.process.kill()
            raise RuntimeError(f"server did not start: {line}{self.log.read_text()}")
        self.url = line.split(" on ")[1].strip().removesuffix("/v1")
        self.port = int(self.url.rsplit(":", 1)[1])

    def stop(self):
        self.process.send_signal(signal.SIGINT)
        self.process.wait(timeout=time_limit(5))

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=time_limit(2)) as r:
            return json.loads(r.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat")
    server = Server(folder / "conversations", folder / "stderr.log")
    yield server
    if server.process.poll() is None:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="module")
def browser():
    """Chromium, started without LD_PRELOAD: OpenBLAS preloaded crashes node (Playwright's
    driver) and Chromium. It is put back for the servers the tests start."""
    if (missing := missing_browser()) is not None:
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    preload = os.environ.pop("LD_PRELOAD", None)
    try:
        playwright = sync_playwright().start()
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, env=env)
    finally:
        if preload is not None:
            os.environ["LD_PRELOAD"] = preload
    yield browser
    browser.close()
    playwright.stop()


class Page:
    """A fresh browser context (its own localStorage) on the chat page, recording every request
    the page makes and every request body it posts."""

    def __init__(self, browser, server):
        self.server = server
        self.context = browser.new_context(viewport={"width": 1100, "height": 720})
        self.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
        self.requests, self.posted = [], []
        self.context.on("request", self.record)
        self.page = self.context.new_page()
        self.page.set_default_timeout(time_limit(4) * 1000)
        self.open()

    def record(self, request):
        self.requests.append(request.url)
        if request.method == "POST" and request.url.endswith("/v1/chat/completions"):
            self.posted.append(json.loads(request.post_data))

    def open(self):
        self.page.goto(self.server.url + "/")
        self.page.wait_for_selector("#model-name:text('mlx-mla-demo')")

    def reload(self):
        self.page.reload()
        self.page.wait_for_selector("#model-name:text('mlx-mla-demo')")

    def send(self, text: str):
        """Type `text` (lines joined by Shift+Enter), press Enter, and wait for the reply."""
        replies = self.page.locator(".message.assistant .stats").count()
        box = self.page.locator("#prompt")
        for i, line in enumerate(text.split("\n")):
            if i:
                box.press("Shift+Enter")
            box.type(line)
        box.press("Enter")
        self.wait_for_reply(replies + 1)

    def wait_for_reply(self, replies: int):
        self.page.wait_for_function(
            "n => document.querySelectorAll('.message.assistant .stats').length >= n", arg=replies
        )

    def saved(self) -> list[dict]:
        """The conversations the page saved in localStorage."""
        return json.loads(self.page.evaluate("() => localStorage.getItem('mlx-mla-chat')"))[
            "conversations"
        ]

    def settings(self, **values):
        if self.page.locator("#settings").get_attribute("open") is None:
            self.page.locator("#settings summary").click()
        for field, value in values.items():
            self.page.locator(f"#{field}").fill(str(value))
            self.page.locator(f"#{field}").dispatch_event("change")

    def close(self):
        self.context.close()


@pytest.fixture
def page(browser, server):
    page = Page(browser, server)
    yield page
    page.close()


def test_drafts_accepted_are_shown_as_the_server_counted_them(browser, tmp_path):
    server = Server(tmp_path / "conversations", tmp_path / "stderr.log", "--draft", "ngram")
    try:
        page = Page(browser, server)
        page.settings(**{"max-tokens": 80, "draft-tokens": 3})
        assert page.page.locator("#draft-tokens").is_visible()
        page.send("ROMEO:")
        assert page.posted[-1]["num_draft_tokens"] == 3
        stats = page.saved()[0]["messages"][-1]["stats"]
        logged = re.findall(r"Speculative: (\d+) drafted, (\d+) accepted", server.log.read_text())
        drafted, accepted = map(int, logged[-1])
        assert drafted > 0 and (stats["accepted"], stats["rejected"]) == (
            accepted,
            drafted - accepted,
        )
        line = page.page.locator(".message.assistant .stats").inner_text()
        assert f"drafts {accepted} accepted of {drafted}" in line
        page.close()
    finally:
        server.process.kill()
        server.process.wait()


def test_enter_sends_shift_enter_is_a_new_line_and_the_reply_streams_with_its_figures(
    page, tmp_path
):
    # Count the reply's text lengths as the page draws them: a streamed reply is drawn in parts.
    page.page.evaluate(
        """() => {
        window.__lengths = new Set();
        new MutationObserver(() => {
          const body = document.querySelector('.message.assistant:last-child .body');
          if (body && !body.parentNode.querySelector('.stats')) {
            window.__lengths.add(body.textContent.length);
          }
        }).observe(document.getElementById('messages'),
                   {subtree: true, childList: true, characterData: true});
      }"""
    )
    page.settings(**{"max-tokens": 200})
    page.send("ROMEO:\nJULIET:")
    lengths = page.page.evaluate("() => [...window.__lengths].filter(n => n > 0)")
    assert len(lengths) >= 2, f"the reply was drawn whole, not streamed: {lengths}"
    (conversation,) = page.saved()
    user, reply = conversation["messages"]
    assert user == {"role": "user", "content": "ROMEO:\nJULIET:"}
    assert reply["content"] and page.page.locator(".message.assistant .body").inner_text()
    assert page.posted[-1]["stream"] is True
    assert page.posted[-1]["stream_options"] == {"include_usage": True}
    stats = reply["stats"]
    assert 0 < stats["completion_tokens"] <= 200 and stats["prompt_tokens"] > 0
    assert stats["total_tokens"] == stats["prompt_tokens"] + stats["completion_tokens"]
    line = page.page.locator(".message.assistant .stats").inner_text()
    assert "tokens/s" in line and f"prompt {stats['prompt_tokens']} tokens" in line
    assert "no drafting" in line  # the server runs without a drafter
    # The second turn continues the cached conversation, and the chart grows with it.
    page.send("HAMLET:")
    second = page.saved()[0]["messages"][-1]["stats"]
    assert (
        second["cached_tokens"] > 0
        and f"{second['cached_tokens']} cached"
        in page.page.locator(".message.assistant .stats").last.inner_text()
    )
    info = page.server.get(web.INFO_PATH)
    config = json.loads((ROOT / "mlx_mla" / "demo_model" / "config.json").read_text())
    layers, heads, float32 = config["num_hidden_layers"], config["num_attention_heads"], 4
    latent = config["kv_lora_rank"] + config["qk_rope_head_dim"]  # c_kv and k_pe
    keys_values = config["qk_nope_head_dim"] + config["qk_rope_head_dim"] + config["v_head_dim"]
    assert info["cache"] == {
        "bytes_per_token": layers * latent * float32,
        "dtype": "float32",
        "kv_bits": None,
        "kv_group_size": None,
    }
    assert info["mha"]["bytes_per_token"] == layers * heads * keys_values * float32
    caption = page.page.locator("#chart-caption").inner_text()
    assert f"{second['total_tokens']} tokens" in caption
    labels = page.page.locator("#cache-chart text").all_text_contents()
    ours = second["total_tokens"] * info["cache"]["bytes_per_token"]
    mha = second["total_tokens"] * info["mha"]["bytes_per_token"]
    assert labels[0].endswith(format_bytes(ours)) and format_bytes(mha) in labels[1]
    assert page.page.locator("#cache-chart polyline").count() == 2
    assert "context 1024 tokens" in page.page.locator("#model-context").inner_text()
    page.page.locator("#settings summary").click()  # closed, for the picture
    screenshot = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "chat.png")
    page.page.screenshot(path=str(screenshot))
    assert screenshot.read_bytes().startswith(b"\x89PNG")


def format_bytes(n: float) -> str:
    """chat.js's formatBytes, written again."""
    units, i = ["B", "KB", "MB", "GB", "TB"], 0
    while n >= 1000 and i < len(units) - 1:
        n, i = n / 1000, i + 1
    return f"{n:.{0 if n >= 100 or i == 0 else 1}f} {units[i]}"


@pytest.mark.parametrize("how", ["button", "escape"])
def test_stop_ends_the_reply_and_the_server_answers_the_next(page, how):
    page.settings(**{"max-tokens": 900})
    page.page.locator("#prompt").fill("ROMEO:")
    page.page.locator("#prompt").press("Enter")
    page.page.wait_for_function(
        "() => document.querySelector('.message.assistant .body')?.textContent.length > 0"
    )
    if how == "button":
        page.page.locator("#stop").click()
    else:
        page.page.keyboard.press("Escape")
    page.wait_for_reply(1)
    stopped = page.saved()[0]["messages"][-1]
    assert stopped["stats"]["stopped"] and stopped["stats"]["completion_tokens"] < 900
    assert "stopped" in page.page.locator(".message.assistant .stats").inner_text()
    assert page.page.locator("#send").is_enabled() and page.page.locator("#stop").is_disabled()
    assert page.server.get("/health")["status"] == "ok"
    page.settings(**{"max-tokens": 8})
    page.send("JULIET:")
    answered = page.saved()[0]["messages"][-1]
    assert answered["content"] and not answered["stats"]["stopped"]


def test_settings_are_sent_and_max_tokens_is_honoured(page):
    page.settings(temperature=0.7, **{"top-p": 0.9, "max-tokens": 5, "system": "Speak as ROMEO."})
    assert not page.page.locator("#draft-tokens").is_visible()  # this server does not draft
    page.send("JULIET:")
    body = page.posted[-1]
    assert body["temperature"] == 0.7 and body["top_p"] == 0.9 and body["max_tokens"] == 5
    assert body["messages"][0] == {"role": "system", "content": "Speak as ROMEO."}
    assert body["messages"][1:] == [{"role": "user", "content": "JULIET:"}]
    stats = page.saved()[0]["messages"][-1]["stats"]
    assert 0 < stats["completion_tokens"] <= 5
    page.reload()  # settings are kept with the page
    assert page.page.locator("#max-tokens").input_value() == "5"
    assert page.page.locator("#system").input_value() == "Speak as ROMEO."


def test_html_in_messages_is_shown_as_text_and_never_runs(page):
    page.settings(**{"max-tokens": 4})
    page.send(f"{HOSTILE} **bold**")
    user = page.page.locator(".message.user .body")
    assert user.inner_text() == f"{HOSTILE} **bold**"
    # A reply holding HTML and markdown, as a model could write it, saved and shown again.
    reply = (
        f"Look: {HOSTILE} and **bold** and `<b>code</b>`\n\n"
        f"```html\n<script>window.__pwned=3</script>\n{HOSTILE}\n```\n- one\n- two"
    )
    page.page.evaluate(
        """reply => {
        const saved = JSON.parse(localStorage.getItem('mlx-mla-chat'));
        saved.conversations[0].messages.push({role: 'assistant', content: reply});
        localStorage.setItem('mlx-mla-chat', JSON.stringify(saved));
      }""",
        reply,
    )
    page.reload()
    shown = page.page.locator(".message.assistant").last
    assert HOSTILE in shown.locator("p").first.inner_text()
    assert shown.locator("strong").inner_text() == "bold"
    assert shown.locator("p code").inner_text() == "<b>code</b>"
    code = f"<script>window.__pwned=3</script>\n{HOSTILE}"
    assert shown.locator("pre code").inner_text() == code
    assert shown.locator("li").all_inner_texts() == ["one", "two"]
    # Not one element was made from the text (this holds whatever the page's CSP allows).
    assert page.page.locator("#messages img, #messages script, #messages b").count() == 0
    assert page.page.evaluate("() => window.__pwned") is None
    assert not any(url.endswith("/x") for url in page.requests)
    shown.get_by_role("button", name="Copy code").click()
    assert page.page.evaluate("() => navigator.clipboard.readText()") == code


def test_conversations_resume_after_a_reload_and_after_a_server_restart(page, server):
    page.settings(**{"max-tokens": 12})
    page.send("KING HENRY:")
    page.page.locator("#new-chat").click()
    assert page.page.locator(".message").count() == 0
    page.send("First Citizen:")
    page.reload()
    items = page.page.locator("#conversations li")
    assert items.count() == 2
    first = items.filter(has_text="KING HENRY:")
    first.locator("button.open").click()
    assert page.page.locator(".message.user .body").inner_text() == "KING HENRY:"
    page.page.wait_for_selector("#conversations .badge.cached")
    server.stop()  # writes the conversations in memory to disk
    server.start()
    page.reload()
    badge = page.page.locator("#conversations li", has_text="KING HENRY:").locator(".badge")
    page.page.wait_for_function(
        "() => [...document.querySelectorAll('#conversations .badge')]"
        ".filter(b => b.textContent.startsWith('cached:')).length == 2"
    )
    assert badge.inner_text().startswith("cached: ")
    page.send("KING HENRY:")  # continues the first conversation from the disk cache
    stats = page.saved()
    (king,) = [c for c in stats if c["messages"][0]["content"] == "KING HENRY:"]
    assert len(king["messages"]) == 4 and king["messages"][-1]["stats"]["cached_tokens"] > 0


def test_every_request_the_page_makes_is_same_origin_and_others_are_refused(page, server):
    page.settings(**{"max-tokens": 4})
    page.send("MENENIUS:")
    page.page.locator("#new-chat").click()
    page.reload()
    assert page.requests and all(url.startswith(server.url + "/") for url in page.requests)
    # A page on another site cannot read the API (no CORS header) nor drive it (403).
    request = urllib.request.Request(
        server.url + "/v1/chat/completions",
        data=json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(),
        headers={"Origin": "http://evil.example", "Content-Type": "text/plain"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=time_limit(2))
    assert refused.value.code == 403
    assert refused.value.headers.get("Access-Control-Allow-Origin") is None
    preflight = urllib.request.Request(
        server.url + "/v1/chat/completions",
        method="OPTIONS",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
    )
    with urllib.request.urlopen(preflight, timeout=time_limit(2)) as r:
        assert r.headers.get("Access-Control-Allow-Origin") is None
    # Nor can a page under another name that resolves to this machine (DNS rebinding).
    host = f"rebound.example:{server.port}"
    request.headers.update({"Host": host, "Origin": f"http://{host}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=time_limit(2))
    assert refused.value.code == 403


def test_every_control_is_labelled_and_both_colour_schemes_are_followed(browser, server):
    backgrounds = {}
    for scheme in ("light", "dark"):
        context = browser.new_context(color_scheme=scheme)
        page = context.new_page()
        page.goto(server.url + "/")
        page.wait_for_selector("#model-name:text('mlx-mla-demo')")
        unlabelled = page.evaluate(
            """() => [...document.querySelectorAll('button, input, textarea')].filter(c =>
                !(c.labels && c.labels.length) && !c.getAttribute('aria-label')
                && !c.textContent.trim()).map(c => c.outerHTML)"""
        )
        assert unlabelled == []
        backgrounds[scheme] = page.evaluate("() => getComputedStyle(document.body).background")
        page.locator("#prompt").focus()
        page.keyboard.press("Tab")  # the keyboard reaches the send button next
        assert page.evaluate("() => document.activeElement.id") == "send"
        context.close()
    assert backgrounds["light"] != backgrounds["dark"]


@pytest.mark.parametrize("body", [b"", b"[]", b'{"messages": []}', b'{"messages": [{"role": 1}]}'])
def test_cached_lookup_refuses_a_body_without_messages(server, body):
    request = urllib.request.Request(server.url + web.CACHED_PATH, data=body, method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=time_limit(2))
    assert refused.value.code == 400 and "message" in json.loads(refused.value.read())["error"]


def test_the_commands_in_the_chat_docs_parse():
    from mlx_mla import server

    lines = (ROOT / "docs" / "chat.md").read_text().splitlines()
    commands = [line.split("#")[0].split() for line in lines if line.startswith("python -m")]
    assert commands
    for command in commands:
        assert command[:3] == ["python", "-m", "mlx_mla.server"]
        server.setup_arg_parser().parse_args(command[3:])


def test_a_server_bound_beyond_localhost_says_so_and_a_local_one_does_not(server):
    assert web.exposure_warning("0.0.0.0", 8080).startswith("warning: listening on 0.0.0.0:8080")
    assert web.exposure_warning("192.168.1.5", 8080) is not None
    for host in ("127.0.0.1", "::1", "localhost"):
        assert web.exposure_warning(host, 8080) is None
    assert "warning: listening" not in server.log.read_text()
