"""JSON Schemas of the MCP tools, derived from :mod:`memento_edge.schema` (the one field table): the types,
limits, defaults and help a tool lists are the ones the engine enforces and the REST API documents, so a
field added to a memory shows up in ``tools/list`` by itself.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Mapping

from .. import schema as S

Schema = Dict[str, Any]
_TYPES: Dict[str, Any] = {"str": "string", "int": "integer", "number": "number", "bool": "boolean",
                          "object": "object", "list[str]": "array", "list[object]": "array",
                          "time": ["string", "number"]}
# What the MCP faces says differently: since/until also take the relative phrases tools resolve (when.py).
_RELATIVE = ("ISO-8601, Unix seconds, or \"today\", \"yesterday\", \"last week\", \"3 days ago\"")
OVERRIDES: Dict[str, Schema] = {
    "since": {"type": ["string", "number"], "description": f"Only memories from this time on: {_RELATIVE}."},
    "until": {"type": ["string", "number"],
              "description": f"Only memories before this time: {_RELATIVE} (\"yesterday\" ends at midnight today)."},
}


def field_schema(f: S.Field, *, defaults: bool = True) -> Schema:
    """JSON Schema (2020-12) of one field of the table (``defaults=False`` where omitted means "keep")."""
    kind = _TYPES[f.type]
    out: Schema = {"type": (list(kind) if isinstance(kind, list) else kind)}
    if f.nullable:
        out["type"] = (out["type"] if isinstance(out["type"], list) else [out["type"]]) + ["null"]
    if f.type == "list[str]":
        out["items"] = {"type": "string"} if f.item_max_length is None else {"type": "string",
                                                                              "maxLength": f.item_max_length}
    elif f.type == "list[object]":
        out["items"] = {"type": "object"}
    if f.type == "str":
        out.update({k: v for k, v in (("minLength", f.min_length), ("maxLength", f.max_length)) if v is not None})
    if f.type in ("int", "number"):
        out.update({k: v for k, v in (("minimum", f.minimum), ("maximum", f.maximum)) if v is not None})
    if f.max_items is not None:
        out["maxItems"] = f.max_items
    if f.enum:
        out["enum"] = list(f.enum)
    if f.default is not None and defaults:
        out["default"] = f.default
    if f.help:
        out["description"] = f.help
    out.update(OVERRIDES.get(f.name, {}))
    return out


def input_schema(fields: Mapping[str, S.Field], *, required: Iterable[str] = (),
                 extra: Mapping[str, Schema] = (), defaults: bool = True) -> Schema:  # type: ignore[assignment]
    """A tool's ``inputSchema``: the table's fields plus ``extra`` tool-only arguments."""
    props = {name: field_schema(f, defaults=defaults) for name, f in fields.items()}
    props.update(dict(extra))
    return {"type": "object", "properties": props, "required": list(required), "additionalProperties": False}


def output_schema(fields: Mapping[str, S.Field], *, drop: Iterable[str] = ()) -> Schema:
    """A result record's schema (every field present, as the engine's dataclasses always are)."""
    props = {name: field_schema(f) for name, f in fields.items() if name not in set(drop)}
    return {"type": "object", "properties": props, "required": list(props)}
