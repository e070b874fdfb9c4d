"""The LAN HTTP service: a Flask app (``create_app``) served by Waitress (``serve``).

    __init__.py  create_app, serve
    api.py       the /v1 REST blueprint (short views: parse -> one call -> respond)
    mcp.py       POST /mcp: the MCP endpoint (the protocol itself is memento_edge.mcp)
    pages.py     /, /healthz, /readyz, /metrics, /openapi.json
    requests.py  JSON / NDJSON bodies, query parameters, field checks driven by memento_edge.schema
    errors.py    the JSON error shape; domain errors -> HTTP status
    access.py    scopes, bearer tokens, rate limiting, Host check, access log
    state.py     what an app holds between requests; readiness
    metrics.py   the Prometheus renderer
    ratelimit.py token buckets
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import TYPE_CHECKING, Any, Optional

from flask import Flask

from .. import __version__
from ..auth import check_bind
from .access import register_hooks, route_template
from .errors import ApiError, error_response, register_error_handlers
from .ratelimit import RateLimiter
from .state import EXT, AppState

if TYPE_CHECKING:  # memory.py is imported lazily: the web layer must import even while it is absent
    from ..config import Settings
    from ..memory import Memory

__all__ = ["ApiError", "RateLimiter", "create_app", "error_response", "route_template", "serve"]

log = logging.getLogger(__name__)


def create_app(settings: "Settings", memory: Optional["Memory"] = None) -> Flask:
    """Build the Flask app around ``memory`` (opened from ``settings`` if not given).

    Raises :class:`InvalidInput` for malformed token entries in the settings. The bind policy
    (refusing a non-loopback address without a token) is applied by :func:`serve`.
    """
    from . import api, mcp, pages

    if memory is None:
        from ..memory import Memory

        memory = Memory(settings)
    app = Flask("memento_edge")
    app.config["MAX_CONTENT_LENGTH"] = int(settings.max_body_bytes)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.json.ensure_ascii = False  # type: ignore[attr-defined]
    app.extensions[EXT] = AppState(settings, memory)
    register_error_handlers(app)
    register_hooks(app)
    app.register_blueprint(pages.bp)
    app.register_blueprint(api.bp)
    mcp.register(app)
    return app


def _log_bind(mode: str, settings: "Settings", tokens: int) -> None:
    if mode == "tokens":
        log.info("memento-edge %s serving on http://%s:%s (%d API token(s) configured)", __version__,
                 settings.host, settings.port, tokens)
    elif mode == "loopback-open":
        log.warning("memento-edge %s serving on http://%s:%s WITHOUT authentication: no API token is "
                    "configured, so only this machine (loopback) can connect. Create a token with "
                    "`memento-edge token create` to serve the LAN.", __version__, settings.host,
                    settings.port)
    else:
        log.warning("memento-edge %s serving on http://%s:%s WITHOUT authentication (insecure_no_auth)",
                    __version__, settings.host, settings.port)


def serve(settings: "Settings", memory: Optional["Memory"] = None) -> None:
    """Run the service on Waitress until SIGINT/SIGTERM; close the database on the way out.

    Raises :class:`InvalidInput` before binding when the address/token combination is unsafe (see
    :func:`memento_edge.auth.check_bind`). Also starts the governor's background tick (RSS check, idle
    model unload) and, with ``settings.warmup``, loads the model in a background thread.

    Waitress itself refuses bodies more than 1 KiB over ``max_body_bytes`` (a plain-text 413) before
    buffering them, so an oversized upload costs neither memory nor SD-card writes; bodies just over
    the cap reach the app and get the JSON 413.
    """
    from ..embedder import tune_malloc
    from .server import create_guarded_server

    mode = check_bind(settings)
    tune_malloc()  # before the worker threads and the model allocate anything
    own_memory = memory is None
    app = create_app(settings, memory)
    st: AppState = app.extensions[EXT]
    server = create_guarded_server(
        app, host=settings.host, port=settings.port, threads=settings.threads,
        connection_limit=settings.connection_limit, channel_timeout=settings.channel_timeout,
        header_timeout=settings.header_timeout, connections_per_client=settings.connections_per_client,
        max_request_body_size=int(settings.max_body_bytes) + 1024, ident="memento-edge",
        clear_untrusted_proxy_headers=True)
    _log_bind(mode, settings, len(st.tokens))
    stop_governor = st.governor.start_background()
    if settings.warmup:
        threading.Thread(target=_warmup, args=(st.embedder,), name="memento-warmup", daemon=True).start()

    def _on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # unwinds server.run() in the main thread; finally-blocks close the DB

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_term)
    try:
        server.run()
    except KeyboardInterrupt:
        log.info("shutting down")
    finally:
        stop_governor.set()
        server.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if own_memory:
            st.memory.close()


def _warmup(embedder: Any) -> None:
    try:
        embedder.load()
        log.info("model loaded (warmup)")
    except Exception as exc:  # the service still works: recall degrades to keyword search
        log.warning("model warmup failed: %s", exc)
