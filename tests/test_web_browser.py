"""The web pages in a real browser: headless Chromium from the system's packages (`apt-get install
chromium`; `.ci/run` installs it when missing) driven by Playwright, against a live server on loopback
serving a tiny random model. One browser and one server for the module; each test gets a fresh tab
(its own sessionStorage) and fails on any console error or page error it did not expect.

These tests FAIL, never skip, when Chromium is missing: a skipped security test looks like a pass.
No test downloads a browser (never `playwright install`).
"""

from __future__ import annotations

import json
import os
import shutil

import httpx
import pytest

from muse.server.app import ServedModel, ServerConfig, create_app
from muse.server.rundata import read_runs
from muse.server.store import Store
from muse.server.ui import dashboard_app
from server_kit import ADMIN, Live, engine_for, tiny_model
from test_web import make_run

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.timeout(180)]

PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 900}
NETWORK_ERROR = "Failed to load resource: the server responded with a status of"


def chromium_path() -> str:
    path = os.environ.get("MUSE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("Chromium is missing: install the system package (`apt-get install -y chromium`; .ci/run does "
                    "it) or point MUSE_CHROMIUM at a Chromium binary. The browser tests never skip.")
    return path


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    b = pw.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox", "--disable-gpu"])
    yield b
    b.close()
    pw.stop()


@pytest.fixture(scope="module")
def server(tiny_tok, tmp_path_factory):
    """The served model "tiny" with a run directory behind it (the operator's run dashboard)."""
    root = tmp_path_factory.mktemp("webui")
    store = Store(root / "serve.sqlite3")
    models = [ServedModel.from_engine("tiny", engine_for(tiny_model(tiny_tok), tiny_tok))]
    live = Live(create_app(models, store, ServerConfig(admin_key=ADMIN), run_dirs={"tiny": str(make_run(root))}))
    live.store = store
    yield live
    live.stop()
    store.close()


class Tab:
    """A page in a fresh context, with its console errors, page errors, dialogs and requests recorded."""

    def __init__(self, browser, base, viewport=DESKTOP):
        self.context = browser.new_context(viewport=viewport)
        self.context.set_default_timeout(90_000)   # a shared 2-core machine can starve a nice'd run for long
        self.page = self.context.new_page()
        self.base = base
        self.errors, self.dialogs, self.requests = [], [], []
        self.allowed: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.on("request", lambda r: self.requests.append(r.url))

    def open(self, path):
        self.page.goto(self.base + path)
        return self.page

    def use_key(self, key):
        self.page.fill("#key", key)
        self.page.click("#key-save")

    def unexpected_errors(self):
        return [e for e in self.errors if not any(a in e for a in self.allowed)]


@pytest.fixture
def tab(browser, server):
    t = Tab(browser, server.url)
    yield t
    t.context.close()
    assert not t.unexpected_errors(), t.errors
    assert not t.dialogs, t.dialogs


def new_key(server, partner, **kw):
    return server.store.create_key(partner, **kw)[0]


def chat(page, text, max_tokens=40):
    page.wait_for_selector("#model option", state="attached")
    page.fill("#max_tokens", str(max_tokens))
    page.fill("#temperature", "1")
    page.fill("#seed", "7")
    page.fill("#prompt", text)
    page.click("#send")
    page.wait_for_selector("#status[data-done]", state="attached")


# ---- playground + partner page ------------------------------------------------------------------------

def test_a_chat_streams_token_by_token_and_the_usage_page_counts_it(tab, server):
    key = new_key(server, "browser-chat", rpm=100, token_quota=100_000, period="day")
    page = tab.open("/ui/partner.html")
    tab.use_key(key)                                              # sessionStorage: shared by the tab's pages
    page.wait_for_selector("body[data-loaded]")
    assert page.inner_text("#stat-requests b") == "0" and page.inner_text("#stat-rpm b") == "100"

    page = tab.open("/ui/")
    assert page.input_value("#key") == key
    chat(page, "Speak, friend.", max_tokens=80)  # long enough that the stream spans several reads even under load
    assert not page.is_visible("#error")
    assert int(page.get_attribute("#output", "data-reads")) >= 2       # several network reads, not one body
    pieces = int(page.get_attribute("#output", "data-pieces"))
    tokens = page.query_selector_all("#output .tok")
    assert pieces >= 2 and len(tokens) == pieces                     # one coloured span per streamed piece
    assert page.inner_text("#messages .msg.user") .endswith("Speak, friend.")
    assert page.inner_text("#messages .msg.assistant").endswith(page.inner_text("#output"))
    tokens[0].hover()
    info = page.inner_text("#tokinfo")
    assert "p=" in info and "top:" in info                         # the top alternatives on hover
    curl, python = page.inner_text("#curl"), page.inner_text("#python")
    assert "$MUSE_API_KEY" in curl and key not in curl and key not in python and "Speak, friend." in python
    assert '"max_tokens": 80' in curl and "max_tokens=80" in python and "chat.completions.create" in python
    assert not any(key in url for url in tab.requests)              # never in a URL

    page = tab.open("/ui/partner.html")
    page.wait_for_selector("body[data-loaded]")
    assert page.inner_text("#stat-requests b") == "1"
    row = page.inner_text("#recent tbody tr")
    assert "chat.completions" in row and "ok" in row
    bars = "[...document.querySelectorAll('#by-day rect.bar')]"
    assert page.evaluate(f"{bars}.length") >= 30                     # one bar per part per day of the window
    assert page.evaluate(f"{bars}.filter(r => +r.getAttribute('height') > 0).length") == 2   # today's two parts
    used = server.store.chain_tokens_used(server.store.authenticate(key).key_id, 0)
    assert page.inner_text("#stat-quota b") == f"{used:,} / 100,000"


def test_completion_mode_and_a_multi_turn_chat(tab, server):
    page = tab.open("/ui/")
    tab.use_key(new_key(server, "browser-modes"))
    page.wait_for_selector("#model option", state="attached")
    page.select_option("#mode", "completion")
    page.fill("#raw-prompt", "the king")
    page.fill("#max_tokens", "6")
    page.click("#send")
    page.wait_for_selector("#status[data-done]", state="attached")
    assert page.inner_text("#output") and "completions.create" in page.inner_text("#python")
    page.select_option("#mode", "chat")
    page.fill("#system", "Be brief.")
    for turn in ("one", "two"):
        page.evaluate("delete document.querySelector('#status').dataset.done")
        page.focus("#prompt")
        page.keyboard.type(turn)
        page.keyboard.press("Control+Enter")                       # keyboard only
        page.wait_for_selector("#status[data-done]", state="attached")
    roles = [e.get_attribute("class") for e in page.query_selector_all("#messages .msg")]
    assert roles == ["msg user", "msg assistant"] * 2
    assert '"role": "system"' in page.inner_text("#curl")


def test_a_wrong_key_shows_the_apis_error(tab, server):
    tab.allowed = [f"{NETWORK_ERROR} 401"]
    page = tab.open("/ui/")
    tab.use_key("muse-sk-not-a-real-key")
    page.wait_for_selector("#error:not(.hidden)")
    text = page.inner_text("#error")
    assert "HTTP 401" in text and "invalid_api_key" in text and "Incorrect API key provided" in text
    assert "not-a-real-key" not in text                             # the API never echoes a key


def test_rate_limit_quota_and_context_errors_as_the_api_says_them(tab, server):
    tab.allowed = [f"{NETWORK_ERROR} 429", f"{NETWORK_ERROR} 400"]
    page = tab.open("/ui/")

    def attempt(key, text, max_tokens):
        tab.use_key(key)
        page.wait_for_selector("#model option", state="attached")
        page.evaluate("delete document.querySelector('#status').dataset.done")
        chat(page, text, max_tokens=max_tokens)
        return page.inner_text("#error") if page.is_visible("#error") else ""

    rpm1 = new_key(server, "browser-429", rpm=1)
    assert attempt(rpm1, "first", 2) == ""
    text = attempt(rpm1, "second", 2)
    assert "HTTP 429" in text and "rate_limit_exceeded" in text and "Retry after" in text
    assert page.input_value("#prompt") == "second"                  # the refused message is back for a retry
    text = attempt(new_key(server, "browser-quota", token_quota=20, period="day"), "hi", 30)
    assert "HTTP 429" in text and "insufficient_quota" in text and "token quota for this day" in text
    text = attempt(new_key(server, "browser-400"), "long " * 20, 10_000)
    assert "HTTP 400" in text and "context_length_exceeded" in text and "maximum context length is 128" in text


def test_model_output_and_user_text_render_as_text_never_as_html(tab, server):
    payloads = ["<script>alert(1)</script>", "<img src=x onerror=\"fetch('/pwned')\">"]
    lp = {"content": [{"token": "<b>", "logprob": -0.5, "bytes": None,
                       "top_logprobs": [{"token": "<img src=x onerror=alert(2)>", "logprob": -1.0, "bytes": None}]}]}
    events = [{"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "tiny",
               "choices": [{"index": 0, "delta": {"content": p}, "logprobs": lp, "finish_reason": None}]}
              for p in payloads]
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    # a test double at the HTTP level: the browser gets this stream instead of the model's
    tab.page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"content-type": "text/event-stream"}, body=body))
    page = tab.open("/ui/")
    tab.use_key(new_key(server, "browser-xss"))
    chat(page, "<img src=x onerror=alert(3)><script>alert(4)</script>")
    assert page.inner_text("#output") == "".join(payloads)
    assert "<script>alert(4)</script>" in page.inner_text("#messages .msg.user")
    for where in ("#output", "#messages", "#tokinfo", "#curl", "#python"):
        assert page.query_selector_all(f"{where} img, {where} script, {where} b") == [], where
    page.hover("#output .tok")
    assert "<img src=x onerror=alert(2)>" in page.inner_text("#tokinfo")
    # nothing was parsed (no element above), so nothing fired: no alert, no fetch, no image request
    assert not tab.dialogs and not [u for u in tab.requests if "pwned" in u or u.endswith("/x")]
    # and the policy itself: Trusted Types refuse any string-to-HTML sink on these pages
    tab.allowed = ["TrustedHTML"]
    assert page.evaluate("() => { try { document.body.innerHTML = '<img src=x>'; return 'parsed'; } "
                         "catch (e) { return e.name; } }") == "TypeError"


# ---- operator page -----------------------------------------------------------------------------------

def test_the_operator_creates_a_key_in_the_page_and_it_works(tab, server):
    page = tab.open("/ui/operator.html")
    tab.use_key(ADMIN)
    page.wait_for_selector("#admin:not(.hidden)")
    page.wait_for_selector("#engine table")
    assert "tiny" in page.inner_text("#engine")
    page.fill("#f-partner", "from-the-page")
    page.fill("#f-rpm", "30")
    page.click("#f-create")
    page.wait_for_selector("#new-key-text")
    key = page.inner_text("#new-key-text").strip()
    assert httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    key_id = server.store.authenticate(key).key_id
    row = page.locator("#keys tr", has_text=key_id)
    row.wait_for()
    assert "rpm 30" in row.inner_text()

    row.get_by_role("button", name="Limits").click()
    page.fill("#f-rpm", "7")
    page.click("#f-update")
    page.locator("#keys tr", has_text="rpm 7").wait_for()
    assert server.store.get_key(key_id).rpm == 7

    row = page.locator("#keys tr", has_text=key_id)
    row.get_by_role("button", name="Revoke").click()
    row.get_by_role("button", name="Confirm revoke").click()         # two clicks, no confirm() dialog
    page.locator("#keys tr", has_text=key_id).wait_for(state="detached")
    assert httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    assert key not in " ".join(tab.requests)


def test_the_operator_page_opens_the_served_models_run_dashboard(tab, server):
    page = tab.open("/ui/operator.html")
    tab.use_key(ADMIN)
    page.wait_for_selector("#admin:not(.hidden)")
    page.click("#runs-link")
    page.wait_for_selector("body[data-loaded]")
    assert page.url.endswith("/ui/dashboard.html#served")
    assert len(page.query_selector_all(".stage-chart[data-stage=base] path.series")) == 1
    assert "tiny" in page.inner_text("#speed")


def test_a_partner_key_cannot_open_the_operator_page(tab, server):
    tab.allowed = [f"{NETWORK_ERROR} 401"]
    page = tab.open("/ui/operator.html")
    tab.use_key(new_key(server, "browser-not-admin"))
    page.wait_for_selector("#error:has-text('HTTP 401')")            # the page asked "enter a key" before
    assert "HTTP 401" in page.inner_text("#error") and "cannot open admin routes" in page.inner_text("#error")
    assert not page.is_visible("#admin") and page.query_selector_all("#keys tr") == []


# ---- dashboard and layout ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    live = Live(dashboard_app(read_runs([make_run(root, "run-a"), make_run(root, "run-b", steps=20)])))
    yield live.url
    live.stop()


def test_the_dashboard_shows_each_runs_curves_eval_and_report_as_text(browser, dashboard):
    t = Tab(browser, dashboard)
    page = t.open("/")
    page.wait_for_selector("body[data-loaded]")
    assert page.input_value("#metric") == "loss"
    base = page.query_selector_all(".stage-chart[data-stage=base] path.series")
    assert len(base) == 2                                            # two runs overlaid
    assert base[0].get_attribute("d").count("L") == 29                # 30 loss points of run-a
    page.select_option("#metric", "val_bpb")
    assert len(page.query_selector_all(".stage-chart path.series")) == 2
    assert "1,015" in page.inner_text("#speed") and "30.0%" in page.inner_text("#speed")   # median tok/s, MFU
    assert "0.500 \u00b1 0.100" in page.inner_text("#eval")
    assert "<img src=x onerror=alert(1)>" in page.inner_text("#samples")
    assert "<script>alert(1)</script>" in page.inner_text("#report table")
    assert page.query_selector_all("#report script, #samples img") == []
    assert not t.unexpected_errors() and not t.dialogs
    t.context.close()


@pytest.mark.parametrize("path", ["/ui/", "/ui/partner.html", "/ui/operator.html"])
def test_every_page_fits_a_390_px_phone(browser, server, path):
    t = Tab(browser, server.url, viewport=PHONE)
    page = t.open(path)
    t.use_key(ADMIN if "operator" in path else new_key(server, "phone"))
    page.wait_for_load_state("networkidle")
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.tagName") in ("A", "INPUT", "BUTTON")
    assert not t.unexpected_errors()
    t.context.close()


def test_the_dashboard_fits_a_390_px_phone(browser, dashboard):
    t = Tab(browser, dashboard, viewport=PHONE)
    page = t.open("/ui/")
    page.wait_for_selector("body[data-loaded]")
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    assert not t.unexpected_errors()
    t.context.close()
