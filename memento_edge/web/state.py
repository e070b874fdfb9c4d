"""What an app holds between requests (one :class:`AppState` per app, no module globals) and readiness."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional

from flask import current_app

from ..auth import TokenTable, is_loopback
from ..device import public_status
from ..errors import MementoError, ModelUnavailable
from ..governor import Governor
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
        self.tokens = TokenTable(settings.tokens or ())
        self.auth_enabled = self.tokens.enabled
        # Without tokens the API is open to anything that can connect; on loopback that is only local
        # processes - and web pages in a local browser via DNS rebinding, which the Host check stops.
        self.check_host = not self.auth_enabled and is_loopback(settings.host)
        self.limiter = RateLimiter(settings.rate_limit_per_minute)
        self.metrics = Metrics()
        self.governor = Governor(settings.rss_limit_mb, lambda: memory.embedder,
                                 idle_unload_minutes=settings.idle_unload_minutes)
        # One large write body (parse + embed) at a time: see api._large_write_slot.
        self.large_writes = threading.BoundedSemaphore(1)
        # Striped locks serialise requests that share an idempotency key (check-then-act race).
        self.idem_locks = [threading.Lock() for _ in range(64)]
        self.openapi_doc: Optional[Dict[str, Any]] = None

    @property
    def embedder(self) -> Any:
        """The Memory's embedder (never forces a model load)."""
        return self.memory.embedder


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
        "model": model_state(st.embedder), "governor": st.governor.state}
    device = public_status(Path(st.settings.device_status))
    if device is not None:  # on the appliance: first-boot file, Imager and Wi-Fi state (memento_edge/device.py)
        body["device"] = device
    if db.get("error"):
        body["db"]["error"] = db["error"]
    return body


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
