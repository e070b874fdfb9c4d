"""What an app holds between requests (one :class:`AppState` per app, no module globals) and readiness."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional

from flask import current_app

from ..auth import LiveTokens, is_loopback
from ..device import public_status
from ..errors import MementoError, ModelUnavailable
from ..governor import Governor
from ..service import Service
from .metrics import Metrics
from .ratelimit import RateLimiter

if TYPE_CHECKING:
    from ..config import Settings
    from ..memory import Memory

EXT = "memento"  # key in app.extensions


class AppState:
    """The settings, the Memory, the token table, limiter, metrics and governor of one app."""

    def __init__(self, settings: "Settings", memory: "Memory") -> None:
        self.settings = settings
        self.memory = memory
        # Follows the config file: `memento-edge token revoke` takes effect without a restart.
        self.tokens = LiveTokens(settings.tokens or (), settings.config_file)
        self.limiter = RateLimiter(settings.rate_limit_per_minute)
        self.metrics = Metrics()
        self.service = Service(memory, Governor(settings.rss_limit_mb, lambda: memory.embedder,
                                                idle_unload_minutes=settings.idle_unload_minutes))
        # One large write body (parse + embed) at a time: see api._large_write_slot.
        self.large_writes = threading.BoundedSemaphore(1)
        self.openapi_doc: Optional[Dict[str, Any]] = None

    @property
    def governor(self) -> Governor:
        """The memory governor (the service's: the rules it drives live there)."""
        return self.service.governor

    @governor.setter
    def governor(self, governor: Governor) -> None:
        self.service.governor = governor

    @property
    def embedder(self) -> Any:
        """The Memory's embedder (never forces a model load)."""
        return self.memory.embedder

    @property
    def auth_enabled(self) -> bool:
        """True when requests need a token (once true, it stays true: see :class:`LiveTokens`)."""
        return self.tokens.required

    @property
    def check_host(self) -> bool:
        """Without tokens the API is open to anything that can connect; on loopback that is only local
        processes - and web pages in a local browser via DNS rebinding, which the Host check stops."""
        return not self.auth_enabled and is_loopback(self.settings.host)


def state() -> AppState:
    """The current app's state (inside a request or app context)."""
    return current_app.extensions[EXT]  # type: ignore[no-any-return]


def readiness(st: AppState) -> Dict[str, Any]:
    """``/readyz``: the database is readable and writable (disk space, read-only mount or open), the
    model's state, the governor's state. Not ready (503) whenever a write would fail."""
    try:
        db = st.memory.health()
    except MementoError as exc:
        db = {"db_readable": False, "db_writable": False, "error": exc.message}
    except Exception as exc:  # readiness must answer, whatever broke
        db = {"db_readable": False, "db_writable": False, "error": type(exc).__name__}
    body: Dict[str, Any] = {
        "ready": bool(db["db_writable"]),
        "db": {"writable": bool(db["db_writable"]), "readable": bool(db["db_readable"]),
               "read_only": bool(db.get("read_only", False)), "disk_free_bytes": db.get("disk_free_bytes"),
               "disk_total_bytes": db.get("disk_total_bytes")},
        "model": model_state(st.embedder), "governor": st.governor.state, "clock": clock_state(st)}
    device = public_status(Path(st.settings.device_status))
    if device is not None:  # on the appliance: first-boot file, Imager and Wi-Fi state (memento_edge/device.py)
        body["device"] = device
    if db.get("error"):
        body["db"]["error"] = db["error"]
    _writes_and_vectors(body, st)
    if db["db_readable"]:
        try:
            body["backlog"] = backlog_summary(st.memory.backlog_state())
        except MementoError as exc:
            body["backlog"] = {"error": exc.message}
    return body


def _writes_and_vectors(body: Dict[str, Any], st: AppState) -> None:
    """Add ``writes`` (would a write succeed?), ``reason`` and ``vectors`` to a readiness ``body``.

    Ready = can serve: reads still work without a model (recall answers by keyword), so the service
    stays in rotation; ``writes`` says honestly that stores answer 503 until the model is built.
    """
    model = body["model"]
    body["writes"] = body["ready"] and model["state"] not in ("missing", "error")
    body["vectors"] = vector_state(st)
    if not body["ready"]:
        body["reason"] = f"database: {body['db'].get('error') or 'not writable'}"
    elif not body["writes"]:
        body["reason"] = (f"no usable embedding model ({model.get('error', model['state'])}): writes answer "
                          "503 until `memento-edge model build` has built it")


def vector_state(st: AppState) -> Dict[str, Any]:
    """The vector index in use and whether this Python's sqlite3 can load extensions (sqlite-vec)."""
    from ..store import EXTENSIONS_NOTE, sqlite_can_load_extensions

    store = getattr(st.memory, "store", None)
    backend = getattr(store, "vector_backend", None)
    can_load = sqlite_can_load_extensions()
    return {"backend": backend, "sqlite_extensions": can_load,
            "note": EXTENSIONS_NOTE if backend != "sqlite-vec" and not can_load else None}


def backlog_summary(b: Dict[str, Any]) -> Dict[str, Any]:
    """The embedding backlog as /readyz shows it (a backlog never makes the service unready)."""
    return {"mode": b["mode"], "pending": b["pending"], "failed": b["failed"], "oldest_age_s": b["oldest_age_s"],
            "drain_per_min": b["drain_per_min"], "eta_s": b["eta_s"], "worker": b["worker"]["state"]}


def model_state(emb: Any) -> Dict[str, Any]:
    """loaded / unloaded / missing / error, and the backend, without loading the model."""
    backend = getattr(emb, "backend", None)
    if bool(getattr(emb, "loaded", False)):
        return {"state": "loaded", "loaded": True, "backend": backend}
    try:
        _ = emb.fingerprint  # reads manifest.json only: tells "missing" from "not loaded yet"
    except ModelUnavailable as exc:
        return {"state": "missing", "loaded": False, "backend": backend, "error": exc.message}
    except Exception as exc:
        return {"state": "error", "loaded": False, "backend": backend, "error": type(exc).__name__}
    return {"state": "unloaded", "loaded": False, "backend": backend}


def clock_state(st: AppState) -> Dict[str, Any]:
    """The clock guard's view (README "Time on a board without a clock"); never fails the probe."""
    try:
        return st.memory.clock_state()
    except Exception as exc:  # a sick database must not turn readiness into a 500
        return {**st.memory.clock.state(), "error": type(exc).__name__}
