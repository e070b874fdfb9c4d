"""The LAN page as a person uses it: a real headless Chromium against a real Waitress server.

Driver: Playwright's Python package driving Debian's ``/usr/bin/chromium`` (never ``playwright install``,
which downloads a browser build). The server is ``web.create_app`` served by Waitress on 127.0.0.1 with an
ephemeral port and a temporary MEMENTO_HOME. With the real int8 model available
(``$MEMENTO_TEST_MODEL_DIR`` or ``models/minilm-int8``) the search is checked by meaning ("buy food" finds
"get groceries"); otherwise the deterministic FakeEmbedder is used and the search is checked by words.

If Chromium or Playwright is missing the tests FAIL with the install command: CI installs them.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("MEMENTO_CHROMIUM", "/usr/bin/chromium")
INSTALL_HINT = ("apt-get update && apt-get install -y chromium chromium-driver && "
                ".venv/bin/pip install playwright  (do NOT run `playwright install`)")
TOKEN = "mem_browser-test-token"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
TIMEOUT_MS = 30_000  # generous: the first recall may load the model

SEED = [
    ("get groceries from the market on Saturday", "errands", ["shopping"]),
    ("call the dentist to move the appointment", "health", ["phone"]),
    ("renew the passport before the trip to Lisbon", "travel", ["documents"]),
    ("water the tomatoes in the garden every evening", "home", ["garden"]),
]


def _model_dir() -> Optional[Path]:
    env = os.environ.get("MEMENTO_TEST_MODEL_DIR")
    cand = Path(env) if env else REPO / "models" / "minilm-int8"
    return cand if (cand / "manifest.json").is_file() else None


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dict[str, Any]]:
    """A Waitress server on 127.0.0.1:<ephemeral> serving create_app() over a fresh store."""
    import waitress

    from memento_edge.config import Settings
    from memento_edge.memory import Memory
    from memento_edge.web import create_app

    home = tmp_path_factory.mktemp("browser-home")
    md = _model_dir()
    settings = Settings.load(
        env={}, home=str(home), host="127.0.0.1", model_dir=str(md) if md else None,
        rate_limit_per_minute=0,
        tokens=[{"name": "browser", "sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
                 "scopes": ["read", "write"]}])
    embedder = None
    if md is None:
        from memento_edge.embedder import FakeEmbedder

        embedder = FakeEmbedder()
    memory = Memory(settings, embedder=embedder)
    ids = {}
    for text, collection, tags in SEED:
        ids[text] = memory.remember(text, collection=collection, tags=tags).id
    app = create_app(settings, memory=memory)
    srv = waitress.create_server(app, host="127.0.0.1", port=0, threads=4)
    thread = threading.Thread(target=srv.run, name="waitress", daemon=True)
    thread.start()
    try:
        yield {"url": f"http://127.0.0.1:{srv.effective_port}", "memory": memory, "ids": ids,
               "real_model": md is not None}
    finally:
        # Stop accepting, stop the workers; the daemon loop thread ends with its last channel.
        srv.task_dispatcher.shutdown()
        srv.close()
        thread.join(10)
        memory.close()


@pytest.fixture(scope="module")
def browser_context(server: Dict[str, Any]) -> Iterator[Any]:
    """A headless Chromium (Debian's) with an empty profile, driven by Playwright.

    It depends on ``server`` only so that it is torn down first: closing the browser closes its
    keep-alive connections, which lets the server's loop thread end.
    """
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}; install it with: {INSTALL_HINT}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(f"the playwright Python package is missing; install it with: {INSTALL_HINT}")
    profile = tempfile.mkdtemp(prefix="memento-chromium-")
    try:
        with sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                viewport={"width": 1000, "height": 900})
            ctx.set_default_timeout(TIMEOUT_MS)
            try:
                yield ctx
            finally:
                ctx.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(browser_context: Any, server: Dict[str, Any]) -> Iterator[Any]:
    """A fresh tab on the page, recording every request and every script error."""
    pg = browser_context.new_page()
    pg.requests = []  # type: ignore[attr-defined]
    pg.errors = []  # type: ignore[attr-defined]
    pg.on("request", lambda r: pg.requests.append(r))
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    # The page must work under the service's strict CSP: any violation shows up as a console error.
    pg.on("console", lambda m: pg.errors.append(m.text) if "Content Security Policy" in m.text else None)
    pg.goto(server["url"] + "/")
    try:
        yield pg
    finally:
        pg.close()


def expect(locator: Any) -> Any:
    """Playwright's auto-waiting assertions (imported lazily so a missing package fails with the hint).

    They poll through Playwright's selector engine; string predicates (``wait_for_function``) would be
    ``eval``-ed in the page and blocked by the page's Content-Security-Policy, as they should be.
    """
    from playwright.sync_api import expect as _expect

    return _expect(locator)


def _use_token(pg: Any) -> None:
    pg.fill("#token", TOKEN)
    pg.click("#token-save")
    expect(pg.locator("#token-state")).to_contain_text("accepted")


def _search(pg: Any, query: str, mode: str = "hybrid", collection: str = "") -> List[str]:
    """Run a search from the form; return the hit texts as shown."""
    pg.fill("#q", query)
    pg.evaluate("document.querySelector('#filters').open = true")  # mode and filters are folded
    pg.select_option("#mode", mode)
    pg.fill("#f-collection", collection)
    pg.evaluate("document.querySelector('#search-status').textContent = ''")
    pg.click("#search-btn")
    expect(pg.locator("#search-status")).to_have_text(re.compile("result|Not authorised|rror"))
    return pg.locator("#results .hit-text").all_text_contents()


def _add(pg: Any, text: str, collection: str = "default", tags: str = "") -> str:
    pg.fill("#add-text", text)
    pg.fill("#add-collection", collection)
    pg.fill("#add-tags", tags)
    pg.evaluate("document.querySelector('#add-status').textContent = ''")
    pg.click("#add-btn")
    expect(pg.locator("#add-status")).to_have_text(re.compile("Saved|Already|rror|Not authorised"))
    return pg.text_content("#add-status") or ""


def test_search_without_token_is_refused_and_says_so(page: Any) -> None:
    texts = _search(page, "groceries")
    assert texts == []
    assert "Not authorised" in page.text_content("#search-status")


def test_search_finds_the_expected_memory(page: Any, server: Dict[str, Any]) -> None:
    _use_token(page)
    if server["real_model"]:
        # By meaning: no word in common with "get groceries from the market on Saturday".
        texts = _search(page, "buy food", mode="vector")
        assert texts and "get groceries" in texts[0], texts
        texts = _search(page, "buy food", mode="hybrid")
        assert texts and "get groceries" in texts[0], texts
    else:
        texts = _search(page, "groceries market")
        assert texts and "get groceries" in texts[0], texts
    # Scores are shown next to the hits, as a person reads them (cosine as a percentage).
    assert re.fullmatch(r"\d{1,3}% match", page.locator("#results .score").first.text_content())
    # A collection filter narrows the search to that collection.
    texts = _search(page, "groceries", collection="travel")
    assert all("groceries" not in t for t in texts), texts
    assert set(page.locator("#results .coll").all_text_contents()) <= {"travel"}
    assert page.errors == []


def test_added_memory_appears_in_search(page: Any, server: Dict[str, Any]) -> None:
    _use_token(page)
    status = _add(page, "Ada's birthday party is on the 14th at the boathouse", collection="family",
                  tags="party, ada")
    assert status.startswith("Saved as #"), status
    new_id = int(status.split("#")[1].rstrip("."))
    stored = server["memory"].get(new_id)
    assert (stored.collection, sorted(stored.tags)) == ("family", ["ada", "party"])
    texts = _search(page, "birthday party at the boathouse", mode="keyword")
    assert "Ada's birthday party is on the 14th at the boathouse" in texts
    item = page.locator(f"#results li[data-id='{new_id}']")
    assert item.locator(".coll").text_content() == "family"
    assert sorted(item.locator(".tag").all_text_contents()) == ["ada", "party"]
    assert page.errors == []


def test_memory_text_is_shown_as_text_never_run(page: Any) -> None:
    _use_token(page)
    payload = ('<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'
               '<b id="injected">xsscanary</b>')
    assert _add(page, payload).startswith("Saved")
    texts = _search(page, "xsscanary onerror", mode="keyword")
    assert payload in texts, texts
    assert page.evaluate("window.__pwned") is None
    assert page.locator("#results img, #results script, #injected").count() == 0
    assert page.errors == []


def test_token_travels_only_in_the_authorization_header(page: Any, server: Dict[str, Any]) -> None:
    _use_token(page)
    _search(page, "passport")
    page.click("#stats-btn")
    page.wait_for_selector("#stats dt")
    api_requests = [r for r in page.requests if "/v1/" in r.url]
    assert api_requests, "the page made no API request"
    for req in page.requests:
        assert TOKEN not in req.url
        # Offline appliance: nothing is fetched from anywhere but this server.
        assert req.url.startswith(server["url"]) or req.url.startswith("data:"), req.url
    for req in api_requests:
        assert req.headers.get("authorization") == f"Bearer {TOKEN}", req.url
    assert TOKEN not in page.url
    # Kept for this tab only.
    assert page.evaluate("sessionStorage.getItem('memento-edge.token')") == TOKEN
    assert page.evaluate("localStorage.length") == 0
    assert TOKEN not in page.evaluate("document.cookie")


def test_stats_and_recent_are_shown(page: Any, server: Dict[str, Any]) -> None:
    _use_token(page)
    page.click("#stats-btn")
    page.wait_for_selector("#stats dt")
    shown = dict(zip(page.locator("#stats dt").all_text_contents(),
                     page.locator("#stats dd").all_text_contents()))
    assert shown.get("Memories") == str(server["memory"].count()), shown
    assert shown.get("Embedding backlog") == "none (inline mode)", shown
    page.click("#recent-btn")
    page.wait_for_selector("#recent li")
    # Fewer than 20 memories exist, so the first page holds every seeded one.
    recent = page.locator("#recent .hit-text").all_text_contents()
    assert {text for text, _, _ in SEED} <= set(recent), recent


def test_a_pending_memory_is_announced_and_counted(page: Any, server: Dict[str, Any]) -> None:
    mem = server["memory"]
    mem.background = True  # this server writes as a Pi Zero does (embed_mode background), no worker
    try:
        _use_token(page)
        msg = _add(page, "the spare key hangs behind the garden shed door")
        assert "Embedding pending" in msg, msg
        assert _search(page, "spare key shed", mode="keyword")[0].startswith("the spare key"), msg
        assert page.locator("#results .hit .pending").all_text_contents() == ["embedding pending"]
        page.click("#stats-btn")
        page.wait_for_selector("#stats dt")
        shown = dict(zip(page.locator("#stats dt").all_text_contents(),
                         page.locator("#stats dd").all_text_contents()))
        assert shown.get("Embedding backlog", "").startswith("1 pending"), shown
    finally:
        mem.background = False
        mem.embed_pending()


def test_delete_from_the_page_removes_the_memory(page: Any, server: Dict[str, Any]) -> None:
    from memento_edge.errors import NotFound

    mid = server["memory"].remember("temporary note to be deleted via the page").id
    _use_token(page)
    _search(page, "temporary note deleted", mode="keyword")
    page.once("dialog", lambda d: d.accept())
    page.click(f"#results li[data-id='{mid}'] button[aria-label='Delete memory {mid}']")
    page.wait_for_selector(f"#results li[data-id='{mid}']", state="detached")
    with pytest.raises(NotFound):
        server["memory"].get(mid)


def test_every_control_has_a_label_and_the_page_fits_a_phone(browser_context: Any,
                                                             server: Dict[str, Any]) -> None:
    pg = browser_context.new_page()
    try:
        pg.set_viewport_size({"width": 360, "height": 740})
        pg.goto(server["url"] + "/")
        unlabelled = pg.evaluate("""() => Array.from(document.querySelectorAll('input, select, textarea'))
            .filter(e => !(e.id && document.querySelector('label[for="' + e.id + '"]'))
                         && !e.getAttribute('aria-label'))
            .map(e => e.outerHTML)""")
        assert unlabelled == []
        # No horizontal scrolling on a small phone.
        assert pg.evaluate("document.documentElement.scrollWidth") <= 360
        # Light: the page and its assets stay small (the Pi serves them over Wi-Fi).
        sizes = pg.evaluate("""() => performance.getEntriesByType('resource').map(r => r.decodedBodySize)""")
        html = len(pg.content().encode())
        assert html + sum(sizes) < 40_000
    finally:
        pg.close()


# --- a phone, 390 px wide (#15, finding 8): layout asserted on positions and sizes, not pixels ---------
PHONE = {"width": 390, "height": 844}
TAP = 44  # px: the smallest comfortable tap target


@pytest.fixture
def phone(browser_context: Any, server: Dict[str, Any]) -> Iterator[Any]:
    pg = browser_context.new_page()
    pg.set_viewport_size(PHONE)
    pg.errors = []  # type: ignore[attr-defined]
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.goto(server["url"] + "/")
    try:
        yield pg
    finally:
        pg.close()


def _box(pg: Any, selector: str) -> Dict[str, float]:
    box = pg.locator(selector).first.bounding_box()
    assert box is not None, f"{selector} is not displayed"
    return box


def test_phone_opens_on_search_and_folds_the_token_card_once_it_works(phone: Any) -> None:
    q, card = _box(phone, "#q"), _box(phone, "#token-card")
    assert q["y"] + q["height"] < PHONE["height"] / 3 and q["x"] >= 0 and q["x"] + q["width"] <= PHONE["width"]
    assert card["y"] > q["y"]  # search first, the token below it
    assert phone.locator("#token-card").get_attribute("open") is not None  # a token is needed, none set yet
    _use_token(phone)
    assert phone.locator("#token-card").get_attribute("open") is None
    expect(phone.locator("#token-name")).to_have_text("in use: browser")
    assert _box(phone, "#token-card")["height"] <= 2 * TAP  # folded to its one-line summary
    phone.reload()  # the kept token is checked on load: still folded, the cursor in the search box
    expect(phone.locator("#token-name")).to_have_text("in use: browser")
    assert phone.locator("#token-card").get_attribute("open") is None
    assert phone.evaluate("document.activeElement.id") == "q"
    assert phone.errors == []


def test_phone_shows_readable_results_on_the_first_screen(phone: Any) -> None:
    _use_token(phone)
    phone.fill("#q", "groceries from the market")
    phone.click("#search-btn")
    expect(phone.locator("#search-status")).to_contain_text("result")
    first = _box(phone, "#results li")
    assert first["y"] + first["height"] <= PHONE["height"]  # the best hit is above the fold
    assert phone.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    score = phone.locator("#results .score").first.text_content()
    assert re.fullmatch(r"\d{1,3}% match", score) and int(score.split("%")[0]) > 0, score
    sizes = phone.evaluate("""() => ['.hit-text', '.meta', '.score'].map(
        s => parseFloat(getComputedStyle(document.querySelector('#results ' + s)).fontSize))""")
    assert sizes[0] >= 16 and min(sizes) >= 14, sizes


def test_phone_tap_targets_are_at_least_44_px(phone: Any) -> None:
    _use_token(phone)
    phone.fill("#q", "passport")
    phone.click("#search-btn")
    expect(phone.locator("#search-status")).to_contain_text("result")
    phone.click("#filters > summary")
    phone.click("#token-card > summary")
    small = phone.evaluate("""(tap) => Array.from(document.querySelectorAll(
            'button, input, select, textarea, summary'))
        .filter(e => e.offsetParent !== null)
        .map(e => [e, e.type === 'checkbox' ? document.querySelector('label[for="' + e.id + '"]') : e])
        .map(([e, t]) => [e.id || e.textContent.trim() || e.outerHTML.slice(0, 60),
                          t.getBoundingClientRect()])
        .filter(([_, r]) => r.height < tap || r.width < tap)
        .map(([n, r]) => n + ' ' + Math.round(r.width) + 'x' + Math.round(r.height))""", TAP)
    assert small == []


def test_phone_edits_a_memory(phone: Any, server: Dict[str, Any]) -> None:
    mid = server["memory"].remember("the bike lock code is 1234", tags=["home"]).id
    _use_token(phone)
    phone.fill("#q", "bike lock code")
    phone.click("#search-btn")
    item = phone.locator(f"#results li[data-id='{mid}']")
    item.locator("button", has_text="Edit").click()
    phone.fill(f"#edit-text-{mid}", "the bike lock code is 4321")
    phone.fill(f"#edit-tags-{mid}", "home, bike")
    item.locator("form.edit button[type=submit]").click()
    expect(phone.locator(f"#results li[data-id='{mid}'] .hit-text")).to_have_text("the bike lock code is 4321")
    assert phone.locator(f"#results li[data-id='{mid}'] form.edit").count() == 0
    stored = server["memory"].get(mid)
    assert (stored.text, sorted(stored.tags)) == ("the bike lock code is 4321", ["bike", "home"])
    assert phone.errors == []


class _UnsyncedClock:
    """A clock that is not synchronised, in a boot that ends before it ever is (the row stays flagged)."""

    def read(self) -> Any:
        import time

        from memento_edge.clock import ClockReading

        return ClockReading(wall=time.time() - 3 * 86400, trusted=False, boot_id="an-earlier-boot", boot_ns=1)

    def state(self) -> Dict[str, Any]:
        return {"trusted": False, "source": "test", "mode": "auto"}


def test_a_memory_with_an_unverified_time_is_marked(page: Any, server: Dict[str, Any]) -> None:
    """#16: hits show the clock flag on the page too (the Stats card's Clock row shows the state)."""
    memory = server["memory"]
    real, memory.clock = memory.clock, _UnsyncedClock()
    try:
        mid = memory.remember("the boiler was serviced while the clock was wrong").id
    finally:
        memory.clock = real
    _use_token(page)
    texts = _search(page, "boiler serviced clock", mode="keyword")
    assert "the boiler was serviced while the clock was wrong" in texts
    expect(page.locator(f"#results li[data-id='{mid}'] .unverified")).to_have_text("time unverified")
    assert page.locator("#results .unverified").count() == 1  # only the flagged memory
    page.click("#stats-btn")
    page.wait_for_selector("#stats dt")
    shown = dict(zip(page.locator("#stats dt").all_text_contents(),
                     page.locator("#stats dd").all_text_contents()))
    assert "1 memories with an unverified time" in shown.get("Clock", ""), shown
    assert page.errors == []
