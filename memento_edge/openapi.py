"""The OpenAPI 3.0 description of the HTTP API, built as a plain dict (served at ``/openapi.json``).

Built, not written: the component schemas come from the field tables of :mod:`memento_edge.schema`
(types, nullability, limits, help), and the paths from the app's own routes - the rule, the method, the
scope a view ``@requires`` and the query parameters it declares. This module adds only what the code
cannot say: an operation's id and summary, its body and answer schemas, and the errors it may give.
tests/test_openapi.py checks that live answers have exactly their schema's properties and that every
limit the engine enforces is stated here; tests/test_schemathesis.py fuzzes the app against it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .schema import (CREATE_FIELDS, DEFAULT_LIST_LIMIT, FILTER_FIELDS, HIT_FIELDS, MAX_BATCH_ITEMS,
                     MAX_BATCH_QUERIES, MAX_CURSOR_DIGITS, MAX_IDEMPOTENCY_KEY, MAX_LIST_LIMIT,
                     MEMORY_FIELDS, MODES, RECALL_FIELDS, RECORD_FIELDS,
                     REMEMBER_FIELDS, Field)

JSON = "application/json"
NDJSON = "application/x-ndjson"
_STRING = {"type": "string"}
# A string the engine refuses when it is only white space.
_NOT_BLANK = r"\S"
_JSON_TYPES = {"str": "string", "int": "integer", "number": "number", "bool": "boolean", "object": "object"}


def _ref(name: str) -> Dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _resp(name: str) -> Dict[str, str]:
    return {"$ref": f"#/components/responses/{name}"}


def _json(schema: Dict[str, Any], description: str) -> Dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _nullable(schema: Dict[str, Any]) -> Dict[str, Any]:
    return dict(schema, nullable=True)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- schema.py -> JSON Schema -----------------------------------------------------------------------
def _string(f: Field) -> Dict[str, Any]:
    out: Dict[str, Any] = {"type": "string"}
    if f.minimum is not None and f.maximum is not None:  # a time: ISO-8601 text, bounded as Unix seconds
        out["x-earliest"], out["x-latest"] = _iso(f.minimum), _iso(f.maximum)
    if f.enum is not None:
        out["enum"] = list(f.enum)
    if f.min_length is not None:
        out["minLength"] = f.min_length
        out["pattern"] = _NOT_BLANK
    if f.max_length is not None:
        out["maxLength"] = f.max_length
    return out


def _number(f: Field) -> Dict[str, Any]:
    out: Dict[str, Any] = {"type": _JSON_TYPES[f.type]}
    if f.int64:
        out["format"] = "int64"
    if f.minimum is not None:
        out["minimum"] = f.minimum
    if f.maximum is not None:
        out["maximum"] = f.maximum
    return out


def _type(f: Field, refs: Dict[str, str]) -> Dict[str, Any]:
    if f.name in refs:
        return _ref(refs[f.name])
    if f.type == "str":
        return _string(f)
    if f.type in ("int", "number"):
        return _number(f)
    if f.type == "list[str]":
        item = Field(f.name, "str", min_length=1 if f.item_max_length else None, max_length=f.item_max_length)
        out: Dict[str, Any] = {"type": "array", "items": _string(item)}
        if f.max_items is not None:
            out["maxItems"] = f.max_items
        return out
    if f.type == "time":
        return {"oneOf": [{"type": "string"}, _number(Field(f.name, "number", minimum=f.minimum,
                                                            maximum=f.maximum))]}
    # JSON Schema can bound neither an object's encoded size nor (in OpenAPI 3.0) its key length.
    out = {"type": _JSON_TYPES[f.type]}
    if f.max_length is not None:
        out["x-max-json-length"] = f.max_length
    if f.max_key_length is not None:
        out["x-max-key-length"] = f.max_key_length
    return out


def prop(f: Field, refs: Optional[Dict[str, str]] = None, *, nullable: Optional[bool] = None) -> Dict[str, Any]:
    """The JSON Schema of one field (``refs`` names fields that are another component)."""
    out = _type(f, refs or {})
    if "$ref" in out:  # OpenAPI 3.0 ignores the siblings of a $ref, but for nullable
        return dict(out, nullable=True) if f.nullable else out
    if f.type == "time" and f.minimum is not None and f.maximum is not None:
        out["x-earliest"], out["x-latest"] = _iso(f.minimum), _iso(f.maximum)
    if f.default is not None:
        out["default"] = f.default
    if f.help:
        out["description"] = f.help
    if f.nullable if nullable is None else nullable:
        out["nullable"] = True
    return out


def properties(fields: Dict[str, Field], refs: Optional[Dict[str, str]] = None,
               **nullable: bool) -> Dict[str, Any]:
    """``{name: schema}`` of a field table; ``nullable`` overrides a field's own nullability."""
    return {name: prop(f, refs, nullable=nullable.get(name)) for name, f in fields.items()}


def _answer(fields: Dict[str, Field]) -> Dict[str, Any]:
    """What the service sends: every field always present (null where nullable)."""
    return {"type": "object", "required": list(fields), "properties": properties(fields)}


def _request(fields: Dict[str, Field], required: Sequence[str] = (), refs: Optional[Dict[str, str]] = None,
             **nullable: bool) -> Dict[str, Any]:
    """What a client sends: unknown fields are refused."""
    out: Dict[str, Any] = {"type": "object", "additionalProperties": False,
                           "properties": properties(fields, refs, **nullable)}
    if required:
        out["required"] = list(required)
    return out


def _array_of(ref: str, most: int) -> Dict[str, Any]:
    return {"type": "array", "minItems": 1, "maxItems": most, "items": _ref(ref)}


def _schemas() -> Dict[str, Any]:
    return {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {"error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string", "example": "invalid_input"},
                    "message": _STRING,
                    "field": {"type": "string", "description": "The offending field, when there is one."},
                },
            }},
        },
        "MemoryInput": _request(CREATE_FIELDS, required=["text"]),
        "MemoryBatch": {"type": "object", "required": ["items"], "additionalProperties": False,
                        "properties": {"items": _array_of("MemoryInput", MAX_BATCH_ITEMS)}},
        "MemoryPatch": dict(_request(MEMORY_FIELDS, source=False, session_id=False), minProperties=1,
                            description="Fields to change; omitted fields keep their value. Changing text "
                                        "re-embeds it. metadata null clears it."),
        "RememberResult": _answer(REMEMBER_FIELDS),
        "RememberBatchResult": {"type": "object", "required": ["items"],
                                "properties": {"items": {"type": "array", "items": _ref("RememberResult")}}},
        "Memory": _answer(RECORD_FIELDS),
        "Hit": _answer(HIT_FIELDS),
        "Page": {
            "type": "object",
            "required": ["items", "next_cursor"],
            "properties": {"items": {"type": "array", "items": _ref("Memory")},
                           "next_cursor": dict(_STRING, nullable=True)},
        },
        "Filters": _request(FILTER_FIELDS),
        "RecallRequest": _request(RECALL_FIELDS, required=["query"], refs={"filters": "Filters"}),
        "RecallBatch": {"type": "object", "required": ["queries"], "additionalProperties": False,
                        "properties": {"queries": _array_of("RecallRequest", MAX_BATCH_QUERIES)}},
        "RecallResult": {
            "type": "object",
            "required": ["query", "mode", "hits", "took_ms", "note"],
            "properties": {
                "query": _STRING,
                "mode": {"type": "string", "enum": list(MODES),
                         "description": "The mode actually used: keyword when the model is unavailable."},
                "hits": {"type": "array", "items": _ref("Hit")},
                "took_ms": {"type": "number"},
                "note": {"type": "string", "nullable": True, "description": "Why the mode was degraded, if it was."},
            },
        },
        "RecallBatchResult": {
            "type": "object",
            "required": ["results"],
            "properties": {"results": {"type": "array", "items": _ref("RecallResult")}},
        },
        **_service_schemas(),
    }


def _service_schemas() -> Dict[str, Any]:
    return {
        "Stats": {"type": "object", "description": "Engine statistics plus a `server` section.",
                  "required": ["server"], "properties": {"server": {"type": "object"}}},
        "ImportResult": {"type": "object", "description": "Counts of imported / skipped lines."},
        "BackupResult": {
            "type": "object",
            "required": ["path"],
            "properties": {"path": _STRING, "bytes": {"type": "integer", "nullable": True}},
        },
        "Health": {"type": "object", "required": ["status"],
                   "properties": {"status": {"type": "string", "enum": ["ok"]}, "version": _STRING}},
        "Ready": {
            "type": "object",
            "required": ["ready", "db", "model"],
            "properties": {
                "ready": {"type": "boolean"},
                "writes": {"type": "boolean", "description": "False when a write would fail (no database "
                                                            "write access, or no usable model)."},
                "reason": {"type": "string", "description": "Why not ready, or why writes would fail."},
                "vectors": {"type": "object", "properties": {
                    "backend": _nullable(_STRING), "sqlite_extensions": {"type": "boolean"},
                    "note": _nullable(_STRING)}},
                "db": {"type": "object", "properties": {
                    "writable": {"type": "boolean"}, "readable": {"type": "boolean"},
                    "read_only": {"type": "boolean"}, "disk_free_bytes": {"type": "integer", "nullable": True},
                    "disk_total_bytes": {"type": "integer", "nullable": True}, "error": _STRING}},
                "model": {"type": "object", "properties": {
                    "state": {"type": "string",
                              "enum": ["loaded", "unloaded", "missing", "error", "unknown"]},
                    "loaded": {"type": "boolean"},
                    "backend": {"type": "string", "nullable": True},
                    "error": _STRING}},
                "governor": {"type": "string", "enum": ["ok", "soft", "hard"]},
                "clock": {"type": "object", "description": "Whether the wall clock is trusted (README \"Time "
                                                           "on a board without a clock\").", "properties": {
                    "trusted": {"type": "boolean"},
                    "source": {"type": "string",
                               "enum": ["setting", "systemd-timesyncd", "kernel", "assumed"]},
                    "mode": {"type": "string", "enum": ["auto", "trusted", "untrusted"]},
                    "untrusted_memories": {"type": "integer"},
                    "corrected": {"type": "integer"},
                    "error": _STRING}},
                "backlog": {"type": "object", "description": "Memories stored but not yet embedded "
                            "(embed_mode background): never a reason to be unready.", "properties": {
                                "mode": {"type": "string", "enum": ["inline", "background"]},
                                "pending": {"type": "integer"}, "failed": {"type": "integer"},
                                "oldest_age_s": _nullable({"type": "number"}),
                                "drain_per_min": {"type": "number"}, "eta_s": _nullable({"type": "number"}),
                                "worker": _STRING, "error": _STRING}},
            },
        },
    }


def _retry_after_header() -> Dict[str, Any]:
    return {"Retry-After": {"description": "Seconds to wait before retrying.",
                            "schema": {"type": "integer", "minimum": 1}}}


def _responses() -> Dict[str, Any]:
    err = _ref("Error")
    return {
        "BadRequest": _json(err, "Malformed request: JSON syntax, wrong types, unknown fields, NUL bytes."),
        "Unauthorized": dict(_json(err, "Missing or invalid bearer token."),
                             headers={"WWW-Authenticate": {"schema": {"type": "string"}}}),
        "Forbidden": _json(err, "The token lacks the scope this route needs (or a non-localhost Host "
                                "header reached an unauthenticated loopback service)."),
        "NotFound": _json(err, "No memory with this id."),
        "Conflict": _json(err, "Idempotency-Key reused with a different body."),
        "PayloadTooLarge": _json(err, "Body larger than max_body_bytes."),
        "UnsupportedMediaType": _json(err, "Wrong Content-Type."),
        "Unprocessable": _json(err, "Well-formed but refused by the engine's limits (text length, "
                                    "topk, ...)."),
        "TooManyRequests": dict(_json(err, "Rate limited."), headers=_retry_after_header()),
        "Unavailable": dict(_json(err, "Busy, timed out, under memory pressure, or the model is missing "
                                       "(writes need it). Retry later."), headers=_retry_after_header()),
        "InsufficientStorage": _json(err, "The disk is full; nothing was written."),
    }


_ERROR_NAMES = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 409: "Conflict",
                413: "PayloadTooLarge", 415: "UnsupportedMediaType", 422: "Unprocessable",
                429: "TooManyRequests", 503: "Unavailable", 507: "InsufficientStorage"}
_AUTHED = (400, 401, 403, 429, 503)           # every protected route
_BODY = (413, 415, 422)                       # every route with a JSON body


# --- the route table --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Operation:
    """What the document says about one view beyond its rule, method, scope and query parameter names."""

    op_id: str
    summary: str
    responses: Dict[str, Any]
    errors: Tuple[int, ...] = ()
    body: Optional[Dict[str, Any]] = None
    headers: List[Dict[str, Any]] = field(default_factory=list)
    description: str = ""


def _body(schema: Dict[str, Any], required: bool = True, media: str = JSON) -> Dict[str, Any]:
    return {"required": required, "content": {media: {"schema": schema}}}


def _params() -> Dict[str, Dict[str, Any]]:
    """Path and query parameters by name (their ``in`` is set from the rule), schemas from schema.py."""
    return {
        "memory_id": {"required": True, "schema": dict(_number(RECORD_FIELDS["id"]))},
        # An empty collection means "any": only the length is bounded here, the engine checks the rest.
        "collection": {"schema": {"type": "string", "maxLength": FILTER_FIELDS["collection"].max_length}},
        "limit": {"schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIST_LIMIT,
                             "default": DEFAULT_LIST_LIMIT}},
        "cursor": {"schema": {"type": "string", "pattern": f"^[0-9]{{1,{MAX_CURSOR_DIGITS}}}$"},
                   "description": "next_cursor of the previous page."},
        "q": {"required": True, "schema": _string(RECALL_FIELDS["query"])},
        "topk": {"schema": _number(RECALL_FIELDS["topk"])},
        "mode": {"schema": _string(RECALL_FIELDS["mode"])},
        "min_score": {"schema": _number(RECALL_FIELDS["min_score"]), "description": RECALL_FIELDS["min_score"].help},
    }


_IDEMPOTENCY_KEY = {"name": "Idempotency-Key", "in": "header", "required": False,
                    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_IDEMPOTENCY_KEY,
                               "pattern": "^[!-~]+$"}}
_CREATED_LINKS = {name: {"operationId": op, "parameters": {"memory_id": "$response.body#/id"}}
                  for name, op in (("GetMemory", "getMemory"), ("UpdateMemory", "updateMemory"),
                                   ("DeleteMemory", "deleteMemory"))}
_REMEMBERED = {"oneOf": [_ref("RememberResult"), _ref("RememberBatchResult")]}
_RECALLED = _json(_ref("RecallResult"), "Ranked hits.")
_TEXT = {"text/plain": {"schema": _STRING}}

# Every view of the app, by endpoint. Rule, method, scope and query parameter names come from the view.
OPERATIONS: Dict[str, Operation] = {
    "pages.index": Operation("indexPage", "The LAN web page", {
        "200": {"description": "HTML page", "content": {"text/html": {"schema": _STRING}}}}),
    "pages.healthz": Operation("healthz", "Liveness (no auth, no database access)",
                               {"200": _json(_ref("Health"), "The process answers.")}),
    "pages.readyz": Operation("readyz", "Readiness: database writable, model state, backend", {
        "200": _json(_ref("Ready"), "Ready (the model may still be missing: see model.state)."),
        "503": dict(_json(_ref("Ready"), "The database is not writable."), headers=_retry_after_header())}),
    "pages.metrics": Operation("metrics", "Prometheus metrics (text format 0.0.4)", {
        "200": {"description": "Prometheus exposition text", "content": _TEXT}}),
    "pages.openapi": Operation("openapi", "This document", {
        "200": _json({"type": "object"}, "OpenAPI 3.0 document")}),
    "v1.create_memories": Operation(
        "createMemories", "Remember one memory, or a batch",
        {"201": dict(_json(_REMEMBERED, "Stored (id or items)."), links=_CREATED_LINKS),
         "200": _json(_REMEMBERED, "Already stored: nothing new was created.")},
        errors=_BODY + (409, 507), body=_body({"oneOf": [_ref("MemoryInput"), _ref("MemoryBatch")]}),
        headers=[_IDEMPOTENCY_KEY],
        description="Body: one memory, or `{\"items\": [...]}` (one transaction). With `Idempotency-Key`, a "
                    "retry returns the first result. 503 model_unavailable when the embedding model is missing."),
    "v1.list_memories": Operation("listMemories", "Most recent memories, paged",
                                  {"200": _json(_ref("Page"), "A page of memories, newest first.")}, errors=(422,)),
    "v1.get_memory": Operation("getMemory", "One memory", {"200": _json(_ref("Memory"), "The memory.")},
                               errors=(404,)),
    "v1.update_memory": Operation("updateMemory", "Change fields of a memory",
                                  {"200": _json(_ref("Memory"), "The updated memory.")},
                                  errors=_BODY + (404, 507), body=_body(_ref("MemoryPatch"))),
    "v1.delete_memory": Operation("deleteMemory", "Delete a memory", {"204": {"description": "Deleted."}},
                                  errors=(404, 507)),
    "v1.recall_post": Operation("recall", "Recall by meaning and words", {"200": _RECALLED}, errors=_BODY,
                                body=_body(_ref("RecallRequest")),
                                description="Without the model, hybrid/vector recall answers in keyword mode "
                                            "and says so in `mode` and `note`."),
    "v1.recall_get": Operation("recallGet", "Recall (query-string form)", {"200": _RECALLED}, errors=(422,)),
    "v1.recall_batch": Operation("recallBatch", "Several recalls in one request",
                                 {"200": _json(_ref("RecallBatchResult"), "One result per query.")},
                                 errors=_BODY, body=_body(_ref("RecallBatch"))),
    "v1.stats": Operation("stats", "Statistics", {"200": _json(_ref("Stats"), "Statistics.")}),
    "v1.export": Operation("export", "Export every memory as NDJSON", {
        "200": {"description": "One JSON object per line.", "content": {NDJSON: {"schema": _STRING}}}}),
    "v1.import_": Operation("import", "Import NDJSON (as written by /v1/export)",
                            {"200": _json(_ref("ImportResult"), "Import summary.")}, errors=_BODY + (507,),
                            body=_body(_STRING, media=NDJSON)),
    "v1.backup": Operation("backup", "Online backup into <home>/backups/",
                           {"201": _json(_ref("BackupResult"), "Backup written.")}, errors=(413, 415, 507),
                           body=_body({"type": "object", "additionalProperties": False, "maxProperties": 0},
                                      required=False)),
}


def _operation(spec: Operation, scope: Optional[str], path_params: Sequence[str],
               query_params: Sequence[str]) -> Dict[str, Any]:
    op: Dict[str, Any] = {"operationId": spec.op_id, "summary": spec.summary, "responses": dict(spec.responses)}
    if spec.description:
        op["description"] = spec.description
    if scope is None:
        op["security"] = []
    else:
        op["description"] = (spec.description + "\n\n" if spec.description else "") + f"Scope: `{scope}`."
        codes = sorted(set(_AUTHED) | set(spec.errors))
        op["responses"].update({str(c): _resp(_ERROR_NAMES[c]) for c in codes})
    if spec.body is not None:
        op["requestBody"] = spec.body
    known = _params()
    params = [dict(known[n], name=n, **{"in": "path"}) for n in path_params]
    params += [dict(known[n], name=n, **{"in": "query"}) for n in query_params]
    params += spec.headers
    if params:
        op["parameters"] = params
    return op


def routes() -> List[Tuple[str, str, str, Any]]:
    """``(rule, method, endpoint, view)`` of every documented route of the app, in registration order."""
    from flask import Flask

    from .web import api, pages

    app = Flask(__name__)
    app.register_blueprint(pages.bp)
    app.register_blueprint(api.bp)
    out = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue  # a <path:...> converter: no OpenAPI equivalent
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            out.append((rule.rule, method.lower(), rule.endpoint, app.view_functions[rule.endpoint]))
    return out


def build_openapi(version: str) -> Dict[str, Any]:
    """The OpenAPI 3.0.3 document for API version 1 of memento-edge ``version``."""
    from .web.access import route_template

    paths: Dict[str, Any] = {}
    for rule, method, endpoint, view in routes():
        path = route_template(rule)
        path_params = [seg[1:-1] for seg in path.split("/") if seg.startswith("{")]
        query = sorted(getattr(view, "query_params", ()), key=list(_params()).index)
        paths.setdefault(path, {})[method] = _operation(
            OPERATIONS[endpoint], getattr(view, "required_scope", None), path_params, query)
    # POST /mcp is one JSON-RPC endpoint: its own package describes it (and its schemas).
    from .mcp.openapi import mcp_path, mcp_schemas

    paths["/mcp"] = mcp_path()
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "memento-edge",
            "version": version,
            "description": "Persistent semantic memory for AI agents. Errors always have the shape "
                           "`{\"error\": {\"code\", \"message\", \"field\"}}`.",
            "license": {"name": "Apache-2.0"},
        },
        "security": [{"bearerAuth": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearerAuth": {
                "type": "http", "scheme": "bearer",
                "description": "Token from `memento-edge token create`; scopes read / write / admin "
                               "(admin implies all). Not required when no token is configured and the "
                               "service listens on loopback only."}},
            "schemas": dict(_schemas(), **mcp_schemas()),
            "responses": _responses(),
        },
    }
