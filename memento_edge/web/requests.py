"""Reading a request: the JSON body, NDJSON lines, query parameters and headers, checked field by field.

Types and unknown fields are checked here against the tables of :mod:`memento_edge.schema` (400 when
wrong); values are range-checked by the engine (422). A few values the engine would store but could not
serve back (created_at outside 1970..9999, integers beyond 64 bits) are refused here too.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any, Dict, Optional, Tuple

from flask import current_app, request
from werkzeug.exceptions import RequestEntityTooLarge

from ..errors import NotFound
from ..schema import INT64_MAX, MAX_IDEMPOTENCY_KEY, check_wire_values
from .errors import ApiError, bad, unprocessable

# No text/plain: a browser sends that cross-site without a preflight (see crosssite.py).
NDJSON_TYPES = ("application/x-ndjson", "application/ndjson", "application/jsonl", "application/x-jsonlines",
                "application/json-lines")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number out of range: {text[:40]}")
    return value


def loads(text: Any) -> Any:
    """Strict JSON: no NaN/Infinity, no float overflow. Raises ValueError (or RecursionError)."""
    return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)


def check_json_values(obj: Any) -> None:
    """:func:`memento_edge.schema.check_wire_values` on a body: malformed values are a 400, a created_at out of
    range a 422 (InvalidInput, translated by the error handlers)."""
    check_wire_values(obj, malformed=bad)


def require_media_type(allowed: Tuple[str, ...], what: str) -> None:
    """415 unless the request's Content-Type is one of ``allowed`` (any ``+json`` counts as JSON), utf-8."""
    mimetype = request.mimetype
    ok = mimetype in allowed or ("application/json" in allowed and mimetype.startswith("application/")
                                 and mimetype.endswith("+json"))
    if not ok:
        raise ApiError(415, "unsupported_media_type",
                       f"Content-Type must be {allowed[0]} ({what}); got {mimetype or 'none'!r}")
    charset = request.mimetype_params.get("charset")
    if charset and charset.lower().replace("_", "-") not in ("utf-8", "utf8"):
        raise ApiError(415, "unsupported_media_type", "only the utf-8 charset is accepted")


def raw_body() -> bytes:
    """The body bytes; 413 above MAX_CONTENT_LENGTH (also for chunked bodies)."""
    # Werkzeug >= 2.3's get_data enforces MAX_CONTENT_LENGTH itself; Werkzeug 2.2 (Debian bookworm's, which
    # the Pi Zero W image and Raspberry Pi OS run) does not, hence the explicit checks.
    limit = current_app.config.get("MAX_CONTENT_LENGTH")
    if limit is not None and (request.content_length or 0) > limit:
        raise RequestEntityTooLarge()
    # Not cached on the request: a 2 MiB batch would otherwise keep its raw bytes for as long as its
    # texts are embedded, next to the parsed copy. Every route reads its body once, through here.
    data = request.get_data(cache=False)
    if limit is not None and len(data) > limit:
        raise RequestEntityTooLarge()
    return data


def json_body(*, required: bool = True) -> Dict[str, Any]:
    """The request's JSON object body, or ``{}`` when optional and absent. Raises ApiError 400/413/415."""
    raw = raw_body() if (request.content_length or request.headers.get("Transfer-Encoding")) else b""
    if not raw:
        if required:
            if request.mimetype and request.mimetype != "application/json":
                require_media_type(("application/json",), "a JSON object")
            raise bad("request body must be a JSON object")
        return {}
    require_media_type(("application/json",), "a JSON object")
    try:
        obj = loads(raw)
    except RecursionError:
        raise bad("JSON nested too deeply", code="invalid_json") from None
    except ValueError as exc:  # includes UnicodeDecodeError and json.JSONDecodeError
        raise bad(f"malformed JSON: {str(exc)[:200]}", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise bad("request body must be a JSON object", code="invalid_json")
    check_json_values(obj)
    return obj


def ndjson_body() -> str:
    """The request's NDJSON body as text, every line syntax-checked before anything touches the DB."""
    require_media_type(NDJSON_TYPES, "NDJSON, one JSON object per line")
    try:
        text = raw_body().decode("utf-8")
    except UnicodeDecodeError:
        raise bad("body is not valid UTF-8", code="invalid_json") from None
    if "\x00" in text:
        raise bad("body must not contain NUL characters", code="invalid_json")
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                obj = loads(line)
            except (ValueError, RecursionError):
                raise bad(f"line {lineno}: malformed JSON", f"line {lineno}", code="invalid_json") from None
            if not isinstance(obj, dict):
                raise bad(f"line {lineno}: each line must be a JSON object", f"line {lineno}",
                          code="invalid_json")
            check_json_values(obj)
    return text


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
    """Check ``obj``'s keys and JSON types against ``spec`` (``schema.wire_types``); unknown or
    mistyped fields -> 400. Values are not range-checked here: that is the engine's job (and gives 422).
    """
    for name in obj:
        if name not in spec:
            raise bad(f"unknown field {name!r}", prefix + name)
    for name in required:
        if name not in obj:
            raise bad(f"missing required field {name!r}", prefix + name)
    for name, value in obj.items():
        kind, nullable = spec[name]
        if value is None:
            if not nullable:
                raise bad(f"{name} must not be null", prefix + name)
            continue
        if not _type_ok(value, kind):
            raise bad(f"{name} must be {_TYPE_NAMES[kind]}", prefix + name)
    return obj


def query_int(name: str, default: Optional[int], lo: int, hi: int) -> Optional[int]:
    """Integer query parameter ``name``: 400 when not an integer, 422 outside ``lo..hi``."""
    raw = request.args.get(name)
    if raw is None:
        return default
    if not re.fullmatch(r"[+-]?[0-9]{1,19}", raw.strip()):
        raise bad(f"{name} must be an integer", name)
    value = int(raw)
    if not lo <= value <= hi:
        raise unprocessable(f"{name} must be between {lo} and {hi}", name)
    return value


def query_number(name: str, lo: float, hi: float) -> Optional[float]:
    """Number query parameter ``name``: 400 when not a finite number, 422 outside ``lo..hi``."""
    raw = request.args.get(name)
    if raw is None:
        return None
    try:
        value = float(raw) if len(raw) <= 40 else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise bad(f"{name} must be a number", name)
    if not lo <= value <= hi:
        raise unprocessable(f"{name} must be between {lo:g} and {hi:g}", name)
    return value


def query_str(name: str, *, max_len: int = 1000) -> Optional[str]:
    """String query parameter ``name``: 400 with a NUL, 422 over ``max_len`` characters."""
    raw = request.args.get(name)
    if raw is None:
        return None
    if "\x00" in raw:
        raise bad(f"{name} must not contain NUL characters", name)
    if len(raw) > max_len:
        raise unprocessable(f"{name} is longer than {max_len} characters", name)
    return raw


def existing_id(memory_id: int) -> int:
    """``memory_id`` if it can exist. Ids are 1..2**63-1 (SQLite rowids): anything else is a 404.

    Checked here rather than with int(max=...) in the rule, because a converter that refuses a value
    makes Werkzeug answer 405.
    """
    if not 1 <= memory_id <= INT64_MAX:
        raise NotFound(f"no memory with id {memory_id}", field="id")
    return memory_id


def idempotency_key() -> Optional[str]:
    """The Idempotency-Key header, or None; 400 unless 1..200 printable ASCII characters."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY or not all(33 <= ord(c) <= 126 for c in key):
        raise bad(f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} printable ASCII characters "
                  "without spaces", "Idempotency-Key")
    return key
