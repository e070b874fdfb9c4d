"""Errors at the HTTP edge: the one JSON error shape, and domain errors translated to status codes.

The engine raises :class:`~memento_edge.errors.MementoError` subclasses; the web layer itself raises
:class:`ApiError` for HTTP-level problems (malformed JSON, media type, auth, rate limit). Both end up as::

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
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, Optional, Tuple

from flask import Flask, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException

from ..errors import (Busy, Conflict, InvalidInput, MementoError, ModelMismatch, ModelUnavailable, NotFound,
                      StorageFull, StoreError)

log = logging.getLogger("memento_edge.web")

MODEL_RETRY_AFTER = 30  # seconds: a missing model will not come back by itself, don't invite a retry storm


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


def bad(message: str, field: Optional[str] = None, code: str = "invalid_input") -> ApiError:
    """A 400: the request is not well-formed."""
    return ApiError(400, code, message, field=field)


def unprocessable(message: str, field: Optional[str] = None) -> ApiError:
    """A 422: well-formed, but outside a limit."""
    return ApiError(422, "invalid_input", message, field=field)


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


def retry_after(seconds: float) -> Dict[str, str]:
    """The Retry-After header for a wait of ``seconds`` (at least 1 s, whole seconds)."""
    return {"Retry-After": str(max(1, int(math.ceil(seconds))))}


def map_domain_error(exc: MementoError) -> Tuple[int, Dict[str, str]]:
    """HTTP status and extra headers for an engine error."""
    if isinstance(exc, InvalidInput):
        return 422, {}
    if isinstance(exc, NotFound):
        return 404, {}
    if isinstance(exc, Conflict):
        return 409, {}
    if isinstance(exc, Busy):  # includes EmbedTimeout
        return 503, retry_after(exc.retry_after)
    if isinstance(exc, StorageFull):
        return 507, {}
    if isinstance(exc, ModelUnavailable):
        return 503, retry_after(MODEL_RETRY_AFTER)
    if isinstance(exc, ModelMismatch):
        return 503, {}
    if isinstance(exc, StoreError):
        return 503, retry_after(MODEL_RETRY_AFTER)
    return 500, {}


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 406: "not_acceptable", 408: "request_timeout",
               411: "length_required", 413: "payload_too_large", 414: "uri_too_long",
               415: "unsupported_media_type", 416: "range_not_satisfiable", 429: "rate_limited",
               431: "headers_too_large", 501: "not_implemented"}


def _api_error(exc: ApiError) -> Response:
    return error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)


def _domain_error(exc: MementoError) -> Response:
    status, headers = map_domain_error(exc)
    if status >= 500 and not isinstance(exc, (Busy, ModelUnavailable)):
        log.warning("request failed: %s: %s", type(exc).__name__, exc.message)
    return error_response(status, exc.code, exc.message, exc.field, headers)


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
        value = exc.get_response().headers.get(key)
        if value:
            resp.headers[key] = value
    return resp


def _unexpected(exc: Exception) -> Response:
    if isinstance(exc, HTTPException):  # pragma: no cover - handled above
        return _http_error(exc)
    log.exception("unhandled error on %s %s", request.method, request.path)
    return error_response(500, "internal", "internal server error (see the service log)")


def register_error_handlers(app: Flask) -> None:
    """Route every exception a view can raise to its JSON error response."""
    app.register_error_handler(ApiError, _api_error)
    app.register_error_handler(MementoError, _domain_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)
