"""The REST API, version 1: one module-level Blueprint; each view parses, makes one call, responds.

Every route is a thin translation between JSON and :class:`memento_edge.memory.Memory`; the engine does
the validation of values (text and query length, topk, importance, filters) and raises domain errors
that :mod:`.errors` maps onto the one JSON error shape.
"""
from __future__ import annotations

import io
import itertools
import re
import secrets
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Tuple

from flask import Blueprint, Response, g, jsonify, request

from .. import __version__
from ..errors import Busy
from ..governor import malloc_trim
from ..schema import (CREATE_FIELDS, DEFAULT_LIST_LIMIT, FILTER_FIELDS, MAX_BATCH_ITEMS, MAX_BATCH_QUERIES,
                      MAX_CURSOR_DIGITS, MAX_LIST_LIMIT, MAX_NAME_CHARS, MAX_SCORE, MAX_TEXT_CHARS, MAX_TOPK,
                      MEMORY_FIELDS, MIN_SCORE, RECALL_FIELDS, wire_types)
from .access import query_params, requires
from .errors import bad, unprocessable
from .requests import (check_fields, existing_id, idempotency_key, json_body, ndjson_body, query_int,
                       query_number, query_str)
from .state import AppState, state

bp = Blueprint("v1", __name__, url_prefix="/v1")

_MEMORY_TYPES = wire_types(MEMORY_FIELDS)
_CREATE_TYPES = wire_types(CREATE_FIELDS)
_RECALL_TYPES = wire_types(RECALL_FIELDS)
_FILTER_TYPES = wire_types(FILTER_FIELDS)


# --- memories ---------------------------------------------------------------------------------------
@bp.post("/memories")
@requires("write")
def create_memories() -> Response:
    """One memory (``{"text": ...}``) or a batch (``{"items": [...]}``); honours Idempotency-Key."""
    service = state().service
    with _large_write_slot(state()):
        body = json_body()
        key = idempotency_key()
        items, batch = _create_items(body)
        if key is None:
            created = service.remember(items, batch=batch)
        else:
            created = service.remember_once(items, batch=batch, key=key, request=body, owner=g.principal.name)
    resp = jsonify(created.payload)
    resp.status_code = 201 if created.created else 200
    if "id" in created.payload:
        resp.headers["Location"] = f"/v1/memories/{created.payload['id']}"
    if created.replayed:
        resp.headers["Idempotent-Replayed"] = "true"
    return resp


# Write bodies above this size are handled one at a time, and refused *before they are read and parsed*
# while another is in progress, the embedding budget is mostly taken or memory is critically high:
# parsing four 8 MB batches at once cost ~100 MB of RSS.
LARGE_BODY_BYTES = 64 * 1024


@contextmanager
def _large_write_slot(st: AppState) -> Iterator[None]:
    if (request.content_length or 0) <= LARGE_BODY_BYTES:
        yield
        return
    # No waiting: a shed request must not hold one of the few worker threads recall needs.
    if st.memory.work.saturated() or not st.large_writes.acquire(blocking=False):
        raise Busy("the server is busy with another large write; retry shortly", retry_after=5.0)
    try:
        st.governor.admit_embedding()
        yield
    finally:
        st.large_writes.release()
        # glibc keeps the freed megabytes of the body and its parse in the heap (its mmap threshold
        # adapts upwards); hand them back so a few large writes do not leave the RSS ~50 MB higher.
        malloc_trim()


def _memory_kwargs(obj: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    check_fields(obj, _CREATE_TYPES, required=("text",), prefix=prefix)
    kwargs = dict(obj)
    if "tags" in kwargs:
        kwargs["tags"] = tuple(kwargs["tags"])
    return kwargs


def _create_items(body: Dict[str, Any]) -> Tuple[List[Dict[str, Any]], bool]:
    """The memories of a create body and whether it is a batch; 400/422 for a malformed one."""
    if "items" not in body:
        return [_memory_kwargs(body)], False
    if set(body) != {"items"}:
        extra = sorted(set(body) - {"items"})[0]
        raise bad(f"a batch body holds only 'items' (got {extra!r})", extra)
    items = body["items"]
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise bad("items must be a list of memory objects", "items")
    if not 1 <= len(items) <= MAX_BATCH_ITEMS:
        raise unprocessable(f"items must hold 1 to {MAX_BATCH_ITEMS} memories", "items")
    return [_memory_kwargs(item, prefix=f"items[{i}].") for i, item in enumerate(items)], True


@bp.get("/memories")
@requires("read")
@query_params("collection", "limit", "cursor")
def list_memories() -> Response:
    """Most recent first; ``cursor`` from the previous page's ``next_cursor``."""
    limit = query_int("limit", DEFAULT_LIST_LIMIT, 1, MAX_LIST_LIMIT) or DEFAULT_LIST_LIMIT
    collection = query_str("collection", max_len=MAX_NAME_CHARS)
    cursor = query_str("cursor", max_len=MAX_NAME_CHARS)
    if cursor is not None and not re.fullmatch(f"[0-9]{{1,{MAX_CURSOR_DIGITS}}}", cursor):
        # Checked here as well: the engine's int() would pass a 30-digit cursor on to SQLite.
        raise unprocessable("cursor is not one this service issued", "cursor")
    page = state().memory.recent(collection=collection or None, limit=limit, cursor=cursor or None)
    return jsonify(page.to_dict())


@bp.get("/memories/<int:memory_id>")
@requires("read")
def get_memory(memory_id: int) -> Response:
    """One memory by id (404 if absent)."""
    return jsonify(state().memory.get(existing_id(memory_id)).to_dict())


@bp.patch("/memories/<int:memory_id>")
@requires("write")
def update_memory(memory_id: int) -> Response:
    """Change some fields; omitted fields are kept. Changing ``text`` re-embeds it."""
    existing_id(memory_id)
    return jsonify(state().service.update(memory_id, **_patch_kwargs(json_body())).to_dict())


def _patch_kwargs(body: Dict[str, Any]) -> Dict[str, Any]:
    check_fields(body, _MEMORY_TYPES)
    if not body:
        raise bad("nothing to update: send at least one field")
    for name in ("source", "session_id"):
        if name in body and body[name] is None:
            raise bad(f"{name} must be a non-empty string (omit it to keep the current value)", name)
    if "metadata" in body and body["metadata"] is None:
        body["metadata"] = {}
    if "tags" in body:
        body["tags"] = list(body["tags"])
    return body


@bp.delete("/memories/<int:memory_id>")
@requires("write")
def delete_memory(memory_id: int) -> Response:
    """Delete one memory (404 if absent)."""
    state().memory.delete(existing_id(memory_id))
    return Response(status=204)


# --- recall -----------------------------------------------------------------------------------------
def _recall_kwargs(obj: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    check_fields(obj, _RECALL_TYPES, required=("query",), prefix=prefix)
    kwargs = dict(obj)
    if kwargs.get("filters") is not None:
        check_fields(kwargs["filters"], _FILTER_TYPES, prefix=prefix + "filters.")
    else:
        kwargs.pop("filters", None)
    return kwargs


@bp.post("/recall")
@requires("read")
def recall_post() -> Response:
    """Recall by meaning and words: ``{"query", "topk", "mode", "filters"}``."""
    return jsonify(state().service.recall(**_recall_kwargs(json_body())).to_dict())


@bp.get("/recall")
@requires("read")
@query_params("q", "topk", "mode", "collection", "min_score")
def recall_get() -> Response:
    """Recall with query-string parameters ``q``, ``topk``, ``mode``, ``collection``, ``min_score``."""
    q = query_str("q", max_len=MAX_TEXT_CHARS)  # a cheap bound; the engine applies the query limit
    if q is None:
        raise bad("missing query parameter 'q'", "q")
    kwargs: Dict[str, Any] = {"query": q}
    topk = query_int("topk", None, 1, MAX_TOPK)
    if topk is not None:
        kwargs["topk"] = topk
    mode = query_str("mode", max_len=20)
    if mode is not None:
        kwargs["mode"] = mode
    collection = query_str("collection", max_len=MAX_NAME_CHARS)
    if collection:
        kwargs["filters"] = {"collection": collection}
    min_score = query_number("min_score", MIN_SCORE, MAX_SCORE)
    if min_score is not None:
        kwargs["min_score"] = min_score
    return jsonify(state().service.recall(**kwargs).to_dict())


@bp.post("/recall/batch")
@requires("read")
def recall_batch() -> Response:
    """Several recalls in one request: ``{"queries": [recall, ...]}`` -> ``{"results": [...]}``."""
    body = json_body()
    check_fields(body, {"queries": ("list[object]", False)}, required=("queries",))
    queries = body["queries"]
    if not 1 <= len(queries) <= MAX_BATCH_QUERIES:
        raise unprocessable(f"queries must hold 1 to {MAX_BATCH_QUERIES} recalls", "queries")
    prepared = [_recall_kwargs(q, prefix=f"queries[{i}].") for i, q in enumerate(queries)]
    return jsonify({"results": [r.to_dict() for r in state().service.recall_many(prepared)]})


# --- the whole database -----------------------------------------------------------------------------
@bp.get("/stats")
@requires("read")
def stats() -> Response:
    """Engine statistics plus the server's own (version, governor, uptime)."""
    st = state()
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
    transaction, so a slow client never pins the WAL for the length of its download.
    """
    lines = iter(state().memory.iter_export())
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return Response(_chunks(lines), mimetype="application/x-ndjson", headers={
        "Content-Disposition": f'attachment; filename="memento-export-{stamp}.ndjson"'})


def _chunks(lines: Iterator[str]) -> Iterable[bytes]:
    try:  # start it now so an error before the first line still gets a JSON error response
        first = next(lines, None)
    except BaseException:
        _close(lines)
        raise
    return _joined(itertools.chain([first], lines) if first is not None else iter(()), lines)


def _joined(lines: Iterator[str], source: Iterator[str]) -> Iterator[bytes]:
    buf: List[bytes] = []
    size = 0
    try:
        for line in lines:
            data = line.encode("utf-8")
            buf.append(data)
            size += len(data)
            if size >= 64 * 1024:  # fewer, larger writes: each is a syscall on a slow core
                yield b"".join(buf)
                buf, size = [], 0
        if buf:
            yield b"".join(buf)
    finally:
        _close(source)


def _close(it: Any) -> None:
    close = getattr(it, "close", None)  # a generator: closing it ends its read transaction
    if callable(close):
        close()


@bp.post("/import")
@requires("write")
def import_() -> Response:
    """NDJSON body (one memory object per line, as ``/v1/export`` writes). Bounded by max_body_bytes."""
    st = state()
    with _large_write_slot(st):
        return jsonify(st.service.import_jsonl(io.StringIO(ndjson_body())).to_dict())


@bp.post("/backup")
@requires("admin")
def backup() -> Response:
    """Online backup into ``<home>/backups/`` (the path is chosen by the server, never the client)."""
    st = state()
    check_fields(json_body(required=False), {})
    # The store creates the directory inside its error translation (a read-only disk is a 503, not a 500).
    dest_dir = st.settings.home_path / "backups"
    # No RTC on the board: the clock may be wrong, so a random suffix keeps names unique anyway.
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = Path(st.memory.backup(dest_dir / f"memento-{stamp}-{secrets.token_hex(3)}.db"))
    resp = jsonify({"path": str(path), "bytes": path.stat().st_size if path.exists() else None})
    resp.status_code = 201
    return resp

