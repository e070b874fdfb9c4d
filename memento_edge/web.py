"""The LAN HTTP service: a Flask app (``create_app``) served by Waitress (``serve``).

Every route is a thin translation between JSON and :class:`memento_edge.memory.Memory`; the engine does
the validation of values (text and query length, topk, importance, filters) and raises domain errors
that are mapped here onto one JSON error shape::

    {"error": {"code": "invalid_input", "message": "...", "field": "topk"}}

Status codes: 400 the request is not well-formed (JSON syntax, wrong types, unknown fields, NUL bytes),
401 no/bad token, 403 token lacks the scope, 404 no such memory or route, 405, 409 idempotency key reused
with another body, 413 body over ``max_body_bytes``, 415 not JSON / NDJSON, 422 well-formed but refused
by the engine (:class:`~memento_edge.errors.InvalidInput`), 429 rate limited, 503 busy / timeout /
model unavailable / memory pressure (with ``Retry-After``), 507 disk full. A 500 means a bug; its body
never carries a traceback (that goes to the log).

Model missing or unloadable: recall degrades to keyword search by itself (the engine reports
``"mode": "keyword"`` and a ``note``), but *writes* answer 503 ``model_unavailable`` with Retry-After.
Storing a memory without its vector would leave it invisible to meaning search until a reindex, silently;
refusing loudly lets the agent retry (or fall back) while the operator runs ``memento-edge model build``.

Security: bearer tokens from the config (see :mod:`memento_edge.auth`), per-principal token-bucket rate
limiting, a body size cap, and - when no token is configured and the service is bound to loopback - a
Host-header check that stops DNS-rebinding pages in the local browser from reaching the open API.
Tokens never appear in logs or URLs: only the token's *name* is logged.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import math
import re
import secrets
import signal
import tempfile
import threading
import time
from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, FrozenSet, Iterator, List, Optional, Tuple

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException

from . import __version__
from .auth import ANONYMOUS, Principal, TokenTable, bearer_token, check_bind, is_loopback
from .errors import (Busy, Conflict, EmbedTimeout, InvalidInput, MementoError, ModelMismatch,
                     ModelUnavailable, NotFound, StorageFull, StoreError)
from .governor import Governor, read_rss_bytes

if TYPE_CHECKING:  # memory.py is imported lazily: the web layer must import even while it is absent
    from .config import Settings
    from .memory import Memory

log = logging.getLogger(__name__)
access_log = logging.getLogger("memento_edge.access")

EXT = "memento"  # key in app.extensions
INT64_MAX = 2 ** 63 - 1
MAX_BATCH_ITEMS = 1000
MAX_BATCH_QUERIES = 32  # Memory.recall_many refuses more
MAX_LIST_LIMIT = 1000
MAX_IDEMPOTENCY_KEY = 200
NDJSON_TYPES = ("application/x-ndjson", "application/ndjson", "application/jsonl", "application/x-jsonlines",
                "application/json-lines", "text/plain")
MODEL_RETRY_AFTER = 30  # seconds: a missing model will not come back by itself, don't invite a retry storm

# Fields of a memory a client may send (POST) or change (PATCH), with their JSON types.
_MEMORY_FIELDS: Dict[str, Tuple[str, bool]] = {
    # name: (type, nullable)
    "text": ("str", False),
    "collection": ("str", False),
    "tags": ("list[str]", False),
    "source": ("str", True),
    "session_id": ("str", True),
    "importance": ("number", False),
    "metadata": ("object", True),
}
# POST also takes created_at (ISO-8601 or Unix seconds), e.g. when an agent replays older notes.
_CREATE_FIELDS: Dict[str, Tuple[str, bool]] = dict(_MEMORY_FIELDS, created_at=("time", True))
_RECALL_FIELDS: Dict[str, Tuple[str, bool]] = {
    "query": ("str", False),
    "topk": ("int", False),
    "mode": ("str", False),
    "filters": ("object", True),
}
_FILTER_FIELDS: Dict[str, Tuple[str, bool]] = {
    "collection": ("str", False),
    "tags_any": ("list[str]", False),
    "tags_all": ("list[str]", False),
    "source": ("str", False),
    "session_id": ("str", False),
    "min_importance": ("number", False),
    "since": ("str", False),
    "until": ("str", False),
    "metadata": ("object", False),
    "untrusted_time": ("str", False),
}


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------
class ApiError(Exception):
    """An HTTP-level error raised by the web layer itself (the engine raises MementoError instead)."""

    def __init__(self, status: int, code: str, message: str, *, field: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or {}


def _bad(message: str, field: Optional[str] = None, code: str = "invalid_input") -> ApiError:
    return ApiError(400, code, message, field=field)


def error_response(status: int, code: str, message: str, field: Optional[str] = None,
                   headers: Optional[Dict[str, str]] = None) -> Response:
    """The one JSON error shape every failing request gets."""
    body: Dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        body["field"] = field
    resp = jsonify({"error": body})
    resp.status_code = status
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def _retry_after(seconds: float) -> Dict[str, str]:
    return {"Retry-After": str(max(1, int(math.ceil(seconds))))}


def _map_domain_error(exc: MementoError) -> Tuple[int, Dict[str, str]]:
    if isinstance(exc, InvalidInput):
        return 422, {}
    if isinstance(exc, NotFound):
        return 404, {}
    if isinstance(exc, Conflict):
        return 409, {}
    if isinstance(exc, Busy):  # includes EmbedTimeout
        return 503, _retry_after(getattr(exc, "retry_after", 1.0))
    if isinstance(exc, StorageFull):
        return 507, {}
    if isinstance(exc, ModelUnavailable):
        return 503, _retry_after(MODEL_RETRY_AFTER)
    if isinstance(exc, ModelMismatch):
        return 503, {}
    if isinstance(exc, StoreError):
        return 503, _retry_after(MODEL_RETRY_AFTER)
    return 500, {}


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 406: "not_acceptable", 408: "request_timeout",
               411: "length_required", 413: "payload_too_large", 414: "uri_too_long",
               415: "unsupported_media_type", 416: "range_not_satisfiable", 429: "rate_limited",
               431: "headers_too_large", 501: "not_implemented"}


def _register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        return error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)

    @app.errorhandler(MementoError)
    def _domain_error(exc: MementoError) -> Response:
        status, headers = _map_domain_error(exc)
        if status >= 500 and not isinstance(exc, (Busy, ModelUnavailable)):
            log.warning("request failed: %s: %s", type(exc).__name__, exc.message)
        return error_response(status, exc.code, exc.message, exc.field, headers)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        code = _HTTP_CODES.get(status, "http_error")
        message = exc.description or exc.name
        if status == 413:
            message = f"request body is larger than {current_app.config['MAX_CONTENT_LENGTH']} bytes"
        elif status == 404:
            message = "no such route"
        elif status == 405:
            message = f"method {request.method} is not allowed here"
        resp = error_response(status, code, message)
        for key in ("Allow", "Retry-After", "WWW-Authenticate"):
            value = exc.get_response().headers.get(key) if hasattr(exc, "get_response") else None
            if value:
                resp.headers[key] = value
        return resp

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        if isinstance(exc, HTTPException):  # pragma: no cover - handled above
            return _http_error(exc)
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal", "internal server error (see the service log)")


# ------------------------------------------------------------------------------------------------
# request parsing
# ------------------------------------------------------------------------------------------------
def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number out of range: {text[:40]}")
    return value


def _check_json_values(obj: Any) -> None:
    """Refuse values that are valid JSON but would break below: NUL bytes, lone surrogates, huge ints.

    NUL characters are refused in strings that become SQLite text columns or FTS5 input (many SQLite
    string functions stop at a NUL). A memory's own ``metadata`` subtree is skipped: it is stored as
    escaped JSON text, so NULs and big numbers there are harmless (the engine checks its size and
    encoding). Iterative (not recursive) so a deeply nested body cannot exhaust the stack here.
    """
    stack: List[Tuple[Any, str, bool]] = [(obj, "", False)]  # (value, path, inside filters)
    while stack:
        value, path, in_filters = stack.pop()
        if isinstance(value, str):
            if "\x00" in value:
                raise _bad("strings must not contain NUL characters", path or None)
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise _bad("strings must be valid Unicode (lone surrogate escape)", path or None) from None
        elif isinstance(value, bool):
            continue
        elif isinstance(value, int):
            if not -INT64_MAX - 1 <= value <= INT64_MAX:
                raise _bad("integer out of the 64-bit range", path or None)
        elif isinstance(value, dict):
            for k, v in value.items():
                if "\x00" in k:
                    raise _bad("object keys must not contain NUL characters", path or None)
                child = f"{path}.{k}" if path else k
                if k == "metadata" and not in_filters:
                    continue  # stored as JSON text (see above)
                if k == "created_at":
                    _check_created_at(v, child)
                stack.append((v, child, in_filters or k == "filters"))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                stack.append((v, f"{path}[{i}]", in_filters))


# created_at must come back out as an ISO-8601 string: keep it between 1970 and the year 9999.
_MAX_TIMESTAMP = 253402300799.0


def _check_created_at(value: Any, field: str) -> None:
    """422 for a created_at outside 1970..9999 (the engine would store it and then fail to format it)."""
    ts: Optional[float] = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        ts = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            dt = datetime.fromisoformat(text)
        except ValueError:
            return  # not ISO-8601 at all: the engine says so with its own message
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        try:
            ts = dt.timestamp()
        except (OverflowError, ValueError):
            ts = -1.0
    if ts is not None and not 0.0 <= ts <= _MAX_TIMESTAMP:
        raise ApiError(422, "invalid_input", "created_at must be between 1970 and the year 9999",
                       field=field)


def _require_media_type(allowed: Tuple[str, ...], what: str) -> None:
    mimetype = request.mimetype
    ok = mimetype in allowed or ("application/json" in allowed and mimetype.startswith("application/")
                                 and mimetype.endswith("+json"))
    if not ok:
        raise ApiError(415, "unsupported_media_type",
                       f"Content-Type must be {allowed[0]} ({what}); got {mimetype or 'none'!r}")
    charset = request.mimetype_params.get("charset")
    if charset and charset.lower().replace("_", "-") not in ("utf-8", "utf8"):
        raise ApiError(415, "unsupported_media_type", "only the utf-8 charset is accepted")


def _raw_body() -> bytes:
    # get_data honours MAX_CONTENT_LENGTH (also for chunked bodies) and raises 413 above it.
    return request.get_data(cache=True)


def json_body(*, required: bool = True) -> Dict[str, Any]:
    """The request's JSON object body, or ``{}`` when optional and absent. Raises ApiError 400/413/415."""
    raw = _raw_body() if (request.content_length or request.headers.get("Transfer-Encoding")) else b""
    if not raw:
        if required:
            if request.mimetype and request.mimetype != "application/json":
                _require_media_type(("application/json",), "a JSON object")
            raise _bad("request body must be a JSON object")
        return {}
    _require_media_type(("application/json",), "a JSON object")
    try:
        obj = json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise _bad("JSON nested too deeply", code="invalid_json") from None
    except ValueError as exc:  # includes UnicodeDecodeError and json.JSONDecodeError
        raise _bad(f"malformed JSON: {str(exc)[:200]}", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise _bad("request body must be a JSON object", code="invalid_json")
    _check_json_values(obj)
    return obj


def _type_ok(value: Any, kind: str) -> bool:
    if kind == "str":
        return isinstance(value, str)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "object":
        return isinstance(value, dict)
    if kind == "list[str]":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind == "time":
        return isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool))
    if kind == "list[object]":
        return isinstance(value, list) and all(isinstance(v, dict) for v in value)
    raise AssertionError(kind)


_TYPE_NAMES = {"str": "a string", "int": "an integer", "number": "a number", "bool": "a boolean",
               "object": "a JSON object",
               "list[str]": "a list of strings", "list[object]": "a list of objects",
               "time": "an ISO-8601 string or Unix seconds"}


def check_fields(obj: Dict[str, Any], spec: Dict[str, Tuple[str, bool]], *, required: Tuple[str, ...] = (),
                 prefix: str = "") -> Dict[str, Any]:
    """Check ``obj``'s keys and JSON types against ``spec``; unknown or mistyped fields -> 400.

    Values are not range-checked here: that is the engine's job (and gives 422).
    """
    for name in obj:
        if name not in spec:
            raise _bad(f"unknown field {name!r}", prefix + name)
    for name in required:
        if name not in obj:
            raise _bad(f"missing required field {name!r}", prefix + name)
    for name, value in obj.items():
        kind, nullable = spec[name]
        if value is None:
            if not nullable:
                raise _bad(f"{name} must not be null", prefix + name)
            continue
        if not _type_ok(value, kind):
            raise _bad(f"{name} must be {_TYPE_NAMES[kind]}", prefix + name)
    return obj


def _query_int(name: str, default: Optional[int], lo: int, hi: int) -> Optional[int]:
    raw = request.args.get(name)
    if raw is None:
        return default
    if not re.fullmatch(r"[+-]?[0-9]{1,19}", raw.strip()):
        raise _bad(f"{name} must be an integer", name)
    value = int(raw)
    if not lo <= value <= hi:
        raise ApiError(422, "invalid_input", f"{name} must be between {lo} and {hi}", field=name)
    return value


def _query_str(name: str, *, max_len: int = 1000) -> Optional[str]:
    raw = request.args.get(name)
    if raw is None:
        return None
    if "\x00" in raw:
        raise _bad(f"{name} must not contain NUL characters", name)
    if len(raw) > max_len:
        raise ApiError(422, "invalid_input", f"{name} is longer than {max_len} characters", field=name)
    return raw


# ------------------------------------------------------------------------------------------------
# rate limiting and metrics
# ------------------------------------------------------------------------------------------------
class RateLimiter:
    """Token buckets keyed by principal (token name or client address), with bounded memory.

    Each key may burst up to ``per_minute`` requests and refills at ``per_minute / 60`` per second.
    At most ``max_keys`` buckets are kept (least recently used evicted): an evicted bucket is simply
    full again, which only matters for a client that is idle - or for one cycling through thousands of
    addresses, which gets fresh buckets either way.
    """

    def __init__(self, per_minute: int, *, max_keys: int = 4096,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: "OrderedDict[str, Tuple[float, float]]" = OrderedDict()  # key -> (tokens, t)
        self._lock = threading.Lock()
        self.limited = 0

    @property
    def enabled(self) -> bool:
        """False when ``rate_limit_per_minute`` is 0."""
        return self.capacity > 0

    def hit(self, key: str) -> float:
        """Take one token for ``key``: 0.0 if allowed, else the seconds until a token is available."""
        if not self.enabled:
            return 0.0
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.pop(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                tokens -= 1.0
                wait = 0.0
            else:
                wait = (1.0 - tokens) / self.rate
                self.limited += 1
            self._buckets[key] = (tokens, now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        return wait


_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))


def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class Metrics:
    """Request counters and latency histograms, rendered in the Prometheus text format (v0.0.4).

    Label values are route *rules* (``/v1/memories/<int:id>``), normalised methods and status codes,
    so the number of series is bounded however hostile the traffic.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (route, method, status) -> [bucket counts..., sum, count]
        self._series: Dict[Tuple[str, str, str], List[float]] = {}
        self.started = time.time()

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        """Record one finished request."""
        method = method if method in _METHODS else "OTHER"
        key = (route, method, str(status))
        with self._lock:
            row = self._series.get(key)
            if row is None:
                row = self._series[key] = [0.0] * (len(_BUCKETS) + 2)
            for i, bound in enumerate(_BUCKETS):
                if seconds <= bound:
                    row[i] += 1
            row[-2] += seconds
            row[-1] += 1

    def render(self, extra: List[Tuple[str, str, str, List[Tuple[Dict[str, str], float]]]]) -> str:
        """Exposition text: the HTTP series plus ``extra`` families ``(name, type, help, samples)``."""
        out: List[str] = []
        with self._lock:
            series = sorted((k, list(v)) for k, v in self._series.items())
        out.append("# HELP memento_http_requests_total HTTP requests served, by route, method and status.")
        out.append("# TYPE memento_http_requests_total counter")
        for (route, method, status), row in series:
            out.append(f'memento_http_requests_total{{route="{_label(route)}",method="{method}",'
                       f'status="{status}"}} {_fmt(int(row[-1]))}')
        out.append("# HELP memento_http_request_duration_seconds Time to produce the response headers.")
        out.append("# TYPE memento_http_request_duration_seconds histogram")
        for (route, method, status), row in series:
            labels = f'route="{_label(route)}",method="{method}",status="{status}"'
            for i, bound in enumerate(_BUCKETS):
                out.append(f'memento_http_request_duration_seconds_bucket{{{labels},le="{bound}"}} '
                           f'{_fmt(int(row[i]))}')
            out.append(f'memento_http_request_duration_seconds_bucket{{{labels},le="+Inf"}} '
                       f'{_fmt(int(row[-1]))}')
            out.append(f"memento_http_request_duration_seconds_sum{{{labels}}} {_fmt(row[-2])}")
            out.append(f"memento_http_request_duration_seconds_count{{{labels}}} {_fmt(int(row[-1]))}")
        for name, kind, help_text, samples in extra:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            for labels_d, value in samples:
                suffix = labels_d.get("__suffix", "")  # e.g. _sum/_count of a summary
                labels = ",".join(f'{k}="{_label(v)}"' for k, v in labels_d.items() if k != "__suffix")
                sample = name + suffix
                out.append(f"{sample}{{{labels}}} {_fmt(value)}" if labels else f"{sample} {_fmt(value)}")
        return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------
# app state
# ------------------------------------------------------------------------------------------------
class _State:
    """Everything the app holds between requests (one per app; no module globals)."""

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
        self.governor = Governor(settings.rss_limit_mb, lambda: _embedder_of(memory),
                                 idle_unload_minutes=settings.idle_unload_minutes)
        # Striped locks serialise requests that share an idempotency key (check-then-act race).
        self.idem_locks = [threading.Lock() for _ in range(64)]
        self.openapi_doc: Optional[Dict[str, Any]] = None


def _state() -> _State:
    return current_app.extensions[EXT]


def _embedder_of(memory: Any) -> Any:
    """The Memory's embedder, without forcing a model load (None if not exposed)."""
    for attr in ("embedder", "_embedder"):
        emb = getattr(memory, attr, None)
        if emb is not None:
            return emb
    return None


# ------------------------------------------------------------------------------------------------
# the /v1 blueprint
# ------------------------------------------------------------------------------------------------
def requires(scope: Optional[str]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark a view as needing ``scope`` (read/write/admin); None = public (no auth)."""
    def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.required_scope = scope  # type: ignore[attr-defined]
        return fn
    return mark


def query_params(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare the query parameters a /v1 view takes; any other one is refused (400), like unknown body
    fields: a misspelt ``?colection=`` must not silently widen a query."""
    def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.query_params = frozenset(names)  # type: ignore[attr-defined]
        return fn
    return mark


def _memory_kwargs(obj: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    check_fields(obj, _CREATE_FIELDS, required=("text",), prefix=prefix)
    kwargs = dict(obj)
    if "tags" in kwargs:
        kwargs["tags"] = tuple(kwargs["tags"])
    return kwargs


def _remember_result(r: Any) -> Dict[str, Any]:
    d = r.to_dict() if hasattr(r, "to_dict") else dict(r)
    return d


def _recall_kwargs(obj: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    check_fields(obj, _RECALL_FIELDS, required=("query",), prefix=prefix)
    kwargs = dict(obj)
    if kwargs.get("filters") is not None:
        check_fields(kwargs["filters"], _FILTER_FIELDS, prefix=prefix + "filters.")
    else:
        kwargs.pop("filters", None)
    return kwargs


def _needs_model(mode: Any) -> bool:
    return mode != "keyword"


def _existing_id(memory_id: int) -> None:
    # Ids are 1..2**63-1 (SQLite rowids): anything else simply does not exist. Checked here rather than
    # with int(max=...) in the rule, because a converter that refuses a value makes Werkzeug answer 405.
    if not 1 <= memory_id <= INT64_MAX:
        raise NotFound(f"no memory with id {memory_id}", field="id")


def _idempotency_key() -> Optional[str]:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY or not all(33 <= ord(c) <= 126 for c in key):
        raise _bad(f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} printable ASCII characters "
                   "without spaces", "Idempotency-Key")
    return key


def _make_v1() -> Blueprint:
    bp = Blueprint("v1", __name__, url_prefix="/v1")

    @bp.post("/memories")
    @requires("write")
    def create_memories() -> Response:
        """One memory (``{"text": ...}``) or a batch (``{"items": [...]}``); honours Idempotency-Key."""
        st = _state()
        body = json_body()
        key = _idempotency_key()
        if key is None:
            status, payload = _create(st, body)
            return _created_response(status, payload)
        # Keys are per principal (two agents may pick the same key); hashed so the stored key has a
        # fixed length whatever the token name and key length.
        scoped_key = hashlib.sha256(f"{g.principal.name}\0{key}".encode("utf-8")).hexdigest()
        request_hash = hashlib.sha256(
            json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        ).hexdigest()
        lock = st.idem_locks[hash(scoped_key) % len(st.idem_locks)]
        with lock:
            stored = st.memory.idempotency_get(scoped_key)
            if stored is not None:
                stored_hash, stored_status, stored_body = stored
                if stored_hash != request_hash:
                    raise Conflict("this Idempotency-Key was already used with a different request body",
                                   field="Idempotency-Key")
                payload = json.loads(stored_body) if isinstance(stored_body, (str, bytes)) else stored_body
                resp = _created_response(int(stored_status), payload)
                resp.headers["Idempotent-Replayed"] = "true"
                return resp
            status, payload = _create(st, body)
            st.memory.idempotency_put(scoped_key, request_hash, status,
                                      json.dumps(payload, separators=(",", ":")))
        return _created_response(status, payload)

    def _create(st: _State, body: Dict[str, Any]) -> Tuple[int, Dict[str, Any]]:
        if "items" in body:
            if set(body) != {"items"}:
                extra = sorted(set(body) - {"items"})[0]
                raise _bad(f"a batch body holds only 'items' (got {extra!r})", extra)
            items = body["items"]
            if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
                raise _bad("items must be a list of memory objects", "items")
            if not 1 <= len(items) <= MAX_BATCH_ITEMS:
                raise ApiError(422, "invalid_input", f"items must hold 1 to {MAX_BATCH_ITEMS} memories",
                               field="items")
            prepared = [_memory_kwargs(item, prefix=f"items[{i}].") for i, item in enumerate(items)]
            with st.governor.embedding():
                results = st.memory.remember_many(prepared)
            out = [_remember_result(r) for r in results]
            return (201 if any(r.get("created", True) for r in out) else 200), {"items": out}
        kwargs = _memory_kwargs(body)
        with st.governor.embedding():
            # remember_many, not remember: it also takes created_at (remember() has no such argument).
            result = st.memory.remember_many([kwargs])[0]
        payload = _remember_result(result)
        return (201 if payload.get("created", True) else 200), payload

    def _created_response(status: int, payload: Dict[str, Any]) -> Response:
        resp = jsonify(payload)
        resp.status_code = status
        if "id" in payload:
            resp.headers["Location"] = f"/v1/memories/{payload['id']}"
        return resp

    @bp.get("/memories")
    @requires("read")
    @query_params("collection", "limit", "cursor")
    def list_memories() -> Response:
        """Most recent first; ``cursor`` from the previous page's ``next_cursor``."""
        limit = _query_int("limit", 20, 1, MAX_LIST_LIMIT) or 20
        collection = _query_str("collection", max_len=200)
        cursor = _query_str("cursor", max_len=200)
        if cursor is not None and not re.fullmatch(r"[0-9]{1,18}", cursor):
            # Checked here as well: the engine's int() would pass a 30-digit cursor on to SQLite.
            raise ApiError(422, "invalid_input", "cursor is not one this service issued", field="cursor")
        page = _state().memory.recent(collection=collection or None, limit=limit, cursor=cursor or None)
        return jsonify({"items": [m.to_dict() for m in page.items], "next_cursor": page.next_cursor})

    @bp.get("/memories/<int:memory_id>")
    @requires("read")
    def get_memory(memory_id: int) -> Response:
        """One memory by id (404 if absent)."""
        _existing_id(memory_id)
        return jsonify(_state().memory.get(memory_id).to_dict())

    @bp.patch("/memories/<int:memory_id>")
    @requires("write")
    def update_memory(memory_id: int) -> Response:
        """Change some fields; omitted fields are kept. Changing ``text`` re-embeds it."""
        st = _state()
        _existing_id(memory_id)
        body = json_body()
        check_fields(body, _MEMORY_FIELDS)
        if not body:
            raise _bad("nothing to update: send at least one field")
        for name in ("source", "session_id"):
            if name in body and body[name] is None:
                raise _bad(f"{name} must be a non-empty string (omit it to keep the current value)", name)
        if "metadata" in body and body["metadata"] is None:
            body["metadata"] = {}
        if "tags" in body:
            body["tags"] = list(body["tags"])
        if "text" in body:
            with st.governor.embedding():
                record = st.memory.update(memory_id, **body)
        else:
            record = st.memory.update(memory_id, **body)
        return jsonify(record.to_dict())

    @bp.delete("/memories/<int:memory_id>")
    @requires("write")
    def delete_memory(memory_id: int) -> Response:
        """Delete one memory (404 if absent)."""
        _existing_id(memory_id)
        _state().memory.delete(memory_id)
        return Response(status=204)

    def _recall(st: _State, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        mode = kwargs.get("mode", "hybrid")
        if not _needs_model(mode) or mode not in ("hybrid", "vector"):
            return st.memory.recall(**kwargs).to_dict()  # keyword (or an invalid mode: engine says 422)
        try:
            with st.governor.embedding():
                return st.memory.recall(**kwargs).to_dict()
        except Busy as exc:
            if isinstance(exc, EmbedTimeout) or st.governor.state != "hard":
                raise
            # Under memory pressure recall is not shed but answered by keyword, like the engine does
            # when the model is missing: the agent still gets results, and the reason.
            result = st.memory.recall(**dict(kwargs, mode="keyword"))
            result.note = f"{mode} recall unavailable under memory pressure, answered by keyword"
            return result.to_dict()

    @bp.post("/recall")
    @requires("read")
    def recall_post() -> Response:
        """Recall by meaning and words: ``{"query", "topk", "mode", "filters"}``."""
        return jsonify(_recall(_state(), _recall_kwargs(json_body())))

    @bp.get("/recall")
    @requires("read")
    @query_params("q", "topk", "mode", "collection")
    def recall_get() -> Response:
        """Recall with query-string parameters ``q``, ``topk``, ``mode``, ``collection``."""
        q = _query_str("q", max_len=100_000)
        if q is None:
            raise _bad("missing query parameter 'q'", "q")
        kwargs: Dict[str, Any] = {"query": q}
        topk = _query_int("topk", None, 1, 100)  # the engine's bounds (architecture.md)
        if topk is not None:
            kwargs["topk"] = topk
        mode = _query_str("mode", max_len=20)
        if mode is not None:
            kwargs["mode"] = mode
        collection = _query_str("collection", max_len=200)
        if collection:
            kwargs["filters"] = {"collection": collection}
        return jsonify(_recall(_state(), kwargs))

    @bp.post("/recall/batch")
    @requires("read")
    def recall_batch() -> Response:
        """Several recalls in one request: ``{"queries": [recall, ...]}`` -> ``{"results": [...]}``."""
        st = _state()
        body = json_body()
        check_fields(body, {"queries": ("list[object]", False)}, required=("queries",))
        queries = body["queries"]
        if not 1 <= len(queries) <= MAX_BATCH_QUERIES:
            raise ApiError(422, "invalid_input", f"queries must hold 1 to {MAX_BATCH_QUERIES} recalls",
                           field="queries")
        prepared = [_recall_kwargs(q, prefix=f"queries[{i}].") for i, q in enumerate(queries)]
        if not any(_needs_model(q.get("mode", "hybrid")) for q in prepared):
            results = st.memory.recall_many(prepared)
        elif st.governor.state == "hard":
            pressure = [dict(q, mode="keyword") if q.get("mode", "hybrid") in ("hybrid", "vector") else q
                        for q in prepared]
            results = st.memory.recall_many(pressure)
            for q, r in zip(prepared, results):
                if q.get("mode", "hybrid") in ("hybrid", "vector"):
                    r.note = f"{q.get('mode', 'hybrid')} recall unavailable under memory pressure, " \
                             "answered by keyword"
        else:
            with st.governor.embedding():
                results = st.memory.recall_many(prepared)
        return jsonify({"results": [r.to_dict() for r in results]})

    @bp.get("/stats")
    @requires("read")
    def stats() -> Response:
        """Engine statistics plus the server's own (version, governor, uptime)."""
        st = _state()
        data = dict(st.memory.stats())
        data["server"] = {
            "version": __version__,
            "uptime_seconds": round(time.time() - st.metrics.started, 3),
            "auth": "tokens" if st.auth_enabled else "open",
            "governor": st.governor.stats(),
            "rate_limited": st.limiter.limited,
        }
        return jsonify(data)

    @bp.get("/export")
    @requires("read")
    def export() -> Response:
        """Every memory as NDJSON, streamed with bounded memory.

        ``Memory.iter_export`` reads the table in id-ordered batches, each in its own short read
        transaction, so a slow client never pins the WAL for the length of its download. (Fallback for
        an engine without it: spool ``export_jsonl`` to a temporary file, then stream that.)
        """
        st = _state()
        iter_export = getattr(st.memory, "iter_export", None)
        if callable(iter_export):
            lines = iter(iter_export())
            try:  # start it now so an error before the first line still gets a JSON error response
                first = next(lines, None)
            except BaseException:
                close = getattr(lines, "close", None)
                if callable(close):
                    close()
                raise

            def chunks() -> Iterator[bytes]:
                buf: List[bytes] = []
                size = 0
                try:
                    for line in (itertools.chain([first], lines) if first is not None else ()):
                        data = line.encode("utf-8") if isinstance(line, str) else line
                        buf.append(data)
                        size += len(data)
                        if size >= 64 * 1024:  # fewer, larger writes: each is a syscall on a slow core
                            yield b"".join(buf)
                            buf, size = [], 0
                    if buf:
                        yield b"".join(buf)
                finally:
                    close = getattr(lines, "close", None)
                    if callable(close):
                        close()
        else:
            spool = tempfile.SpooledTemporaryFile(max_size=1024 * 1024)
            try:
                st.memory.export_jsonl(_BytesOrTextWriter(spool))  # type: ignore[arg-type]
                spool.seek(0)
            except BaseException:
                spool.close()
                raise

            def chunks() -> Iterator[bytes]:
                try:
                    while True:
                        block = spool.read(64 * 1024)
                        if not block:
                            return
                        yield block
                finally:
                    spool.close()

        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        return Response(chunks(), mimetype="application/x-ndjson", headers={
            "Content-Disposition": f'attachment; filename="memento-export-{stamp}.ndjson"'})

    @bp.post("/import")
    @requires("write")
    def import_() -> Response:
        """NDJSON body (one memory object per line, as ``/v1/export`` writes). Bounded by max_body_bytes."""
        st = _state()
        _require_media_type(NDJSON_TYPES, "NDJSON, one JSON object per line")
        raw = _raw_body()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _bad("body is not valid UTF-8", code="invalid_json") from None
        if "\x00" in text:
            raise _bad("body must not contain NUL characters", code="invalid_json")
        for lineno, line in enumerate(text.splitlines(), 1):  # syntax-check before touching the DB
            if line.strip():
                try:
                    obj = json.loads(line, parse_constant=_reject_constant, parse_float=_finite_float)
                except (ValueError, RecursionError):
                    raise _bad(f"line {lineno}: malformed JSON", f"line {lineno}",
                               code="invalid_json") from None
                if not isinstance(obj, dict):
                    raise _bad(f"line {lineno}: each line must be a JSON object", f"line {lineno}",
                               code="invalid_json")
                _check_json_values(obj)
        with st.governor.embedding():
            result = st.memory.import_jsonl(io.StringIO(text))
        return jsonify(result.to_dict())

    @bp.post("/backup")
    @requires("admin")
    def backup() -> Response:
        """Online backup into ``<home>/backups/`` (the path is chosen by the server, never the client)."""
        st = _state()
        body = json_body(required=False)
        check_fields(body, {})
        dest_dir = st.settings.home_path / "backups"
        dest_dir.mkdir(parents=True, exist_ok=True)
        # No RTC on the board: the clock may be wrong, so a random suffix keeps names unique anyway.
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        dest = dest_dir / f"memento-{stamp}-{secrets.token_hex(3)}.db"
        path = Path(st.memory.backup(dest))
        resp = jsonify({"path": str(path), "bytes": path.stat().st_size if path.exists() else None})
        resp.status_code = 201
        return resp

    return bp


class _BytesOrTextWriter:
    """File adapter for the export: accepts ``str`` or ``bytes`` writes, stores UTF-8 bytes."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw

    def write(self, data: Any) -> int:
        if isinstance(data, str):
            data = data.encode("utf-8")
        self._raw.write(data)
        return len(data)

    def flush(self) -> None:
        self._raw.flush()

    def writable(self) -> bool:
        return True


# ------------------------------------------------------------------------------------------------
# app-level routes and hooks
# ------------------------------------------------------------------------------------------------
_PLACEHOLDER_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>memento-edge</title>
</head><body><h1>memento-edge</h1><p>The web page is not installed; the JSON API is at <code>/v1</code>
(see <a href="/openapi.json">/openapi.json</a>).</p></body></html>"""

_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


def _register_app_routes(app: Flask) -> None:
    @app.get("/")
    @requires(None)
    def index() -> Response:
        """The LAN page (``templates/index.html``); it asks for the token and sends it in a header."""
        from flask import render_template
        from jinja2 import TemplateNotFound

        try:
            html = render_template("index.html", version=__version__, auth_required=_state().auth_enabled)
        except TemplateNotFound:
            html = _PLACEHOLDER_PAGE
        return Response(html, mimetype="text/html")

    @app.get("/healthz")
    @requires(None)
    def healthz() -> Response:
        """Liveness: the process answers. No auth, no database access."""
        return jsonify({"status": "ok", "version": __version__})

    @app.get("/readyz")
    @requires(None)
    def readyz() -> Response:
        """Readiness: database writable (503 if not), model state and active embedding backend."""
        st = _state()
        body = _readiness(st)
        resp = jsonify(body)
        if not body["ready"]:
            resp.status_code = 503
            resp.headers.update(_retry_after(5))
        return resp

    @app.get("/metrics")
    @requires("read")
    def metrics() -> Response:
        """Prometheus text exposition format 0.0.4."""
        st = _state()
        text = st.metrics.render(_extra_metrics(st))
        return Response(text, mimetype="text/plain", content_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/openapi.json")
    @requires(None)
    def openapi() -> Response:
        """The OpenAPI 3 description of this API."""
        st = _state()
        if st.openapi_doc is None:  # built once per app: it never changes while the app runs
            from .openapi import build_openapi

            st.openapi_doc = build_openapi(__version__)
        return jsonify(st.openapi_doc)


def _readiness(st: _State) -> Dict[str, Any]:
    mem = st.memory
    db_ok, db_error = True, None
    probe = getattr(mem, "ready", None) or getattr(mem, "health", None)
    try:
        if callable(probe):
            info = probe()
            if isinstance(info, dict) and info.get("db_writable") is False:
                db_ok, db_error = False, str(info.get("error") or "database not writable")
        else:
            # Fallback until the engine offers a probe: the DB answers and its file/dir are writable.
            import os

            mem.count()
            db_path = st.settings.db_path
            target = db_path if db_path.exists() else db_path.parent
            if not os.access(str(target), os.W_OK) or not os.access(str(db_path.parent), os.W_OK):
                db_ok, db_error = False, "database file or directory is not writable"
    except MementoError as exc:
        db_ok, db_error = False, exc.message
    except Exception as exc:  # readiness must answer, whatever broke
        db_ok, db_error = False, f"{type(exc).__name__}"
    model = _model_state(mem)
    body: Dict[str, Any] = {"ready": db_ok, "db": {"writable": db_ok}, "model": model,
                            "governor": st.governor.state}
    if db_error:
        body["db"]["error"] = db_error
    return body


def _model_state(mem: Any) -> Dict[str, Any]:
    emb = _embedder_of(mem)
    if emb is None:
        return {"state": "unknown", "loaded": False, "backend": None}
    backend = getattr(emb, "backend", None)
    loaded = bool(getattr(emb, "loaded", False))
    if loaded:
        return {"state": "loaded", "loaded": True, "backend": backend}
    try:
        _ = emb.fingerprint  # reads manifest.json only: tells "missing" from "not loaded yet"
    except ModelUnavailable as exc:
        return {"state": "missing", "loaded": False, "backend": backend, "error": exc.message}
    except Exception as exc:
        return {"state": "error", "loaded": False, "backend": backend, "error": type(exc).__name__}
    return {"state": "unloaded", "loaded": False, "backend": backend}


def _extra_metrics(st: _State) -> List[Tuple[str, str, str, List[Tuple[Dict[str, str], float]]]]:
    fams: List[Tuple[str, str, str, List[Tuple[Dict[str, str], float]]]] = []
    gov = st.governor.stats()
    rss = gov["rss_bytes"] if gov["rss_bytes"] is not None else read_rss_bytes()
    if rss is not None:
        fams.append(("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.",
                     [({}, rss)]))
    fams.append(("memento_rss_limit_bytes", "gauge", "Memory governor ceiling (0 = off).",
                 [({}, gov["rss_limit_bytes"])]))
    fams.append(("memento_governor_state", "gauge", "Memory governor state (1 for the current one).",
                 [({"state": s}, 1 if gov["state"] == s else 0) for s in ("ok", "soft", "hard")]))
    fams.append(("memento_shed_requests_total", "counter", "Requests refused under memory pressure.",
                 [({}, gov["shed_requests"])]))
    fams.append(("memento_rate_limited_total", "counter", "Requests refused by the rate limiter.",
                 [({}, st.limiter.limited)]))
    fams.append(("memento_build_info", "gauge", "Version of memento-edge.", [({"version": __version__}, 1)]))
    try:
        count = st.memory.count()
        fams.append(("memento_memories", "gauge", "Memories stored.", [({}, count)]))
    except Exception:
        log.warning("metrics: cannot count memories", exc_info=True)
    emb = _embedder_of(st.memory)
    if emb is not None:
        try:
            es = emb.stats() or {}
        except Exception:
            es = {}
        backend = str(es.get("backend") or getattr(emb, "backend", "unknown"))
        fams.append(("memento_model_loaded", "gauge", "1 if the embedding model is loaded.",
                     [({"backend": backend}, 1 if es.get("loaded", getattr(emb, "loaded", False)) else 0)]))
        cache = es.get("cache") or {}
        for key, name, kind, help_text in (
                ("hits", "memento_embed_cache_hits_total", "counter", "Embedding cache hits."),
                ("misses", "memento_embed_cache_misses_total", "counter", "Embedding cache misses."),
                ("entries", "memento_embed_cache_entries", "gauge", "Embedding cache entries."),
                ("bytes", "memento_embed_cache_bytes", "gauge", "Embedding cache size in bytes.")):
            if isinstance(cache.get(key), (int, float)):
                fams.append((name, kind, help_text, [({}, cache[key])]))
        count_v = es.get("embed_count")
        total_ms = es.get("embed_ms_total", es.get("total_embed_ms"))
        if isinstance(count_v, (int, float)) and isinstance(total_ms, (int, float)):
            # A summary with only _sum and _count (no quantiles): rate(sum)/rate(count) = mean latency.
            fams.append(("memento_embed_seconds", "summary", "Time spent in model inference.",
                        [({"__suffix": "_sum"}, total_ms / 1000.0), ({"__suffix": "_count"}, count_v)]))
        elif isinstance(count_v, (int, float)):
            fams.append(("memento_embeds_total", "counter", "Texts embedded by the model.", [({}, count_v)]))
        last_ms = es.get("last_embed_ms")
        if isinstance(last_ms, (int, float)):
            fams.append(("memento_embed_last_seconds", "gauge", "Duration of the latest inference.",
                         [({}, last_ms / 1000.0)]))
    return fams


def _client_address() -> str:
    return request.remote_addr or "unknown"


def _register_hooks(app: Flask) -> None:
    @app.before_request
    def _before() -> Optional[Response]:
        g.t0 = time.perf_counter()
        g.principal = ANONYMOUS
        st = _state()
        view = app.view_functions.get(request.endpoint) if request.endpoint else None
        if view is None or request.endpoint == "static":
            return None  # 404/405 and static files: nothing to protect
        scope = getattr(view, "required_scope", None)
        if st.check_host and not _host_is_loopback(request.host):
            raise ApiError(403, "forbidden", "this service has no token configured and answers only to "
                           "localhost host names (DNS-rebinding protection)")
        if scope is None:
            return None  # public: health, readiness, page, schema
        principal: Optional[Principal] = ANONYMOUS
        token = None
        if st.auth_enabled:
            token = bearer_token(request.headers.get("Authorization"))
            principal = st.tokens.verify(token) if token else None
        # Rate limit before rejecting bad tokens too, so token guessing is throttled per address.
        wait = st.limiter.hit(f"token:{principal.name}" if principal and st.auth_enabled
                              else f"addr:{_client_address()}")
        if wait:
            raise ApiError(429, "rate_limited", "too many requests; slow down", headers=_retry_after(wait))
        if principal is None:
            raise ApiError(401, "unauthorized",
                           "missing bearer token" if not token else "invalid token",
                           headers={"WWW-Authenticate": 'Bearer realm="memento-edge"'})
        if not principal.allows(scope):
            raise ApiError(403, "forbidden", f"token {principal.name!r} lacks the {scope!r} scope")
        g.principal = principal
        if request.blueprint == "v1":
            allowed: FrozenSet[str] = getattr(view, "query_params", frozenset())
            for name in request.args:
                if name not in allowed:
                    raise _bad(f"unknown query parameter {name!r}", name)
        return None

    @app.after_request
    def _after(resp: Response) -> Response:
        st = _state()
        elapsed = time.perf_counter() - g.get("t0", time.perf_counter())
        rule = route_template(request.url_rule.rule) if request.url_rule is not None else "unmatched"
        st.metrics.observe(rule, request.method, resp.status_code, elapsed)
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("Cache-Control", "no-store")
        if resp.mimetype == "text/html":
            resp.headers.setdefault("Content-Security-Policy", _CSP)
            resp.headers.setdefault("X-Frame-Options", "DENY")
            resp.headers.setdefault("Referrer-Policy", "no-referrer")
        # The path only (never the query string, which may hold search text) and the token's *name*.
        access_log.info("%s %s %s %d %.1fms %s", _client_address(), request.method, request.path,
                        resp.status_code, elapsed * 1000, g.get("principal", ANONYMOUS).name)
        return resp


_CONVERTER_RE = re.compile(r"<(?:[^:<>]+:)?([^:<>]+)>")


def route_template(rule: str) -> str:
    """A Werkzeug rule as an OpenAPI path: ``/v1/memories/<int:memory_id>`` -> ``.../{memory_id}``."""
    return _CONVERTER_RE.sub(r"{\1}", rule)


def _host_is_loopback(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.startswith("[") else host
    if name.startswith("[") and "]" in name:
        name = name[1:name.index("]")]
    return is_loopback(name)


# ------------------------------------------------------------------------------------------------
# factory and server
# ------------------------------------------------------------------------------------------------
def create_app(settings: "Settings", memory: Optional["Memory"] = None) -> Flask:
    """Build the Flask app around ``memory`` (opened from ``settings`` if not given).

    Raises :class:`InvalidInput` for malformed token entries in the settings. The bind policy
    (refusing a non-loopback address without a token) is applied by :func:`serve`.
    """
    if memory is None:
        from .memory import Memory

        memory = Memory(settings)
    app = Flask("memento_edge")
    app.config["MAX_CONTENT_LENGTH"] = int(settings.max_body_bytes)
    app.config["JSON_SORT_KEYS"] = False
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.json.ensure_ascii = False  # type: ignore[attr-defined]
    app.extensions[EXT] = _State(settings, memory)
    _register_error_handlers(app)
    _register_hooks(app)
    _register_app_routes(app)
    app.register_blueprint(_make_v1())
    return app


def serve(settings: "Settings", memory: Optional["Memory"] = None) -> None:
    """Run the service on Waitress until SIGINT/SIGTERM; close the database on the way out.

    Raises :class:`InvalidInput` before binding when the address/token combination is unsafe (see
    :func:`memento_edge.auth.check_bind`). Also starts the governor's background tick (RSS check, idle
    model unload) and, with ``settings.warmup``, loads the model in a background thread.

    Waitress itself refuses bodies more than 1 KiB over ``max_body_bytes`` (a plain-text 413) before
    buffering them, so an oversized upload costs neither memory nor SD-card writes; bodies just over
    the cap reach the app and get the JSON 413.
    """
    from waitress.server import create_server

    mode = check_bind(settings)
    from .embedder import tune_malloc

    tune_malloc()  # before the worker threads and the model allocate anything
    own_memory = memory is None
    app = create_app(settings, memory)
    st: _State = app.extensions[EXT]
    server = create_server(
        app, host=settings.host, port=settings.port, threads=settings.threads,
        connection_limit=settings.connection_limit, channel_timeout=settings.channel_timeout,
        max_request_body_size=int(settings.max_body_bytes) + 1024, ident="memento-edge",
        clear_untrusted_proxy_headers=True)
    if mode == "tokens":
        log.info("memento-edge %s serving on http://%s:%s (%d API token(s) configured)", __version__,
                 settings.host, settings.port, len(st.tokens))
    elif mode == "loopback-open":
        log.warning("memento-edge %s serving on http://%s:%s WITHOUT authentication: no API token is "
                    "configured, so only this machine (loopback) can connect. Create a token with "
                    "`memento-edge token create` to serve the LAN.", __version__, settings.host,
                    settings.port)
    else:
        log.warning("memento-edge %s serving on http://%s:%s WITHOUT authentication (insecure_no_auth)",
                    __version__, settings.host, settings.port)
    stop_governor = st.governor.start_background()
    if settings.warmup:
        emb = _embedder_of(st.memory)
        if emb is not None:
            threading.Thread(target=_warmup, args=(emb,), name="memento-warmup", daemon=True).start()

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
            close = getattr(st.memory, "close", None)
            if callable(close):
                close()


def _warmup(embedder: Any) -> None:
    try:
        embedder.load()
        log.info("model loaded (warmup)")
    except Exception as exc:  # the service still works: recall degrades to keyword search
        log.warning("model warmup failed: %s", exc)
