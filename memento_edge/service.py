"""The rules every face shares above :class:`~memento_edge.memory.Memory`: what a running service adds.

A long-running service (REST, MCP) has a memory governor and clients that retry; the CLI has neither.
So two rules live here, once, for every face to call:

- **admission and degradation under memory pressure**: work that embeds is admitted by the
  :class:`~memento_edge.governor.Governor` (``Busy`` when memory is critically high), except that
  hybrid and vector recall are then answered by keyword - with a ``note`` saying why - instead of
  refused, the way the engine degrades when the model is missing;
- **background writes are not shed by memory pressure**: with background embedding (``Memory.background``)
  a write never runs the model, so memory pressure does not refuse it; the backlog worker embeds later.
  What they may owe is bounded: once ``BACKLOG_MAX_PENDING`` memories wait for their vectors, writes are
  shed (``Busy``) until the worker catches up;
- **idempotent create**: a retried create with the same key (per caller) and the same request returns
  the first answer; the same key with another request is a :class:`~memento_edge.errors.Conflict`.

Nothing here knows about HTTP: results are engine dataclasses and plain dicts.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ContextManager, Dict, Iterable, List, Mapping, Sequence

from .errors import Busy, Conflict, EmbedTimeout
from .governor import HARD, Governor
from .schema import MAX_BATCH_ITEMS

if TYPE_CHECKING:
    from .memory import ImportResult, Memory, MemoryRecord, RecallResult, RememberResult

_NEEDS_MODEL = ("hybrid", "vector")


@dataclass
class Created:
    """The answer to a create: ``payload`` is one RememberResult dict, or ``{"items": [...]}`` for a batch."""

    payload: Dict[str, Any]
    created: bool        # at least one memory is new (False: all were already stored)
    replayed: bool = False  # the stored answer to an earlier request with the same idempotency key


# Background writes never wait for the model, so clients writing faster than the worker embeds (four sending
# maximum batches) would grow the backlog until the disk is full (issue #14, item 4). Four maximum batches
# are owed at most (on a Pi Zero W, ~1 h of embedding); then writes are shed until the worker catches up.
BACKLOG_MAX_PENDING = 4 * MAX_BATCH_ITEMS
BACKLOG_RETRY_S = 30.0


class Service:
    """A Memory and the governor of the process that serves it (thread-safe, like Memory)."""

    def __init__(self, memory: "Memory", governor: Governor) -> None:
        self.memory = memory
        self.governor = governor
        # Striped locks serialise requests that share an idempotency key (check-then-act race).
        self._idem_locks = [threading.Lock() for _ in range(64)]

    # --- writes ------------------------------------------------------------------------------------
    def remember(self, items: Sequence[Mapping[str, Any]], *, batch: bool) -> Created:
        """Store ``items`` (a batch, or one memory when ``batch`` is False); Busy under memory pressure."""
        # Nothing to pace when the write does not embed (background mode).
        pace = self.governor.pace if batch and not self.memory.background else None
        with self._write_admission():
            # remember_many, not remember: it also takes created_at (remember() has no such argument).
            # The governor paces long batches (progress callback between write batches).
            results: List["RememberResult"] = self.memory.remember_many(list(items), progress=pace)
        out = [r.to_dict() for r in results]
        return Created({"items": out} if batch else out[0], any(r.created for r in results))

    def remember_once(self, items: Sequence[Mapping[str, Any]], *, batch: bool, key: str, request: Any,
                      owner: str = "", key_field: str = "Idempotency-Key") -> Created:
        """:meth:`remember`, at most once per ``(owner, key)``: a retry with the same ``request`` (any
        JSON-able value, compared by content) gets the first answer, another request a Conflict naming
        ``key_field`` (where the face took the key from: REST's header, MCP's argument). One key space for
        every face, so a retry through either finds the first answer."""
        # Keys are per owner (two agents may pick the same key); hashed so the stored key has a fixed
        # length whatever the owner's name and the key's length.
        scoped_key = hashlib.sha256(f"{owner}\0{key}".encode("utf-8")).hexdigest()
        request_hash = hashlib.sha256(
            json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        ).hexdigest()
        with self._idem_locks[hash(scoped_key) % len(self._idem_locks)]:
            stored = self.memory.idempotency_get(scoped_key)
            if stored is not None:
                stored_hash, stored_status, stored_body = stored
                if stored_hash != request_hash:
                    raise Conflict(f"this {key_field} was already used with a different request body",
                                   field=key_field)
                return Created(json.loads(stored_body), stored_status == 201, replayed=True)
            created = self.remember(items, batch=batch)
            # Stored with the HTTP status it was first answered with (201 created, 200 already stored).
            self.memory.idempotency_put(scoped_key, request_hash, 201 if created.created else 200,
                                        json.dumps(created.payload, separators=(",", ":")))
        return created

    def update(self, memory_id: int, **changes: Any) -> "MemoryRecord":
        """Change fields of a memory; a new text is embedded, so it is admitted by the governor."""
        if "text" not in changes:
            return self.memory.update(memory_id, **changes)
        with self._write_admission():
            return self.memory.update(memory_id, **changes)

    def _write_admission(self) -> ContextManager[Any]:
        """The governor's admission for a write (every face). A background-mode write never touches the
        model, so memory pressure does not refuse it (the worker embeds when memory allows); a full
        backlog does."""
        if self.memory.background:
            owed = self.memory.backlog_owed()
            if owed >= BACKLOG_MAX_PENDING:
                raise Busy(f"{owed:,} memories still wait for their embedding; retry once the backlog drains",
                           retry_after=BACKLOG_RETRY_S)
            return contextlib.nullcontext()
        return self.governor.embedding()

    def import_jsonl(self, lines: Iterable[str]) -> "ImportResult":
        """Import JSONL lines (as export writes them); admitted by the governor when it embeds."""
        with self._write_admission():
            return self.memory.import_jsonl(lines, progress=None if self.memory.background else self.governor.pace)

    # --- recall ------------------------------------------------------------------------------------
    def recall(self, **kwargs: Any) -> "RecallResult":
        """``Memory.recall``; under memory pressure hybrid/vector recall is answered by keyword."""
        mode = kwargs.get("mode", "hybrid")
        if mode not in _NEEDS_MODEL:
            return self.memory.recall(**kwargs)  # keyword (or an invalid mode: the engine says so)
        try:
            with self.governor.embedding():
                return self.memory.recall(**kwargs)
        except Busy as exc:
            if isinstance(exc, EmbedTimeout) or self.governor.state != HARD:
                raise
            return self._by_keyword([kwargs])[0]

    def recall_many(self, queries: Sequence[Mapping[str, Any]]) -> List["RecallResult"]:
        """``Memory.recall_many``, degrading like :meth:`recall` under memory pressure."""
        if not any(q.get("mode", "hybrid") != "keyword" for q in queries):
            return self.memory.recall_many(queries)
        if self.governor.state == HARD:
            return self._by_keyword(queries)
        with self.governor.embedding():
            return self.memory.recall_many(queries)

    def _by_keyword(self, queries: Sequence[Mapping[str, Any]]) -> List["RecallResult"]:
        # Under memory pressure recall is not shed but answered by keyword, like the engine does when
        # the model is missing: the agent still gets results, and the reason.
        results = self.memory.recall_many([dict(q, mode="keyword") if q.get("mode", "hybrid") in _NEEDS_MODEL
                                           else q for q in queries])
        for q, r in zip(queries, results):
            mode = q.get("mode", "hybrid")
            if mode in _NEEDS_MODEL:
                r.note = f"{mode} recall unavailable under memory pressure, answered by keyword"
        return results
