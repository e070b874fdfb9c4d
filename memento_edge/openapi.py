"""The OpenAPI 3.0 description of the HTTP API, built as a plain dict (served at ``/openapi.json``).

Kept by hand next to ``web.py`` rather than generated: the document is the contract agents code
against, so it states only limits the service really enforces (tests/test_openapi.py checks that every
route is described and vice versa, and tests/test_schemathesis.py fuzzes the app against it).
"""
from __future__ import annotations

from typing import Any, Dict, List

INT64_MAX = 2 ** 63 - 1
JSON = "application/json"
NDJSON = "application/x-ndjson"


def _ref(name: str) -> Dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _resp(name: str) -> Dict[str, str]:
    return {"$ref": f"#/components/responses/{name}"}


def _json(schema: Dict[str, Any], description: str) -> Dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _nullable(schema: Dict[str, Any]) -> Dict[str, Any]:
    return dict(schema, nullable=True)


_TAG = {"type": "string", "minLength": 1, "maxLength": 100}
_STRING = {"type": "string"}


def _schemas() -> Dict[str, Any]:
    memory_props: Dict[str, Any] = {
        "text": {"type": "string", "minLength": 1, "maxLength": 100_000,
                 "description": "The memory itself (1-100,000 characters)."},
        "collection": {"type": "string", "description": "Namespace; default \"default\"."},
        "tags": {"type": "array", "items": _TAG, "maxItems": 50},
        "source": _nullable(_STRING),
        "session_id": _nullable(_STRING),
        "importance": {"type": "number", "minimum": 0, "maximum": 1, "description": "Default 0.5."},
        "metadata": _nullable({"type": "object", "description": "Any JSON object."}),
    }
    record_props: Dict[str, Any] = {
        "id": {"type": "integer", "format": "int64"},
        "text": _STRING,
        "collection": _STRING,
        "tags": {"type": "array", "items": _STRING},
        "source": _nullable(_STRING),
        "session_id": _nullable(_STRING),
        "importance": {"type": "number"},
        "metadata": {"type": "object"},
        "created_at": {"type": "string", "description": "ISO-8601 UTC."},
        "updated_at": {"type": "string", "description": "ISO-8601 UTC."},
        "content_hash": _STRING,
        "clock_trusted": {"type": "boolean",
                          "description": "false while created_at was stamped by a clock not yet verified "
                                         "(no RTC, no NTP yet); corrected and set true once it is."},
    }
    record_required = ["id", "text", "collection", "tags", "importance", "metadata", "created_at",
                       "updated_at"]
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
        "MemoryInput": {
            "type": "object",
            "required": ["text"],
            "additionalProperties": False,
            "properties": dict(memory_props, created_at=_nullable({
                "oneOf": [{"type": "string"}, {"type": "number"}],
                "description": "When it happened: ISO-8601 or Unix seconds; default now."})),
        },
        "MemoryBatch": {
            "type": "object",
            "required": ["items"],
            "additionalProperties": False,
            "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 1000,
                                     "items": _ref("MemoryInput")}},
        },
        "MemoryPatch": {
            "type": "object",
            "minProperties": 1,
            "additionalProperties": False,
            "description": "Fields to change; omitted fields keep their value. Changing text re-embeds it. "
                           "metadata null clears it.",
            "properties": dict(memory_props, source=_STRING, session_id=_STRING),
        },
        "RememberResult": {
            "type": "object",
            "required": ["id", "created"],
            "properties": {
                "id": {"type": "integer", "format": "int64"},
                "created": {"type": "boolean",
                            "description": "false when the text was already stored (then id is the "
                                           "existing memory)."},
                "duplicate_of": _nullable({"type": "integer", "format": "int64"}),
            },
        },
        "RememberBatchResult": {
            "type": "object",
            "required": ["items"],
            "properties": {"items": {"type": "array", "items": _ref("RememberResult")}},
        },
        "Memory": {"type": "object", "required": record_required, "properties": record_props},
        "Hit": {
            "type": "object",
            "required": record_required + ["score"],
            "properties": dict(record_props, score={"type": "number"},
                               vector_rank=_nullable({"type": "integer"}),
                               keyword_rank=_nullable({"type": "integer"})),
        },
        "Page": {
            "type": "object",
            "required": ["items", "next_cursor"],
            "properties": {"items": {"type": "array", "items": _ref("Memory")},
                           "next_cursor": _nullable(_STRING)},
        },
        "Filters": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "collection": _STRING,
                "tags_any": {"type": "array", "items": _STRING},
                "tags_all": {"type": "array", "items": _STRING},
                "source": _STRING,
                "session_id": _STRING,
                "min_importance": {"type": "number"},
                "since": {"type": "string", "description": "ISO-8601 timestamp (inclusive)."},
                "until": {"type": "string", "description": "ISO-8601 timestamp (exclusive)."},
                "metadata": {"type": "object", "description": "Equality on top-level metadata keys."},
                "untrusted_time": {"type": "string", "enum": ["include", "exclude"], "default": "include",
                                   "description": "Memories whose time is unverified (clock_trusted false): "
                                                  "include matches them by their stamped time, exclude "
                                                  "leaves them out."},
            },
        },
        "RecallRequest": {
            "type": "object",
            "required": ["query"],
            "additionalProperties": False,
            "properties": {
                "query": {"type": "string", "minLength": 1, "maxLength": 1000},
                "topk": {"type": "integer", "minimum": 1, "maximum": 100, "default": 5},
                "mode": {"type": "string", "enum": ["hybrid", "vector", "keyword"], "default": "hybrid"},
                "filters": _nullable(_ref("Filters")),
            },
        },
        "RecallBatch": {
            "type": "object",
            "required": ["queries"],
            "additionalProperties": False,
            "properties": {"queries": {"type": "array", "minItems": 1, "maxItems": 32,
                                       "items": _ref("RecallRequest")}},
        },
        "RecallResult": {
            "type": "object",
            "required": ["query", "mode", "hits", "took_ms"],
            "properties": {
                "query": _STRING,
                "mode": {"type": "string", "enum": ["hybrid", "vector", "keyword"],
                         "description": "The mode actually used: keyword when the model is unavailable."},
                "hits": {"type": "array", "items": _ref("Hit")},
                "took_ms": {"type": "number"},
                "note": _nullable({"type": "string", "description": "Why the mode was degraded, if it was."}),
            },
        },
        "RecallBatchResult": {
            "type": "object",
            "required": ["results"],
            "properties": {"results": {"type": "array", "items": _ref("RecallResult")}},
        },
        "Stats": {"type": "object", "description": "Engine statistics plus a `server` section.",
                  "required": ["server"], "properties": {"server": {"type": "object"}}},
        "ImportResult": {"type": "object", "description": "Counts of imported / skipped lines."},
        "BackupResult": {
            "type": "object",
            "required": ["path"],
            "properties": {"path": _STRING, "bytes": _nullable({"type": "integer"})},
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
                    "read_only": {"type": "boolean"}, "disk_free_bytes": _nullable({"type": "integer"}),
                    "disk_total_bytes": _nullable({"type": "integer"}), "error": _STRING}},
                "model": {"type": "object", "properties": {
                    "state": {"type": "string",
                              "enum": ["loaded", "unloaded", "missing", "error", "unknown"]},
                    "loaded": {"type": "boolean"},
                    "backend": _nullable(_STRING),
                    "error": _STRING}},
                "governor": {"type": "string", "enum": ["ok", "soft", "hard"]},
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


def _errors(*codes: int) -> Dict[str, Any]:
    names = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 409: "Conflict",
             413: "PayloadTooLarge", 415: "UnsupportedMediaType", 422: "Unprocessable",
             429: "TooManyRequests", 503: "Unavailable", 507: "InsufficientStorage"}
    return {str(c): _resp(names[c]) for c in codes}


_AUTHED = (400, 401, 403, 429, 503)           # every protected route
_BODY = (413, 415, 422)                       # every route with a JSON body
_MEMORY_ID = {"name": "memory_id", "in": "path", "required": True,
              "schema": {"type": "integer", "format": "int64", "minimum": 1, "maximum": INT64_MAX}}


def _op(op_id: str, summary: str, scope: str, responses: Dict[str, Any], *, errors: tuple = (),
        body: Any = None, params: List[Dict[str, Any]] = (), public: bool = False,  # type: ignore[assignment]
        description: str = "") -> Dict[str, Any]:
    op: Dict[str, Any] = {"operationId": op_id, "summary": summary, "responses": dict(responses)}
    if description:
        op["description"] = description
    if public:
        op["security"] = []
    else:
        op["description"] = (description + "\n\n" if description else "") + f"Scope: `{scope}`."
        op["responses"].update(_errors(*sorted(set(_AUTHED) | set(errors))))
    if body is not None:
        op["requestBody"] = body
    if params:
        op["parameters"] = list(params)
    return op


def build_openapi(version: str) -> Dict[str, Any]:
    """The OpenAPI 3.0.3 document for API version 1 of memento-edge ``version``."""
    json_body = lambda schema, required=True: {  # noqa: E731 - tiny local helper
        "required": required, "content": {JSON: {"schema": schema}}}
    created_links = {"GetMemory": {"operationId": "getMemory",
                                   "parameters": {"memory_id": "$response.body#/id"}},
                     "UpdateMemory": {"operationId": "updateMemory",
                                      "parameters": {"memory_id": "$response.body#/id"}},
                     "DeleteMemory": {"operationId": "deleteMemory",
                                      "parameters": {"memory_id": "$response.body#/id"}}}
    remember_ok = {"oneOf": [_ref("RememberResult"), _ref("RememberBatchResult")]}
    paths: Dict[str, Any] = {
        "/": {"get": _op("indexPage", "The LAN web page", "", public=True, responses={
            "200": {"description": "HTML page", "content": {"text/html": {"schema": _STRING}}}})},
        "/healthz": {"get": _op("healthz", "Liveness (no auth, no database access)", "", public=True,
                                responses={"200": _json(_ref("Health"), "The process answers.")})},
        "/readyz": {"get": _op("readyz", "Readiness: database writable, model state, backend", "",
                               public=True, responses={
                                   "200": _json(_ref("Ready"), "Ready (the model may still be missing: "
                                                               "see model.state)."),
                                   "503": dict(_json(_ref("Ready"), "The database is not writable."),
                                               headers=_retry_after_header())})},
        "/metrics": {"get": _op("metrics", "Prometheus metrics (text format 0.0.4)", "read", responses={
            "200": {"description": "Prometheus exposition text",
                    "content": {"text/plain": {"schema": _STRING}}}})},
        "/openapi.json": {"get": _op("openapi", "This document", "", public=True, responses={
            "200": _json({"type": "object"}, "OpenAPI 3.0 document")})},
        "/v1/memories": {
            "post": _op("createMemories", "Remember one memory, or a batch", "write",
                        description="Body: one memory, or `{\"items\": [...]}` (one transaction). "
                                    "With `Idempotency-Key`, a retry returns the first result. "
                                    "503 model_unavailable when the embedding model is missing.",
                        body=json_body({"oneOf": [_ref("MemoryInput"), _ref("MemoryBatch")]}),
                        params=[{"name": "Idempotency-Key", "in": "header", "required": False,
                                 "schema": {"type": "string", "minLength": 1, "maxLength": 200,
                                            "pattern": "^[!-~]+$"}}],
                        errors=_BODY + (409, 507),
                        responses={"201": dict(_json(remember_ok, "Stored (id or items)."),
                                               links=created_links),
                                   "200": _json(remember_ok, "Already stored: nothing new was created.")}),
            "get": _op("listMemories", "Most recent memories, paged", "read", errors=(422,), params=[
                {"name": "collection", "in": "query", "schema": {"type": "string", "maxLength": 200}},
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000,
                                                            "default": 20}},
                {"name": "cursor", "in": "query", "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"},
                 "description": "next_cursor of the previous page."}],
                responses={"200": _json(_ref("Page"), "A page of memories, newest first.")}),
        },
        "/v1/memories/{memory_id}": {
            "get": _op("getMemory", "One memory", "read", params=[_MEMORY_ID], errors=(404,),
                       responses={"200": _json(_ref("Memory"), "The memory.")}),
            "patch": _op("updateMemory", "Change fields of a memory", "write", params=[_MEMORY_ID],
                         body=json_body(_ref("MemoryPatch")), errors=_BODY + (404, 507),
                         responses={"200": _json(_ref("Memory"), "The updated memory.")}),
            "delete": _op("deleteMemory", "Delete a memory", "write", params=[_MEMORY_ID],
                          errors=(404, 507), responses={"204": {"description": "Deleted."}}),
        },
        "/v1/recall": {
            "post": _op("recall", "Recall by meaning and words", "read",
                        body=json_body(_ref("RecallRequest")),
                        errors=_BODY, description="Without the model, hybrid/vector recall answers in "
                                                  "keyword mode and says so in `mode` and `note`.",
                        responses={"200": _json(_ref("RecallResult"), "Ranked hits.")}),
            "get": _op("recallGet", "Recall (query-string form)", "read", errors=(422,), params=[
                {"name": "q", "in": "query", "required": True,
                 "schema": {"type": "string", "minLength": 1, "maxLength": 1000}},
                {"name": "topk", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
                {"name": "mode", "in": "query", "schema": {"type": "string",
                                                           "enum": ["hybrid", "vector", "keyword"]}},
                {"name": "collection", "in": "query", "schema": {"type": "string", "maxLength": 200}}],
                responses={"200": _json(_ref("RecallResult"), "Ranked hits.")}),
        },
        "/v1/recall/batch": {"post": _op(
            "recallBatch", "Several recalls in one request", "read", body=json_body(_ref("RecallBatch")),
            errors=_BODY, responses={"200": _json(_ref("RecallBatchResult"), "One result per query.")})},
        "/v1/stats": {"get": _op("stats", "Statistics", "read",
                                 responses={"200": _json(_ref("Stats"), "Statistics.")})},
        "/v1/export": {"get": _op("export", "Export every memory as NDJSON", "read", responses={
            "200": {"description": "One JSON object per line.",
                    "content": {NDJSON: {"schema": _STRING}}}})},
        "/v1/import": {"post": _op(
            "import", "Import NDJSON (as written by /v1/export)", "write", errors=_BODY + (507,),
            body={"required": True, "content": {NDJSON: {"schema": {"type": "string"}}}},
            responses={"200": _json(_ref("ImportResult"), "Import summary.")})},
        "/v1/backup": {"post": _op(
            "backup", "Online backup into <home>/backups/", "admin", errors=(413, 415, 507),
            body=json_body({"type": "object", "additionalProperties": False, "maxProperties": 0},
                           required=False),
            responses={"201": _json(_ref("BackupResult"), "Backup written.")})},
    }
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
