"""The MCP tools: what each one takes (JSON Schema derived from the field tables), what it answers
(``structuredContent`` matching its ``outputSchema`` plus a short text an LLM reads well), and the call
into :class:`~memento_edge.service.Service` - the same operations, limits, governor and rules (idempotent
create, keyword recall under memory pressure) as the REST API.

Every answer is capped at ``max_chars`` characters (each of the text and the JSON): hits and items are
dropped from the end, and a memory text longer than the whole budget is cut; the answer then says
``"truncated": true`` and how many entries were left out, so the model knows to narrow its search or
fetch one memory with ``memory_get``.

Domain errors become tool results with ``isError`` and the REST error object (same ``code``/``field``),
so the model can correct itself; protocol faults (unknown tool, arguments not an object) are JSON-RPC
errors raised by :mod:`memento_edge.mcp.protocol`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..errors import Busy, InvalidInput, MementoError
from .. import schema as S
from ..memory import Hit, Memory, MemoryRecord
from ..service import Service
from . import schemas
from .when import resolve_time

Schema = Dict[str, Any]
DEFAULT_MAX_CHARS = 8000  # ~2k tokens: room for a handful of memories without flooding the context
MIN_MAX_CHARS = 500
MAX_MAX_CHARS = 200_000
DEFAULT_RECENT = 10
_STATS_COLLECTIONS = 20  # collections named in memory_stats' text (largest first)
_ELLIPSIS = "…"


class ToolScopeError(MementoError):
    """The caller's token lacks the scope the tool needs (REST answers 403 for the same)."""

    code = "forbidden"


@dataclass
class ToolContext:
    """Who calls and what with: the service (engine + governor + shared rules) and the caller's scopes."""

    service: Service
    principal: str
    allows: Callable[[str], bool]

    @property
    def memory(self) -> Memory:
        """The engine, for the operations that need no service rule (get, delete, recent, stats)."""
        return self.service.memory


@dataclass(frozen=True)
class Tool:
    """One tool: its listing (name, description, schemas, annotations) and its handler."""

    name: str
    title: str
    description: str
    scope: str
    input_schema: Schema
    output_schema: Schema
    run: Callable[[ToolContext, Dict[str, Any]], Tuple[Dict[str, Any], str]]
    filters_flat: bool = False  # the arguments are filters (a metadata argument filters, is not stored)

    def listing(self) -> Dict[str, Any]:
        """The ``tools/list`` entry."""
        read_only = self.scope == "read"
        return {"name": self.name, "title": self.title, "description": self.description,
                "inputSchema": self.input_schema, "outputSchema": self.output_schema,
                "annotations": {"title": self.title, "readOnlyHint": read_only,
                                "destructiveHint": self.name == "memory_delete",
                                "idempotentHint": read_only or self.name != "memory_store",
                                "openWorldHint": False}}


# ------------------------------------------------------------------------------------------------
# argument checking (types and unknown names; values are the engine's job)
# ------------------------------------------------------------------------------------------------
_JSON_TYPES: Dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "null": lambda v: v is None,
}


def check_arguments(args: Dict[str, Any], schema: Schema) -> Dict[str, Any]:
    """Refuse unknown, missing and mistyped arguments (InvalidInput naming the field)."""
    props = schema["properties"]
    for name in args:
        if name not in props:
            raise InvalidInput(f"unknown argument {name!r}; known: {', '.join(props)}", field=name)
    for name in schema.get("required", ()):
        if name not in args:
            raise InvalidInput(f"missing required argument {name!r}", field=name)
    for name, value in args.items():
        spec = props[name]
        types = spec["type"] if isinstance(spec["type"], list) else [spec["type"]]
        if not any(_JSON_TYPES[t](value) for t in types):
            raise InvalidInput(f"{name} must be {' or '.join(types)}", field=name)
        item_type = spec.get("items", {}).get("type")
        if isinstance(value, list) and item_type and not all(_JSON_TYPES[item_type](v) for v in value):
            raise InvalidInput(f"{name} must hold only {item_type}s", field=name)
    return dict(args)


def _max_chars(args: Dict[str, Any]) -> int:
    value = args.pop("max_chars", DEFAULT_MAX_CHARS)
    if not MIN_MAX_CHARS <= value <= MAX_MAX_CHARS:
        raise InvalidInput(f"max_chars must be between {MIN_MAX_CHARS} and {MAX_MAX_CHARS}", field="max_chars")
    return int(value)


def _memory_id(args: Dict[str, Any]) -> int:
    return int(args.pop("id"))


# ------------------------------------------------------------------------------------------------
# capping
# ------------------------------------------------------------------------------------------------
# One encoder for every size check: json.dumps with options builds a new encoder on each call.
_COMPACT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def _size(obj: Any) -> int:
    return len(_COMPACT.encode(obj))


def _clip(entry: Dict[str, Any], room: int) -> Optional[Dict[str, Any]]:
    """``entry`` with its text cut so the entry takes at most ``room`` characters (None if it cannot)."""
    over = _size(entry) - room
    if over <= 0:
        return entry
    keep = len(entry["text"]) - over - len(_ELLIPSIS) - 8  # slack for escapes in the kept part
    if keep < 40:
        return None
    return dict(entry, text=entry["text"][:keep] + _ELLIPSIS)


def cap_entries(payload: Dict[str, Any], key: str, max_chars: int) -> Dict[str, Any]:
    """``payload`` with ``payload[key]`` (a list of memories) cut to fit ``max_chars`` as JSON."""
    entries = payload[key]
    whole = dict(payload, truncated=False, omitted=0)
    if _size(whole) <= max_chars:  # the usual case: one encode, no entry-by-entry accounting
        return whole
    out = dict(payload, **{key: []}, truncated=False, omitted=0)
    budget = max_chars - _size(out) - 16
    for n, entry in enumerate(entries):
        room = budget - _size(entry) - 1
        if room >= 0:
            out[key].append(entry)
            budget = room
            continue
        clipped = _clip(entry, budget - 1)
        if clipped is not None:
            out[key].append(clipped)
            n += 1
        out["truncated"], out["omitted"] = True, len(entries) - n
        break
    return out


def _count(n: int, noun: str) -> str:
    plural = noun[:-1] + "ies" if noun.endswith("y") else noun + "s"
    return f"{n} {noun if n == 1 else plural}"


def _one_line(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit - 1] + _ELLIPSIS


def _render_entries(head: str, entries: List[Dict[str, Any]], payload: Dict[str, Any], max_chars: int) -> str:
    lines = [head]
    per_line = max(120, max_chars // max(1, len(entries)) - 60)
    for e in entries:
        bits = [f"#{e['id']}"]
        if e.get("score") is not None:
            bits.append(f"score {e['score']:.3f}")
        bits.append(str(e["created_at"])[:16].replace("T", " "))
        if e["collection"] != "default":
            bits.append(e["collection"])
        if e["tags"]:
            bits.append("tags: " + ", ".join(e["tags"]))
        lines.append(f"[{' · '.join(bits)}] {_one_line(e['text'], per_line)}")
    if payload.get("truncated"):
        lines.append(f"(truncated to max_chars={max_chars}: {payload['omitted']} more not shown; narrow the "
                     "search, raise max_chars, or fetch one with memory_get)")
    text = "\n".join(lines)
    return text if len(text) <= max_chars else text[:max_chars - 1] + _ELLIPSIS


# ------------------------------------------------------------------------------------------------
# handlers
# ------------------------------------------------------------------------------------------------
def _record(rec: MemoryRecord) -> Dict[str, Any]:
    return {k: v for k, v in rec.to_dict().items() if k in _RECORD_SCHEMA["properties"]}


def _hit(hit: Hit) -> Dict[str, Any]:
    return {k: v for k, v in hit.to_dict().items() if k in _HIT_SCHEMA["properties"]}


def _store(ctx: ToolContext, args: Dict[str, Any]) -> Tuple[Dict[str, Any], str]:
    key = args.pop("idempotency_key", None)
    if key is None:
        created = ctx.service.remember([args], batch=False)
    else:
        created = ctx.service.remember_once([args], batch=False, key=key, request=args, owner=ctx.principal,
                                            key_field="idempotency_key")
    payload = created.payload
    pending = (" Embedding pending: a keyword search finds it now, a search by meaning once it is embedded."
               if payload.get("embedding") == "pending" else "")
    if payload["created"]:
        return payload, f"Stored as memory #{payload['id']}.{pending}"
    return payload, f"Already stored as memory #{payload['id']} (nothing new was created).{pending}"


def _search(ctx: ToolContext, args: Dict[str, Any]) -> Tuple[Dict[str, Any], str]:
    max_chars = _max_chars(args)
    kwargs: Dict[str, Any] = {k: args.pop(k) for k in ("query", "topk", "mode", "min_score") if k in args}
    filters = {k: resolve_time(v, k) if k in ("since", "until") else v for k, v in args.items() if v is not None}
    result = ctx.service.recall(**kwargs, filters=filters)  # the engine applies (and range-checks) min_score
    hits = [_hit(h) for h in result.hits]
    payload = cap_entries({"query": result.query, "mode": result.mode, "note": result.note, "hits": hits},
                          "hits", max_chars)
    head = f"{_count(len(hits), 'memory')} for {json.dumps(result.query, ensure_ascii=False)} ({result.mode} search)"
    if result.note:
        head += f"; note: {result.note}"
    if not hits:
        head += ". Nothing matched: try other words, a wider time range, or fewer filters."
    return payload, _render_entries(head + ":" if hits else head, payload["hits"], payload, max_chars)


def _capped_record(rec: MemoryRecord, max_chars: int) -> Dict[str, Any]:
    """One memory as a result, its text cut (``truncated``) when the whole would exceed ``max_chars``."""
    record = _record(rec)
    payload = cap_entries({"memory": [record]}, "memory", max_chars)
    return dict(payload["memory"][0] if payload["memory"] else dict(record, text=""),
                truncated=payload["truncated"])


def _get(ctx: ToolContext, args: Dict[str, Any]) -> Tuple[Dict[str, Any], str]:
    max_chars = _max_chars(args)
    out = rec = _capped_record(ctx.memory.get(_memory_id(args)), max_chars)
    meta = ", ".join(f"{k}: {json.dumps(rec[k], ensure_ascii=False)}" for k in
                     ("collection", "tags", "importance", "source", "session_id", "created_at")
                     if rec.get(k) not in (None, [], ""))
    text = f"Memory #{rec['id']} ({meta}):\n{rec['text']}"
    if out["truncated"]:
        text += f"\n(text cut to fit max_chars={max_chars})"
    return out, text[:max_chars]


def _update(ctx: ToolContext, args: Dict[str, Any]) -> Tuple[Dict[str, Any], str]:
    max_chars = _max_chars(args)
    memory_id = _memory_id(args)
    if not args:
        raise InvalidInput("nothing to update: give at least one field besides id", field="id")
    for name in ("source", "session_id"):
        if name in args and args[name] is None:
            raise InvalidInput(f"{name} must be a non-empty string (omit it to keep the current value)",
                               field=name)
    if "metadata" in args and args["metadata"] is None:
        args["metadata"] = {}
    record = _capped_record(ctx.service.update(memory_id, **args), max_chars)
    return record, f"Updated memory #{memory_id}: {', '.join(sorted(args))}."


def _delete(ctx: ToolContext, args: Dict[str, Any]) -> Tuple[Dict[str, Any], str]:
    memory_id = _memory_id(args)
    ctx.memory.delete(memory_id)
    return {"id": memory_id, "deleted": True}, f"Deleted memory #{memory_id}."


def _recent(ctx: ToolContext, args: Dict[str, Any]) -> Tuple[Dict[str, Any], str]:
    max_chars = _max_chars(args)
    page = ctx.memory.recent(collection=args.get("collection"), limit=args.get("limit", DEFAULT_RECENT),
                             cursor=args.get("cursor"))
    items = [_record(r) for r in page.items]
    payload = cap_entries({"items": items, "next_cursor": page.next_cursor}, "items", max_chars)
    more = " (more: pass next_cursor)" if page.next_cursor else ""
    head = f"{len(items)} most recent {'memory' if len(items) == 1 else 'memories'}{more}"
    return payload, _render_entries(head + ":", payload["items"], payload, max_chars)


def _stats(ctx: ToolContext, args: Dict[str, Any]) -> Tuple[Dict[str, Any], str]:
    info = ctx.memory.stats()
    out = {k: info.get(k) for k in _STATS_SCHEMA["properties"]}
    clock = info.get("clock") or {}
    out["clock_trusted"] = bool(clock.get("trusted", True))
    collections = sorted((out["collections"] or {}).items(), key=lambda kv: (-kv[1], kv[0]))
    cols = ", ".join(f"{k} ({v})" for k, v in collections[:_STATS_COLLECTIONS])
    if len(collections) > _STATS_COLLECTIONS:  # the text stays short however many collections there are
        cols += f", and {len(collections) - _STATS_COLLECTIONS} more"
    text = (f"{_count(out['memories'] or 0, 'memory')} in {_count(len(out['collections'] or {}), 'collection')} "
            f"({cols}); database "
            f"{(out['db_bytes'] or 0) / 1e6:.1f} MB; model {out['model_state']}; vector index "
            f"{out['vector_backend']}; clock {'trusted' if out['clock_trusted'] else 'NOT trusted'}.")
    return out, text


# ------------------------------------------------------------------------------------------------
# the tool table
# ------------------------------------------------------------------------------------------------
_ID = {"type": "integer", "minimum": 1, "description": "Id of the memory (from memory_store or a search)."}
_MAX_CHARS = {"type": "integer", "minimum": MIN_MAX_CHARS, "maximum": MAX_MAX_CHARS, "default": DEFAULT_MAX_CHARS,
              "description": "Cap on the answer's size in characters; longer answers are cut and say so."}
_RECORD_SCHEMA = schemas.output_schema(S.RECORD_FIELDS, drop=("content_hash",))
_HIT_SCHEMA = schemas.output_schema(S.HIT_FIELDS, drop=("content_hash", "vector_rank", "keyword_rank"))
_TRUNC = {"truncated": {"type": "boolean", "description": "True when entries were left out or cut."},
          "omitted": {"type": "integer", "description": "Entries left out to fit max_chars."}}
_CAPPED_RECORD_SCHEMA = dict(_RECORD_SCHEMA, required=_RECORD_SCHEMA["required"] + ["truncated"],
                             properties=dict(_RECORD_SCHEMA["properties"], truncated=_TRUNC["truncated"]))
_STATS_SCHEMA: Schema = {"type": "object", "properties": {
    "memories": {"type": "integer"}, "collections": {"type": "object", "additionalProperties": {"type": "integer"}},
    "db_bytes": {"type": ["integer", "null"]}, "model_state": {"type": "string"},
    "vector_backend": {"type": ["string", "null"]}, "clock_trusted": {"type": "boolean"}},
    "required": ["memories", "collections", "model_state", "clock_trusted"]}


def _list_schema(key: str, item: Schema, **extra: Schema) -> Schema:
    props = {key: {"type": "array", "items": item}, **extra, **_TRUNC}
    return {"type": "object", "properties": props, "required": list(props)}


def _search_input() -> Schema:
    extra: Dict[str, Schema] = {"max_chars": _MAX_CHARS}
    recall = {k: f for k, f in S.RECALL_FIELDS.items() if k != "filters"}  # the tools take filters flat
    return schemas.input_schema(dict(recall, **S.FILTER_FIELDS), required=("query",), extra=extra)


def _build_tools() -> Dict[str, Tool]:
    idem = {"idempotency_key": {"type": "string", "minLength": 1, "maxLength": 200, "description":
                                "Any unique string: a retry with the same key returns the first answer "
                                "instead of storing twice."}}
    tools = [
        Tool("memory_store", "Store a memory",
             "Remember a fact, note or dialogue turn for later. Returns its id; an identical text in the same "
             "collection is not stored twice.", "write",
             schemas.input_schema(S.CREATE_FIELDS, required=("text",), extra=idem),
             schemas.output_schema(S.REMEMBER_FIELDS), _store),
        Tool("memory_search", "Search memories",
             "Find memories by meaning and by words (\"buy food\" finds \"get groceries\"). Filter by "
             "collection, tags, source, session, importance and time (since/until take \"yesterday\", "
             "\"last week\", \"3 days ago\" or ISO-8601).", "read",
             _search_input(), _list_schema("hits", _HIT_SCHEMA, query={"type": "string"},
                                           mode={"type": "string"}, note={"type": ["string", "null"]}), _search,
             filters_flat=True),
        Tool("memory_get", "Get a memory", "Fetch one memory by id, with all its fields.", "read",
             {"type": "object", "properties": {"id": _ID, "max_chars": _MAX_CHARS}, "required": ["id"],
              "additionalProperties": False},
             _CAPPED_RECORD_SCHEMA, _get),
        Tool("memory_update", "Update a memory",
             "Change fields of a memory by id; omitted fields are kept. A new text is re-embedded.", "write",
             schemas.input_schema(S.MEMORY_FIELDS, required=("id",), extra={"id": _ID, "max_chars": _MAX_CHARS},
                                  defaults=False),
             _CAPPED_RECORD_SCHEMA, _update),
        Tool("memory_delete", "Delete a memory", "Delete one memory by id, for good.", "write",
             {"type": "object", "properties": {"id": _ID}, "required": ["id"], "additionalProperties": False},
             {"type": "object", "properties": {"id": {"type": "integer"}, "deleted": {"type": "boolean"}},
              "required": ["id", "deleted"]}, _delete),
        Tool("memory_recent", "Recent memories",
             "The newest memories first, optionally of one collection; page on with next_cursor.", "read",
             {"type": "object", "additionalProperties": False, "properties": {
                 "collection": schemas.field_schema(S.FILTER_FIELDS["collection"]),
                 "limit": {"type": "integer", "minimum": 1, "maximum": 100, "default": DEFAULT_RECENT},
                 "cursor": {"type": "string", "description": "next_cursor of the previous page."},
                 "max_chars": _MAX_CHARS}},
             _list_schema("items", _RECORD_SCHEMA, next_cursor={"type": ["string", "null"]}), _recent),
        Tool("memory_stats", "Memory statistics",
             "How many memories there are, per collection; database size; model and clock state.", "read",
             {"type": "object", "properties": {}, "additionalProperties": False}, _STATS_SCHEMA, _stats),
    ]
    return {t.name: t for t in tools}


TOOLS: Dict[str, Tool] = _build_tools()


def call_tool(ctx: ToolContext, tool: Tool, arguments: Dict[str, Any]) -> Dict[str, Any]:
    """Run ``tool``: a ``CallToolResult`` body (``content`` + ``structuredContent``, or ``isError``)."""
    try:
        if not ctx.allows(tool.scope):
            raise ToolScopeError(f"token {ctx.principal!r} lacks the {tool.scope!r} scope {tool.name} needs",
                                 field="scope")
        args = check_arguments(arguments, tool.input_schema)
        S.check_wire_values(args, in_filters=tool.filters_flat)  # NULs, lone surrogates, huge ints: as REST
        structured, text = tool.run(ctx, args)
    except MementoError as exc:
        return tool_error(exc)
    return {"content": [{"type": "text", "text": text}], "structuredContent": structured, "isError": False}


def tool_error(exc: MementoError) -> Dict[str, Any]:
    """A domain error as a tool result: the REST error object, and a text that says what to do."""
    error: Dict[str, Any] = {"code": exc.code, "message": exc.message}
    if exc.field is not None:
        error["field"] = exc.field
    text = f"Error ({exc.code}" + (f", field {exc.field}" if exc.field else "") + f"): {exc.message}"
    retry = getattr(exc, "retry_after", None)
    if isinstance(exc, Busy) and retry:
        error["retry_after"] = retry
        text += f" Retry in {max(1, round(retry))} s."
    return {"content": [{"type": "text", "text": text}], "structuredContent": {"error": error}, "isError": True}
