"""The one description of a memory, its filters and the recall options: every field once, with its limits.

The engine (:mod:`memento_edge.memory`) validates with these limits, the web layer checks request field
types against these tables, and the OpenAPI document (:mod:`memento_edge.openapi`) is built from them, so
a limit changed here changes everywhere. Nothing here imports Flask or the store.

Wire types (``Field.type``): ``str``, ``int``, ``number``, ``bool``, ``object``, ``list[str]``,
``list[object]`` and ``time`` (an ISO-8601 string or Unix seconds).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Dict, List, Optional, Tuple

from .errors import InvalidInput

# --- limits (each enforced by the engine or the web layer; each stated in the OpenAPI document) ---
INT64_MAX = 2 ** 63 - 1            # SQLite integers (ids, cursors, JSON integers we accept)
MAX_TEXT_CHARS = 100_000
MAX_QUERY_CHARS = 1_000
MAX_TAGS = 50
MAX_TAG_CHARS = 100
MAX_NAME_CHARS = 200               # collection, source, session_id, filter strings
MAX_METADATA_CHARS = 16_000        # a memory's metadata, as JSON text
# Nesting of metadata objects/arrays: every face (JSON encoders, Python's recursion limit) copes with this
# comfortably; a ~500-deep object stored once made every read of it fail (issue #14, "poison pill").
MAX_METADATA_DEPTH = 32
MAX_METADATA_KEY_CHARS = 100       # keys of a metadata filter
DEFAULT_TOPK = 5
MAX_TOPK = 100
DEFAULT_IMPORTANCE = 0.5
DEFAULT_COLLECTION = "default"
DEFAULT_LIST_LIMIT = 20
MAX_LIST_LIMIT = 1000
MAX_BATCH_ITEMS = 1000             # memories in one POST /v1/memories batch
MAX_BATCH_QUERIES = 32             # recalls in one batch (Memory.recall_many refuses more)
MAX_IDEMPOTENCY_KEY = 200
MAX_CURSOR_DIGITS = 18             # cursors are ids written in decimal
MIN_TIMESTAMP = 0.0                # 1970-01-01T00:00:00Z
MAX_TIMESTAMP = 253402300799.0     # 9999-12-31T23:59:59Z: beyond it ISO-8601 output overflows
# min_score bounds: a hybrid score is 0..1, a vector score a cosine (-1..1).
MIN_SCORE, MAX_SCORE = -1.0, 1.0
MODES = ("hybrid", "vector", "keyword")
DEFAULT_MODE = "hybrid"
# What a filter does with memories stored while the board's clock was not trusted (clock.py): "include"
# (default) matches them by the time they were stamped with; "exclude" leaves them out.
UNTRUSTED_TIME = ("include", "exclude")
# Whether a memory has its vector (embed_mode background: "pending" until the backlog worker embeds it).
EMBEDDING_STATES = ("done", "pending")


@dataclass(frozen=True)
class Field:
    """One field: its wire type, whether null is accepted, its limits and a line of help."""

    name: str
    type: str
    help: str = ""
    nullable: bool = False
    min_length: Optional[int] = None      # strings
    max_length: Optional[int] = None      # strings (metadata: its JSON text)
    minimum: Optional[float] = None       # numbers; times in Unix seconds (also ISO-8601 strings)
    maximum: Optional[float] = None
    max_items: Optional[int] = None       # lists
    item_max_length: Optional[int] = None  # list[str] items
    max_key_length: Optional[int] = None  # keys of an object
    enum: Optional[Tuple[str, ...]] = None
    default: Any = None
    int64: bool = False                   # an integer stored by SQLite


def _table(*fields: Field) -> Dict[str, Field]:
    return {f.name: f for f in fields}


def _name(name: str, help: str = "", **kw: Any) -> Field:
    """A short identifying string: collection, source, session_id."""
    return Field(name, "str", help, min_length=1, max_length=MAX_NAME_CHARS, **kw)


def _embedding() -> Field:
    # One field, shown on records, hits and the answer to a write.
    return Field("embedding", "str", "pending: stored and found by keyword search; the background worker "
                                     "(embed_mode) has not embedded it yet, so search by meaning does not "
                                     "find it. done: it has its vector.", enum=EMBEDDING_STATES)


def _tags(name: str, help: str) -> Field:
    return Field(name, "list[str]", help, max_items=MAX_TAGS, item_max_length=MAX_TAG_CHARS)

# What a client sends to store a memory (POST) or change one (PATCH, without created_at).
MEMORY_FIELDS = _table(
    Field("text", "str", "The memory itself.", min_length=1, max_length=MAX_TEXT_CHARS),
    _name("collection", "Namespace.", default=DEFAULT_COLLECTION),
    _tags("tags", "Labels; duplicates are dropped."),
    _name("source", "Where the memory came from.", nullable=True),
    _name("session_id", "The agent session that stored it.", nullable=True),
    Field("importance", "number", "How much it matters, 0..1.", minimum=0, maximum=1,
          default=DEFAULT_IMPORTANCE),
    Field("metadata", "object", "Any JSON object (at most 16,000 characters as JSON, nested at most 32 levels).",
          nullable=True,
          max_length=MAX_METADATA_CHARS),
)
CREATE_FIELDS = dict(MEMORY_FIELDS, created_at=Field(
    "created_at", "time", "When it happened: ISO-8601 or Unix seconds between 1970 and 9999; default now.",
    nullable=True, minimum=MIN_TIMESTAMP, maximum=MAX_TIMESTAMP))

# A stored memory as every face returns it (MemoryRecord).
RECORD_FIELDS = _table(
    Field("id", "int", int64=True, minimum=1, maximum=INT64_MAX),
    Field("text", "str"),
    Field("collection", "str"),
    Field("tags", "list[str]"),
    Field("source", "str", nullable=True),
    Field("session_id", "str", nullable=True),
    Field("importance", "number"),
    Field("metadata", "object"),
    Field("created_at", "str", "ISO-8601 UTC."),
    Field("updated_at", "str", "ISO-8601 UTC."),
    Field("content_hash", "str"),
    Field("clock_trusted", "bool", "false while created_at was stamped by a clock not yet verified "
                                   "(no RTC, no NTP yet); corrected and set true once it is."),
    _embedding(),
)
# A recall hit: a record plus how it ranked (Hit).
HIT_FIELDS = dict(RECORD_FIELDS, **_table(
    Field("score", "number", "Orders the hits. hybrid: 0..1, the same meaning in every query (about how "
                             "likely the memory is what was asked for); vector: the cosine; keyword: the "
                             "matched share of the query's keyword weight, 0..1."),
    Field("similarity", "number", "Cosine similarity to the query (null in keyword mode).", nullable=True),
    Field("matched_terms", "list[str]", "The query's keyword terms this memory contains (null in vector "
                                        "mode).", nullable=True),
    Field("vector_rank", "int", "1-based rank by meaning (null: not found by it).", nullable=True),
    Field("keyword_rank", "int", "1-based rank by words (null: not found by it).", nullable=True),
))
# The answer to storing one memory (RememberResult).
REMEMBER_FIELDS = _table(
    Field("id", "int", int64=True),
    Field("created", "bool", "false when the text was already stored (then id is the existing memory)."),
    Field("duplicate_of", "int", nullable=True, int64=True),
    _embedding(),
)

RECALL_FIELDS = _table(
    Field("query", "str", "What to look for.", min_length=1, max_length=MAX_QUERY_CHARS),
    Field("topk", "int", "How many hits.", minimum=1, maximum=MAX_TOPK, default=DEFAULT_TOPK),
    Field("mode", "str", "hybrid (meaning and words), vector or keyword.", enum=MODES, default=DEFAULT_MODE),
    Field("filters", "object", "Which memories to consider (see Filters).", nullable=True),
    Field("min_score", "number", "Drop hits scoring below this (see score).", nullable=True,
          minimum=MIN_SCORE, maximum=MAX_SCORE),
)

FILTER_FIELDS = _table(
    _name("collection"),
    _tags("tags_any", "At least one of these tags."),
    _tags("tags_all", "All of these tags."),
    _name("source"),
    _name("session_id"),
    Field("min_importance", "number", minimum=0, maximum=1),
    Field("since", "str", "ISO-8601 timestamp (inclusive).", minimum=MIN_TIMESTAMP, maximum=MAX_TIMESTAMP),
    Field("until", "str", "ISO-8601 timestamp (exclusive).", minimum=MIN_TIMESTAMP, maximum=MAX_TIMESTAMP),
    Field("metadata", "object", "Equality on top-level metadata keys (strings, numbers, booleans or null).",
          max_key_length=MAX_METADATA_KEY_CHARS),
    Field("untrusted_time", "str", "Memories whose time is unverified (clock_trusted false): include matches "
                                   "them by their stamped time, exclude leaves them out.",
          enum=UNTRUSTED_TIME, default="include"),
)


def wire_types(fields: Dict[str, Field]) -> Dict[str, Tuple[str, bool]]:
    """``{name: (type, nullable)}`` of a table: what the web layer checks before the engine sees a body."""
    return {name: (f.type, f.nullable) for name, f in fields.items()}


def iso_seconds(text: str) -> float:
    """Unix seconds of an ISO-8601 time (``Z`` accepted; no offset means UTC). ValueError if it is not one."""
    text = text.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        dt = datetime.fromisoformat(text)
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        return dt.timestamp()
    except OverflowError as exc:
        raise ValueError(str(exc)) from None


def _invalid(message: str, field: Optional[str]) -> Exception:
    return InvalidInput(message, field=field)


def check_wire_values(obj: Any, *, malformed: Callable[[str, Optional[str]], Exception] = _invalid,
                      in_filters: bool = False) -> None:
    """Refuse values that are valid JSON but would break below: NUL bytes, lone surrogates, huge ints, and a
    ``created_at`` outside 1970..9999 (the engine would store it and then fail to format it). Every face
    (REST bodies, MCP tool arguments) calls this on what it decoded.

    NUL characters are refused in strings that become SQLite text columns or FTS5 input (many SQLite
    string functions stop at a NUL). A memory's own ``metadata`` subtree is skipped: it is stored as
    escaped JSON text, so NULs and big numbers there are harmless (the engine checks its size and
    encoding); a ``metadata`` *filter* (below ``filters``, or everything when ``in_filters``) is checked.
    Malformed values raise ``malformed(message, field)`` (REST: a 400); the created_at range raises
    InvalidInput. Iterative (not recursive) so a deeply nested value cannot exhaust the stack here.
    """
    stack: List[Tuple[Any, str, bool]] = [(obj, "", in_filters)]  # (value, path, inside filters)
    while stack:
        value, path, filtering = stack.pop()
        if isinstance(value, str):
            _check_string(value, path, malformed)
        elif isinstance(value, bool):
            continue
        elif isinstance(value, int):
            if not -INT64_MAX - 1 <= value <= INT64_MAX:
                raise malformed("integer out of the 64-bit range", path or None)
        elif isinstance(value, dict):
            for k, v in value.items():
                if "\x00" in k:
                    raise malformed("object keys must not contain NUL characters", path or None)
                child = f"{path}.{k}" if path else k
                if k == "metadata" and not filtering:
                    continue  # stored as JSON text (see above)
                if k == "created_at":
                    _check_created_at(v, child)
                stack.append((v, child, filtering or k == "filters"))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                stack.append((v, f"{path}[{i}]", filtering))


def _check_string(value: str, path: str, malformed: Callable[[str, Optional[str]], Exception]) -> None:
    if "\x00" in value:
        raise malformed("strings must not contain NUL characters", path or None)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise malformed("strings must be valid Unicode (lone surrogate escape)", path or None) from None


def _check_created_at(value: Any, field: str) -> None:
    ts: Optional[float] = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        ts = float(value)
    elif isinstance(value, str):
        try:
            ts = iso_seconds(value)
        except ValueError:
            return  # not ISO-8601 at all: the engine says so with its own message
    if ts is not None and not MIN_TIMESTAMP <= ts <= MAX_TIMESTAMP:
        raise InvalidInput("created_at must be between 1970 and the year 9999", field=field)
