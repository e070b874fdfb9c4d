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
    # Scores are shown next to the hits.
    assert page.locator("#results .score").first.text_content().startswith("score ")
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
    page.click("#recent-btn")
    page.wait_for_selector("#recent li")
    # Fewer than 20 memories exist, so the first page holds every seeded one.
    recent = page.locator("#recent .hit-text").all_text_contents()
    assert {text for text, _, _ in SEED} <= set(recent), recent


def test_delete_from_the_page_removes_the_memory(page: Any, server: Dict[str, Any]) -> None:
    from memento_edge.errors import NotFound

    mid = server["memory"].remember("temporary note to be deleted via the page").id
    _use_token(page)
    _search(page, "temporary note deleted", mode="keyword")
    page.once("dialog", lambda d: d.accept())
    page.click(f"#results li[data-id='{mid}'] button")
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
