"""The service's log: configured once from the settings, one line per event, text or JSON.

``memento-edge serve`` calls :func:`configure` (the library itself never touches the root logger). Lines:

* a start line (address, auth mode, model state, database, vector backend) and a stop line;
* one access line per request at INFO on ``memento_edge.access``: method, route template (never the
  query string, which may hold search text), status, milliseconds, the token's *name*, client address;
* Waitress's own warnings at most once per :data:`NOISY_INTERVAL` seconds per message, with a count of
  what was held back (its ``Task queue depth is N`` has its own filter in :mod:`memento_edge.web.server`).

``log_format: json`` writes one JSON object per line (``ts``, ``level``, ``logger``, ``msg`` plus the
event's fields) for journald/Loki; ``text`` (the default) is for people.
"""
from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
import time
from datetime import datetime, timezone
from typing import IO, Any, Dict, Iterator, Optional, Tuple

from .errors import InvalidInput

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FORMATS = ("text", "json")
NOISY_INTERVAL = 60.0  # seconds between two lines of the same rate-limited message
_NOISY_LOGGERS = ("waitress",)  # "waitress.queue" is filtered by web.server.QueueDepthFilter
_HANDLER_NAME = "memento-edge"

access_log = logging.getLogger("memento_edge.access")


def url(host: str, port: int) -> str:
    """``http://host:port`` with an IPv6 address in brackets (``http://[::1]:8079``)."""
    name = host.strip("[]") if host else "0.0.0.0"
    return f"http://[{name}]:{port}" if ":" in name else f"http://{name}:{port}"


def parse_level(value: str) -> int:
    """The :mod:`logging` level named by ``value`` (``debug``, ``INFO``, ...)."""
    name = str(value).strip().upper()
    if name not in LEVELS:
        raise InvalidInput(f"log_level must be one of {', '.join(LEVELS)}, not {value!r}", field="log_level")
    return int(getattr(logging, name))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (UTC, ms), ``level``, ``logger``, ``msg`` and the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as a JSON line (structured ``fields`` of the record merged in)."""
        out: Dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        out.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class RateLimit(logging.Filter):
    """Let each distinct message through at most once per ``interval`` seconds; count the rest."""

    def __init__(self, interval: float = NOISY_INTERVAL, clock: Any = time.monotonic) -> None:
        super().__init__()
        self.interval = interval
        self._clock = clock
        self._seen: Dict[Tuple[str, Any], Tuple[float, int]] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        """False for a repeat within the interval; the next line that passes says how many were held."""
        key = (record.name, record.msg)
        now = self._clock()
        with self._lock:
            last, held = self._seen.get(key, (None, 0))
            if last is not None and now - last < self.interval:
                self._seen[key] = (last, held + 1)
                return False
            self._seen[key] = (now, 0)
        if held:
            record.msg = f"{record.msg} ({held} more like this in the last {self.interval:.0f} s)"
        return True


def configure(settings: Any, stream: Optional[IO[str]] = None) -> logging.Handler:
    """Send memento-edge's, Waitress's and Python's log records to ``stream`` (stderr) at ``log_level``,
    formatted per ``log_format``. Idempotent: a second call replaces the handler it installed."""
    level = parse_level(getattr(settings, "log_level", "INFO"))
    fmt = str(getattr(settings, "log_format", "text") or "text").lower()
    if fmt not in FORMATS:
        raise InvalidInput(f"log_format must be one of {', '.join(FORMATS)}, not {fmt!r}", field="log_format")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter() if fmt == "json"
                         else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in _NOISY_LOGGERS:
        noisy = logging.getLogger(name)
        for limit in [f for f in noisy.filters if isinstance(f, RateLimit)]:
            noisy.removeFilter(limit)
        noisy.addFilter(RateLimit())
    return handler


@contextlib.contextmanager
def configured(settings: Any, stream: Optional[IO[str]] = None) -> Iterator[logging.Handler]:
    """:func:`configure` for the length of a ``with`` block, then the handler, root level and filters go
    back to what they were (``serve`` runs inside one; tests call it more than once per process)."""
    root = logging.getLogger()
    level = root.level
    filters = {name: list(logging.getLogger(name).filters) for name in _NOISY_LOGGERS}
    handler = configure(settings, stream)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        for name, kept in filters.items():
            logging.getLogger(name).filters[:] = kept


def request(method: str, route: str, status: int, ms: float, token: str, client: str) -> None:
    """The access line of one request (the route template, never the query string)."""
    access_log.info("%s %s %d %.1fms token=%s client=%s", method, route, status, ms, token, client,
                    extra={"fields": {"event": "request", "method": method, "route": route, "status": status,
                                      "ms": round(ms, 1), "token": token, "client": client}})


def started(log: logging.Logger, *, version: str, address: str, auth: str, tokens: int, model: str,
            database: str, vector_backend: str) -> None:
    """The start line: where it listens, how it authenticates, the model and the database."""
    log.info("memento-edge %s listening on %s auth=%s tokens=%d model=%s database=%s vectors=%s", version,
             address, auth, tokens, model, database, vector_backend,
             extra={"fields": {"event": "start", "version": version, "address": address, "auth": auth,
                               "tokens": tokens, "model": model, "database": database,
                               "vector_backend": vector_backend}})


def stopped(log: logging.Logger, *, address: str, uptime_s: float, requests: int) -> None:
    """The stop line."""
    log.info("memento-edge stopped (%s, up %.0f s, %d requests)", address, uptime_s, requests,
             extra={"fields": {"event": "stop", "address": address, "uptime_s": round(uptime_s, 1),
                               "requests": requests}})
