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
import time
from typing import TYPE_CHECKING, Any, Dict, Optional

from flask import Flask

from .. import __version__, logs
from ..auth import check_bind
from ..governor import HARD
from .access import register_hooks, route_template
from .errors import ApiError, error_response, register_error_handlers
from .ratelimit import RateLimiter
from .state import EXT, AppState, readiness

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


def _log_start(mode: str, st: AppState, address: str) -> None:
    """The start line, then a warning for each thing an operator must know: no auth, no model, slow vectors."""
    ready = readiness(st)
    logs.started(log, version=__version__, address=address, auth=mode, tokens=len(st.tokens),
                 model=ready["model"]["state"], database=str(st.settings.db_path),
                 vector_backend=str(ready["vectors"]["backend"]))
    if mode == "loopback-open":
        log.warning("no API token is configured, so only this machine (loopback) can connect; create one "
                    "with `memento-edge token create` to serve the LAN")
    if not ready["writes"] and ready["ready"]:
        log.warning("no embedding model at %s: recall answers by keyword and writes answer 503 until "
                    "`memento-edge model build` has built it", st.settings.model_path)
    if ready["vectors"]["note"]:
        log.warning("%s", ready["vectors"]["note"])


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
    address = logs.url(settings.host, int(getattr(server, "effective_port", settings.port)))
    _log_start(mode, st, address)
    started = time.monotonic()
    stop_governor = st.governor.start_background()
    # Drains the embedding backlog (also one left by a previous run), not while memory is critically high.
    st.memory.start_embed_worker(may_embed=lambda: st.governor.check() != HARD)
    if settings.warmup:
        st.embedder.start_warmup()  # the service answers meanwhile: recall degrades to keyword search

    def _on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # unwinds server.run() in the main thread; finally-blocks close the DB

    def _on_hup(signum: int, frame: Any) -> None:
        st.tokens.reload()  # `systemctl reload memento-edge` (SIGHUP): re-read the tokens now

    previous: Dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, _on_term)
        if hasattr(signal, "SIGHUP"):
            previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, _on_hup)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        stop_governor.set()
        server.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        logs.stopped(log, address=address, uptime_s=time.monotonic() - started,
                     requests=st.metrics.total_requests())
        if own_memory:
            st.memory.close()

