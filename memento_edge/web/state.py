"""What an app holds between requests (one :class:`AppState` per app, no module globals) and readiness."""
from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any, Dict, Optional

from flask import current_app

from ..auth import TokenTable, is_loopback
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
    """``/readyz``: the database answers and is writable; the model's state; the governor's state."""
    db_ok, db_error = True, None
    try:
        st.memory.count()
        db_path = st.settings.db_path
        target = db_path if db_path.exists() else db_path.parent
        if not os.access(str(target), os.W_OK) or not os.access(str(db_path.parent), os.W_OK):
            db_ok, db_error = False, "database file or directory is not writable"
    except MementoError as exc:
        db_ok, db_error = False, exc.message
    except Exception as exc:  # readiness must answer, whatever broke
        db_ok, db_error = False, f"{type(exc).__name__}"
    body: Dict[str, Any] = {"ready": db_ok, "db": {"writable": db_ok}, "model": model_state(st.embedder),
                            "governor": st.governor.state}
    if db_error:
        body["db"]["error"] = db_error
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
