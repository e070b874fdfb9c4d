"""The one orchestrator: remember / recall / get / update / delete / ... .

The CLI and the web layer call this and nothing below it. It validates input (raising
:class:`~memento_edge.errors.InvalidInput` naming the field), asks the embedder for vectors *outside*
the database write lock, and hands rows to the store.
"""
from __future__ import annotations

import json
import logging
import math
import threading
import time
import unicodedata
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, cast

import numpy as np

from . import fusion
from . import store as _store
from .budget import WorkBudget, estimate_tokens
from .backlog import BATCH, COMMIT_S, MAX_ATTEMPTS, TRANSIENT, EmbedWorker, QueryFirst, WorkerStopping, embed_one
from .clock import ClockReading, ClockSource, SystemClock
from .config import Settings
from .governor import malloc_trim
from .errors import (
    Busy, InvalidInput, MementoError, ModelMismatch, ModelUnavailable, NotFound, StoreError,
)
from .schema import (
    CREATE_FIELDS, FILTER_FIELDS, INT64_MAX, MAX_BATCH_QUERIES, MAX_LIST_LIMIT, MAX_METADATA_CHARS,
    MAX_METADATA_DEPTH, MAX_METADATA_KEY_CHARS, MAX_NAME_CHARS, MAX_QUERY_CHARS, MAX_TAG_CHARS, MAX_TAGS,
    MAX_SCORE, MAX_TEXT_CHARS, MAX_TIMESTAMP, MAX_TOPK, MIN_SCORE, MIN_TIMESTAMP, MODES, UNTRUSTED_TIME, iso_seconds,
)

# The field names and limits live in schema.py (one table for the engine, the web layer and OpenAPI).
FILTER_KEYS = tuple(FILTER_FIELDS)
# How often (s) a process re-checks for untrusted rows another process (the CLI beside the service) wrote.
CLOCK_RECHECK_S = 60.0
ITEM_KEYS = tuple(CREATE_FIELDS)
# Hybrid recall scores each side's candidates by the strength of both retrievers' evidence (fusion.py).
# Candidates per side are a multiple of topk so a memory ranked modestly by both can still surface.
HYBRID_POOL = 50
# The min-max fusion hybrid recall used before fusion.py; kept for bench/fusion_cv.py's comparison.
HYBRID_ALPHA = 0.5
WRITE_BATCH = 64
# A mini-batch of an embedding write also stops at this many estimated tokens (16 texts at the 256-token cap):
# the governor re-checks memory, and the batch commits, every ~40 s of Pi Zero embedding instead of ~160 s.
WRITE_BATCH_TOKENS = 4096
# A write of several texts embeds them one by one; before each it yields to recall queries for at most
# this long (a query embeds in milliseconds; the bound keeps a stream of queries from starving the write).
QUERY_YIELD_S = 1.0
BULK_TRIM_EVERY = 8  # texts of a write between two malloc_trim calls (~1-10 ms each; a 256-token run ~40 ms)
# How long a write waits for room in the embedding work budget before it is shed (Busy -> 503).
WORK_WAIT_S = 1.0

Progress = Callable[[int, Optional[int]], None]
_Ranks = Tuple[Dict[int, int], Dict[int, int]]  # (vector ranks, keyword ranks) of a recall's candidates
_log = logging.getLogger(__name__)


def _iso(ts: Optional[float]) -> Optional[str]:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class MemoryRecord:
    """A stored memory."""

    id: int
    text: str
    collection: str
    tags: List[str]
    source: Optional[str]
    session_id: Optional[str]
    importance: float
    metadata: Dict[str, Any]
    created_at: str
    updated_at: str
    content_hash: str
    clock_trusted: bool
    embedding: str  # "pending" while the background worker owes its vector (schema.EMBEDDING_STATES)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "MemoryRecord":
        return cls(**_record_fields(row))

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON-ready dict (shallow: ``dataclasses.asdict`` would recurse into the metadata)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _record_fields(row: Mapping[str, Any]) -> Dict[str, Any]:
    return {
        "id": row["id"], "text": row["text"], "collection": row["collection"], "tags": list(row["tags"]),
        "source": row["source"], "session_id": row["session_id"], "importance": row["importance"],
        "metadata": _stored_metadata(row["metadata"]), "created_at": _iso(row["created_at"]),
        "updated_at": _iso(row["updated_at"]), "content_hash": row["content_hash"],
        "clock_trusted": bool(row.get("clock_trusted", True)), "embedding": row.get("embedding", "done"),
    }


def _stored_metadata(value: Any) -> Dict[str, Any]:
    """A row's metadata as every face can encode it.

    Rows written before the depth limit (or by other tools) may hold metadata nested too deeply to
    encode, or JSON the store could not parse (handed over as its text): those are shown as
    ``{"_unparsed_metadata": "<the stored JSON text>"}`` so the memory stays readable and exportable.
    """
    if isinstance(value, dict) and _depth(value) <= MAX_METADATA_DEPTH:
        return value
    if not isinstance(value, str):
        try:
            value = json.dumps(value, ensure_ascii=False)
        except (RecursionError, ValueError, TypeError):
            value = "(nested too deeply to show)"
    return {"_unparsed_metadata": value}


def _depth(value: Any, stop: int = MAX_METADATA_DEPTH) -> int:
    """Nesting depth of JSON containers in ``value`` (0 for a scalar), counted up to ``stop + 1``.

    Iterative, so any depth is safe; stopping early also ends a walk of a self-referencing object.
    """
    deepest = 0
    stack = [(value, 1)]
    while stack and deepest <= stop:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Iterable[Any] = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children)
    return deepest


@dataclass
class Hit(MemoryRecord):
    """A recalled memory with its score and the ranks each retriever gave it (1-based, None = not found).

    ``score`` orders the hits: in hybrid mode a 0..1 score that means the same in every query (how
    likely the memory is what was asked for, see fusion.py), in vector mode the cosine, in keyword mode
    the matched share of the query's keyword weight (0..1). ``similarity`` is the cosine to the query
    (None in keyword mode); ``matched_terms`` the query's keyword terms the memory contains (None in
    vector mode).
    """

    score: float = 0.0
    similarity: Optional[float] = None
    matched_terms: Optional[List[str]] = None
    vector_rank: Optional[int] = None
    keyword_rank: Optional[int] = None


@dataclass
class RememberResult:
    """Outcome of storing one memory: ``created`` is False when an existing memory was returned instead.

    ``embedding`` is ``"done"`` once the memory has its vector, ``"pending"`` while the background worker
    owes it (keyword recall finds it already; vector recall once it is embedded).
    """

    id: int
    created: bool
    duplicate_of: Optional[int] = None
    embedding: str = "done"

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class RecallResult:
    """Hits of one recall; ``mode`` is the mode actually used (``note`` says why when it differs)."""

    query: str
    mode: str
    hits: List[Hit]
    took_ms: float
    note: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        return {"query": self.query, "mode": self.mode, "hits": [h.to_dict() for h in self.hits],
                "took_ms": round(self.took_ms, 3), "note": self.note}


@dataclass
class Page:
    """One page of ``recent``; pass ``next_cursor`` back to get the next (None = no more)."""

    items: List[MemoryRecord]
    next_cursor: Optional[str]

    def to_dict(self) -> Dict[str, Any]:
        return {"items": [i.to_dict() for i in self.items], "next_cursor": self.next_cursor}


@dataclass
class ImportResult:
    """Outcome of a JSONL import: counts plus the first errors (line number, message)."""

    imported: int = 0
    duplicates: int = 0
    errors: List[Tuple[int, str]] = field(default_factory=list)
    error_count: int = 0

    def to_dict(self) -> Dict[str, Any]:
        return {"imported": self.imported, "duplicates": self.duplicates, "error_count": self.error_count,
                "errors": [{"line": n, "message": m} for n, m in self.errors]}


class Memory:
    """Persistent semantic memory: a database plus an embedding model. Thread-safe; a context manager.

    ``embedder`` defaults to the real model from ``settings.model_path`` (loaded lazily on first use);
    tests pass a fake one.
    """

    def __init__(self, settings: Optional[Settings] = None, *, embedder: Any = None,
                 vector_backend: Optional[str] = None, clock: Optional[ClockSource] = None) -> None:
        self.settings = settings or Settings.load()
        if embedder is None:
            from .embedder import make_embedder  # lazy: onnxruntime is heavy and optional on armv6

            embedder = make_embedder(self.settings)
        self.embedder = embedder
        self.store = _store.Store(self.settings.db_path, dim=int(getattr(embedder, "dim", 384)),
                                  synchronous=self.settings.synchronous,
                                  vector_backend=vector_backend or self.settings.vector_backend)
        self._fp_lock = threading.Lock()
        self._fingerprint_ok: Optional[bool] = None
        self.clock: ClockSource = clock or SystemClock(self.settings.clock)
        self._clock_lock = threading.Lock()
        self._clock_checked_at: Optional[float] = None  # monotonic time of the last untrusted-rows check
        self.clock_corrections = 0  # rows re-dated by this process (a /metrics counter)
        # Embedding work in flight, in estimated tokens, shared by every face (budget.py).
        self.work = WorkBudget(self.settings.work_token_budget)
        self.background = self.settings.embed_background
        self.query_first = QueryFirst()
        self._worker: Optional[EmbedWorker] = None
        self._worker_lock = threading.Lock()

    # --- lifecycle -------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the background worker (work done is committed) and close the database."""
        if self._worker is not None:
            self._worker.stop()
        self.store.close()

    def __enter__(self) -> "Memory":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- model consistency -------------------------------------------------------------------------
    def _check_fingerprint(self) -> None:
        """Refuse to mix vectors of two models: the DB records the model it was embedded with."""
        if self._fingerprint_ok:
            return
        with self._fp_lock:
            fp = self.embedder.fingerprint  # raises ModelUnavailable when the model is missing
            stored = self.store.meta_get("model_fingerprint")
            if stored is None:
                self.store.meta_set("model_fingerprint", fp)
            elif stored != fp:
                raise ModelMismatch(
                    "this database was embedded with another model (fingerprint "
                    f"{stored[:12]}..., current model {fp[:12]}...); run `memento-edge reindex` to re-embed it")
            self._fingerprint_ok = True

    def _vectors(self, texts: Sequence[str]) -> np.ndarray:
        self._check_fingerprint()
        if self.store.vector is None:
            raise StoreError("this database's vectors need sqlite-vec, which cannot be loaded here")
        if len(texts) > 1:
            return self._bulk_vectors(list(texts))
        with self.query_first.foreground():  # someone is waiting for these: the worker yields
            return np.asarray(self.embedder.embed_batch(list(texts)), dtype=np.float32)

    def _bulk_vectors(self, texts: List[str]) -> np.ndarray:
        """The vectors of a write's many texts, one text at a time, recall queries first.

        Before each text the write waits (at most ``QUERY_YIELD_S``) while a recall query embeds, so a
        large batch delays a query by at most the one text in flight. Every ``BULK_TRIM_EVERY`` texts the
        heap the runs freed goes back to the kernel: glibc keeps ~10 MB after each 256-token run, and the
        fragments of many runs and concurrent recalls pile up over a long batch (issue #14, item 4).
        """
        vectors = []
        for n, text in enumerate(texts, 1):
            self.query_first.wait_for_queries(QUERY_YIELD_S)
            with self.query_first.foreground():  # the background worker yields to inline writes too
                vectors.append(np.asarray(self.embedder.embed_batch([text])[0], dtype=np.float32))
            if n % BULK_TRIM_EVERY == 0:
                malloc_trim()
        return np.stack(vectors)

    # --- clock guard ------------------------------------------------------------------------------
    def _clock_reading(self) -> ClockReading:
        """Read the clock; once it is trusted, first re-date rows stamped earlier in this boot."""
        reading = self.clock.read()
        if not reading.trusted:
            self._clock_checked_at = None  # rows stamped now will need a check once trusted
            return reading
        mono = time.monotonic()
        if self._clock_checked_at is not None and mono - self._clock_checked_at < CLOCK_RECHECK_S:
            return reading
        if self.store.read_only is not None:
            return reading  # re-dating is a write: it waits until the disk takes writes again
        with self._clock_lock:
            self._clock_checked_at = mono
            if reading.boot_id is not None and self.store.untrusted_clock_count(reading.boot_id):
                fixed = self.store.correct_clock(reading)
                self.clock_corrections += fixed
                _log.warning("clock is trusted again: re-dated %d memories stored while it was not", fixed)
        return reading

    def clock_state(self) -> Dict[str, Any]:
        """The clock's trust, where it comes from, and the memories whose time is still unverified."""
        self._clock_reading()
        return {**self.clock.state(), "untrusted_memories": self.store.untrusted_clock_count(),
                "corrected": self.clock_corrections}

    # --- writes ------------------------------------------------------------------------------------
    def remember(self, text: str, *, collection: str = "default", tags: Sequence[str] = (),
                 source: Optional[str] = None, session_id: Optional[str] = None, importance: float = 0.5,
                 metadata: Optional[Mapping[str, Any]] = None) -> RememberResult:
        """Store one memory durably and return its id (an identical text in the collection is reused)."""
        item = {"text": text, "collection": collection, "tags": tags,
                "source": source, "session_id": session_id, "importance": importance, "metadata": metadata}
        return self.remember_many([item])[0]

    def remember_many(self, items: Iterable[Mapping[str, Any]],
                      progress: Optional[Progress] = None) -> List[RememberResult]:
        """Store many memories: validated first, embedded in mini-batches, committed once per batch."""
        given = list(items)
        # Budgeted before validation: a request over the budget costs no more than this estimate.
        texts = (it.get("text") if isinstance(it, Mapping) else None for it in given)
        tokens = estimate_tokens((t for t in texts if isinstance(t, str)), self.settings.max_tokens)
        tokens = 0 if self.background else tokens  # a background write never runs the model
        results: List[RememberResult] = []
        # ``progress`` runs between mini-batches: the web layer's memory governor can stop a long batch there.
        with self.work.take(tokens, wait=WORK_WAIT_S):
            clean = [_validate_item(it, prefix=f"items[{i}]." if len(given) > 1 else "")
                     for i, it in enumerate(given)]
            for batch in self._write_batches(clean):
                results.extend(self._remember_batch(batch))
                if progress is not None:
                    progress(len(results), len(clean))
        return results

    def _write_batches(self, items: List[Dict[str, Any]]) -> Iterator[List[Dict[str, Any]]]:
        """Mini-batches of at most WRITE_BATCH items and, when they are embedded now, WRITE_BATCH_TOKENS."""
        budget = 0 if self.background else WRITE_BATCH_TOKENS
        batch: List[Dict[str, Any]] = []
        tokens = 0
        for item in items:
            cost = estimate_tokens((item["text"],), self.settings.max_tokens) if budget else 0
            if batch and (len(batch) >= WRITE_BATCH or (budget and tokens + cost > budget)):
                yield batch
                batch, tokens = [], 0
            batch.append(item)
            tokens += cost
        if batch:
            yield batch

    def _tokens(self, items: Sequence[Mapping[str, Any]]) -> int:
        if self.background:
            return 0  # the backlog worker embeds later, outside any request's budget
        return estimate_tokens((it["text"] for it in items), self.settings.max_tokens)

    def _remember_batch(self, batch: List[Dict[str, Any]]) -> List[RememberResult]:
        out = self._remember_pending(batch) if self.background else self._remember_embedded(batch)
        dups = [r.id for r in out if not r.created]
        owed = self.store.pending_ids(dups) if dups else set()
        for r in out:
            if not r.created:
                r.embedding = "pending" if r.id in owed else "done"
        return out

    def _remember_pending(self, batch: List[Dict[str, Any]]) -> List[RememberResult]:
        """Background mode: commit rows, tags and keyword index now; the vectors are owed (backlog.py)."""
        out: List[RememberResult] = []
        seen: Dict[Tuple[str, str], int] = {}
        stamp = self._clock_reading()
        with self.store.writer() as conn:
            for item in batch:
                key = (item["collection"], item["text"])
                dup = seen.get(key) or self.store.find_duplicate(conn, *key)
                if dup is not None:
                    out.append(RememberResult(id=dup, created=False, duplicate_of=dup))
                    continue
                mid = self.store.insert(conn, item, None, stamp)
                seen[key] = mid
                out.append(RememberResult(id=mid, created=True, embedding="pending"))
            # queued_at is for the backlog's age only: the wall clock, trusted or not.
            self.store.enqueue(conn, [r.id for r in out if r.created], time.time())
        self._wake_worker()
        return out

    def _remember_embedded(self, batch: List[Dict[str, Any]]) -> List[RememberResult]:
        # Exact duplicates need no embedding: find them first (re-checked under the write lock below).
        with self.store.reader() as conn:
            existing = [self.store.find_duplicate(conn, it["collection"], it["text"]) for it in batch]
        todo = [i for i, e in enumerate(existing) if e is None]
        vectors = self._vectors([batch[i]["text"] for i in todo]) if todo else None
        vec_of = {i: vectors[n] for n, i in enumerate(todo)} if vectors is not None else {}
        near = self._near_duplicates(batch, vec_of) if self.settings.dedupe_threshold > 0 else {}
        out: List[RememberResult] = []
        seen: Dict[Tuple[str, str], int] = {}
        stamp = self._clock_reading()
        with self.store.writer() as conn:
            for i, item in enumerate(batch):
                key = (item["collection"], item["text"])
                dup = seen.get(key) or self.store.find_duplicate(conn, *key)
                if dup is not None:
                    out.append(RememberResult(id=dup, created=False, duplicate_of=dup))
                    continue
                if i in near:
                    out.append(RememberResult(id=near[i], created=False, duplicate_of=near[i]))
                    continue
                mid = self.store.insert(conn, item, vec_of[i], stamp)
                seen[key] = mid
                out.append(RememberResult(id=mid, created=True))
        return out

    def _near_duplicates(self, batch: List[Dict[str, Any]], vec_of: Dict[int, np.ndarray]) -> Dict[int, int]:
        found: Dict[int, int] = {}
        for i, vec in vec_of.items():
            hits = self.store.vector_search(vec, 1, {"collection": batch[i]["collection"]})
            if hits and hits[0][1] >= self.settings.dedupe_threshold:
                found[i] = hits[0][0]
        return found

    def update(self, memory_id: int, *, text: Optional[str] = None, collection: Optional[str] = None,
               tags: Optional[Sequence[str]] = None, source: Optional[str] = None,
               session_id: Optional[str] = None, importance: Optional[float] = None,
               metadata: Optional[Mapping[str, Any]] = None) -> MemoryRecord:
        """Change fields of a memory (a new text is re-embedded); returns the updated record."""
        memory_id = _validate_id(memory_id)
        given = {k: v for k, v in {"text": text, "collection": collection, "tags": tags, "source": source,
                                   "session_id": session_id, "importance": importance,
                                   "metadata": metadata}.items() if v is not None}
        if not given:
            raise InvalidInput("nothing to update: give at least one field", field="body")
        clean = _validate_item({"text": "x", **given}, partial=True)
        fields = {k: clean[k] for k in given if k != "tags"}
        new_text = "text" in given
        vector = self._vectors([clean["text"]])[0] if new_text and not self.background else None
        now = self._clock_reading().wall
        with self.store.writer() as conn:
            if not self.store.update(conn, memory_id, fields, clean.get("tags") if "tags" in given else None,
                                     vector, now):
                raise NotFound(f"no memory with id {memory_id}", field="id")
            if new_text and self.background:
                # The old vector describes the old text: drop it and owe one for the new text.
                self.store.drop_vector(conn, memory_id)
                self.store.enqueue(conn, [memory_id], time.time())
            elif new_text:
                self.store.unqueue(conn, [memory_id])  # an in-flight embedding of the old text is discarded
        if new_text and self.background:
            self._wake_worker()
        return self.get(memory_id)

    def delete(self, memory_id: int) -> None:
        """Delete a memory (its vector and full-text entry too); NotFound when absent."""
        memory_id = _validate_id(memory_id)
        if not self.store.delete(memory_id):
            raise NotFound(f"no memory with id {memory_id}", field="id")

    # --- reads -------------------------------------------------------------------------------------
    def get(self, memory_id: int) -> MemoryRecord:
        """One memory by id; NotFound when absent."""
        memory_id = _validate_id(memory_id)
        row = self.store.get(memory_id)
        if row is None:
            into = self.store.merged_into(memory_id)
            if into is not None:
                raise NotFound(f"memory {memory_id} was merged into memory {into} as a near-duplicate",
                               field="id")
            raise NotFound(f"no memory with id {memory_id}", field="id")
        return MemoryRecord.from_row(row)

    def recent(self, collection: Optional[str] = None, limit: int = 20,
               cursor: Optional[str] = None) -> Page:
        """Newest memories first, paginated by an opaque cursor."""
        if collection is not None:
            collection = _name(collection, "collection", required=True, label=True)
        limit = _int(limit, "limit", 1, MAX_LIST_LIMIT)
        before = None
        if cursor not in (None, ""):
            try:
                before = int(str(cursor))
            except ValueError:
                raise InvalidInput("cursor is not one this service issued", field="cursor") from None
            if not 0 < before <= INT64_MAX:
                raise InvalidInput("cursor is not one this service issued", field="cursor")
        self._clock_reading()
        rows = self.store.recent(collection, limit + 1, before)
        more = len(rows) > limit
        rows = rows[:limit]
        return Page([MemoryRecord.from_row(r) for r in rows], str(rows[-1]["id"]) if more and rows else None)

    def count(self, filters: Optional[Mapping[str, Any]] = None) -> int:
        """Number of memories matching ``filters``."""
        flt = _validate_filters(filters)
        self._clock_reading()
        return self.store.count(flt)

    def recall(self, query: str, *, topk: int = 5, mode: str = "hybrid",
               filters: Optional[Mapping[str, Any]] = None, min_score: Optional[float] = None) -> RecallResult:
        """The ``topk`` memories most relevant to ``query``; filters always yield a full top-k if possible.

        ``min_score`` drops hits scoring below it (see :class:`Hit` for what the score means per mode), so
        "nothing relevant" is an empty list rather than the least bad ``topk``.
        When the model is missing, mismatched or times out, vector and hybrid recall fall back to keyword
        recall and say so in ``RecallResult.mode`` / ``note`` instead of failing.
        """
        t0 = time.perf_counter()
        query = _text(query, "query", MAX_QUERY_CHARS)
        topk = _int(topk, "topk", 1, MAX_TOPK)
        if mode not in MODES:
            raise InvalidInput(f"mode must be one of {', '.join(MODES)}", field="mode")
        floor = None if min_score is None else _number(min_score, "min_score", MIN_SCORE, MAX_SCORE)
        flt = _validate_filters(filters)
        self._clock_reading()  # time filters must see re-dated rows
        note = None
        qvec = None
        if mode != "keyword":
            try:
                self._check_fingerprint()
                if self.store.vector is None:
                    raise StoreError("sqlite-vec is not available on this machine")
                with self.query_first.foreground(query=True):  # background and bulk writes park meanwhile
                    qvec = np.asarray(self.embedder.embed(query), dtype=np.float32)
            except (ModelUnavailable, ModelMismatch, Busy, StoreError) as exc:
                note = f"{mode} recall unavailable, answered by keyword: {exc}"
                mode = "keyword"
        ranks: _Ranks = ({}, {})
        try:
            if mode == "vector":
                assert qvec is not None  # embedded above, or the mode fell back to keyword
                vec_hits = self.store.vector_search(qvec, topk, flt)
                scored = [fusion.Scored(i, s, s, 0.0, ()) for i, s in vec_hits]
                ranks = (_ranks(vec_hits), {})
            elif mode == "keyword":
                scored, ranks = self._keyword_recall(query, topk, flt)
            else:
                assert qvec is not None
                scored, ranks = self._hybrid_recall(query, qvec, topk, flt)
        except StoreError as exc:
            if mode == "keyword":
                raise
            # A damaged vector index must not take recall down with it: `check` names it, reindex repairs it.
            note = f"{mode} recall unavailable, answered by keyword: {exc}"
            mode = "keyword"
            scored, ranks = self._keyword_recall(query, topk, flt)
        scored = [h for h in scored if floor is None or h.score >= floor][:topk]
        rows = self.store.get_many([h.id for h in scored])
        hits = [Hit(**_record_fields(rows[h.id]), score=h.score,
                    similarity=None if mode == "keyword" else h.similarity,
                    matched_terms=None if mode == "vector" else list(h.matched),
                    vector_rank=ranks[0].get(h.id), keyword_rank=ranks[1].get(h.id))
                for h in scored if h.id in rows]
        return RecallResult(query=query, mode=mode, hits=hits, took_ms=(time.perf_counter() - t0) * 1000, note=note)

    def _keyword_evidence(self, query: str, ids: Sequence[int]) -> fusion.KeywordEvidence:
        terms = _store.query_terms(query)
        docs, df, matched = self.store.term_matches(terms, ids)
        return fusion.KeywordEvidence([t.text for t in terms], docs, df, matched, fusion.has_exact_tokens(query))

    def _keyword_recall(self, query: str, topk: int, flt: Dict[str, Any]) -> Tuple[List[fusion.Scored], _Ranks]:
        """Keyword mode: FTS5's BM25 finds the candidates; the matched share of the query's keyword weight
        orders them (BM25 breaks ties), which keeps one common word from outranking the rare ones."""
        kw_hits = self.store.keyword_search(query, max(HYBRID_POOL, topk * 4), flt)
        ev = self._keyword_evidence(query, [i for i, _ in kw_hits])
        weights = ev.weights()
        scored = [fusion.Scored(i, fusion.coverage(ev.matched.get(i, ()), weights), 0.0,
                                fusion.coverage(ev.matched.get(i, ()), weights),
                                fusion.matched_terms(ev).get(i, ())) for i, _ in kw_hits]
        bm25 = dict(kw_hits)
        scored.sort(key=lambda h: (-h.score, -bm25[h.id], h.id))
        return scored, ({}, _ranks(kw_hits))

    def _hybrid_recall(self, query: str, qvec: np.ndarray, topk: int,
                       flt: Dict[str, Any]) -> Tuple[List[fusion.Scored], _Ranks]:
        """Hybrid mode: both sides' candidates, each scored from its cosine and keyword coverage."""
        pool = max(HYBRID_POOL, topk * 4)
        # The approximate pass (within ~1e-3 of exact) is enough to score the vector side's pool; the
        # keyword side's extra candidates and the hits shown get exact cosines.
        vec_hits = self.store.vector_search(qvec, pool, flt, exact=False)
        kw_hits = self.store.keyword_search(query, pool, flt)
        sims = dict(vec_hits)
        extra = [i for i, _ in kw_hits if i not in sims]
        if extra:
            found = self.store.approx_similarities(qvec, extra)
            # a memory without a vector yet (e.g. still waiting to be embedded) scores by its words alone
            sims.update({i: found.get(i, 0.0) for i in extra})
        near = self.store.session_neighbours(list(sims), flt)
        context = [n for n in near if n not in sims]
        if context:  # dialogue context: the turns next to a candidate in its session (fusion.fuse)
            found = self.store.approx_similarities(qvec, context)
            sims.update({i: found.get(i, 0.0) for i in context})
        ev = self._keyword_evidence(query, list(sims))
        # Rank a margin on approximate cosines, then score the shown hits on exact ones.
        top = fusion.fuse(sims, ev, limit=topk + 2, neighbours=near)
        exact = self.store.exact_similarities(qvec, [h.id for h in top])
        sims.update({h.id: exact.get(h.id, h.similarity) for h in top})
        scored = fusion.fuse(sims, ev, neighbours=near, only=[h.id for h in top])
        return scored, (_ranks(vec_hits), _ranks(kw_hits))

    def recall_many(self, queries: Sequence[Mapping[str, Any]]) -> List[RecallResult]:
        """Several recalls (each a dict of ``recall``'s arguments)."""
        if not isinstance(queries, (list, tuple)) or not queries:
            raise InvalidInput("queries must be a non-empty list", field="queries")
        if len(queries) > MAX_BATCH_QUERIES:
            raise InvalidInput(f"at most {MAX_BATCH_QUERIES} queries per batch", field="queries")
        out = []
        for n, q in enumerate(queries):
            if not isinstance(q, Mapping):
                raise InvalidInput("each query must be an object", field=f"queries[{n}]")
            unknown = set(q) - {"query", "topk", "mode", "filters", "min_score"}
            if unknown:
                raise InvalidInput(f"unknown field {sorted(unknown)[0]!r}", field=f"queries[{n}].{sorted(unknown)[0]}")
            out.append(self.recall(cast(str, q.get("query")), topk=q.get("topk", 5), mode=q.get("mode", "hybrid"),
                                   filters=q.get("filters"), min_score=q.get("min_score")))
        return out

    def stats(self) -> Dict[str, Any]:
        """Database, model and cache statistics (does not load the model)."""
        info = self.store.stats()
        try:
            emb = self.embedder.stats()
        except MementoError as exc:  # pragma: no cover - defensive
            emb = {"error": str(exc)}
        info["embedder"] = emb
        info["clock"] = self.clock_state()
        info["backlog"] = self.backlog_state()
        try:
            fp = self.embedder.fingerprint
            info["model_state"] = "loaded" if self.embedder.loaded else "cold"
            info["model_matches_db"] = info["model_fingerprint"] in (None, fp)
        except ModelUnavailable as exc:
            info["model_state"] = "missing"
            info["model_error"] = str(exc)
        return info

    # --- idempotency (web layer) ------------------------------------------------------------------
    def idempotency_get(self, key: str) -> Optional[Tuple[str, int, str]]:
        """(request_hash, status, body) stored for an Idempotency-Key, or None."""
        return self.store.idempotency_get(cast(str, _name(key, "Idempotency-Key", required=True)))

    def idempotency_put(self, key: str, request_hash: str, status: int, body: str) -> None:
        """Remember the first answer given to an Idempotency-Key (kept 24 h)."""
        self.store.idempotency_put(cast(str, _name(key, "Idempotency-Key", required=True)), request_hash, status,
                                   body)

    # --- bulk and maintenance ---------------------------------------------------------------------
    def export_jsonl(self, fh: IO[str], progress: Optional[Progress] = None) -> int:
        """Write every memory as one JSON object per line (no vectors: import re-embeds); returns count."""
        total = self.store.count()
        n = 0
        for rows in self.store.iter_rows():
            for row in rows:
                fh.write(_export_line(row))
                n += 1
            if progress is not None:
                progress(n, total)
        return n

    def text_repairs(self) -> int:
        """Text values read so far (this process) that were not valid UTF-8 and were shown with U+FFFD."""
        return self.store.text_decoder.repairs

    def iter_export(self) -> Iterable[str]:
        """The JSONL export as a generator of lines (for streaming HTTP responses)."""
        for rows in self.store.iter_rows():
            for row in rows:
                yield _export_line(row)

    def import_jsonl(self, lines: Iterable[str], progress: Optional[Progress] = None,
                     max_errors: int = 20) -> ImportResult:
        """Import JSONL lines (as written by export); invalid lines are skipped and reported by number.

        Streams: memory stays bounded by one write batch whatever the input size. ``id`` fields are ignored
        (new ids are assigned); ``created_at`` is kept.
        """
        result = ImportResult()
        batch: List[Dict[str, Any]] = []

        def flush() -> None:
            if not batch:
                return
            # An import streams: each mini-batch waits its turn for the work budget rather than failing.
            with self.work.take(self._tokens(batch), wait=self.settings.request_timeout, field="line"):
                done = self._remember_batch(batch)
            for r in done:
                if r.created:
                    result.imported += 1
                else:
                    result.duplicates += 1
            batch.clear()
            if progress is not None:
                progress(result.imported + result.duplicates, None)

        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                obj = _json_line(line)
                if not isinstance(obj, dict):
                    raise InvalidInput("each line must be a JSON object", field="line")
                # A memory exported with an unverified time keeps that flag: importing it must not launder it.
                untrusted = obj.get("clock_trusted") is False
                obj = {k: v for k, v in obj.items()
                       if k not in ("id", "updated_at", "content_hash", "clock_trusted", "embedding")}
                item = _validate_item(obj)
                if untrusted:
                    item["clock_untrusted"] = True
                batch.append(item)
            except (ValueError, InvalidInput) as exc:
                result.error_count += 1
                if len(result.errors) < max_errors:
                    result.errors.append((lineno, str(exc)))
                continue
            if len(batch) >= WRITE_BATCH:
                flush()
        flush()
        return result

    def backup(self, dest: Any, progress: Optional[Callable[[int, int], None]] = None) -> Path:
        """Online, verified backup to ``dest`` (safe while the service is running).

        Raises :class:`InvalidInput` when ``dest`` is the live database (or its WAL or shared-memory file):
        replacing it under the open connections would lose data.
        """
        live = self.settings.db_path.expanduser().resolve()
        target = Path(dest).expanduser().resolve()
        if target in (live, live.with_name(live.name + "-wal"), live.with_name(live.name + "-shm")):
            raise InvalidInput(f"backup destination {dest} is the live database; choose another file",
                               field="dest")
        return self.store.backup(Path(dest), progress)

    @staticmethod
    def restore(src: Any, settings: Optional[Settings] = None) -> Path:
        """Replace the configured database with the verified backup ``src`` (stop the service first)."""
        settings = settings or Settings.load()
        return _store.restore(Path(src), settings.db_path)

    def health(self) -> Dict[str, Any]:
        """Database readiness for ``/readyz``: readable, writable (free space, read-only disk), and why not."""
        return self.store.health()

    def check(self) -> Dict[str, Any]:
        """Integrity of the database, the full-text index and the vectors."""
        problems = self.store.integrity_check()
        return {"ok": not problems, "problems": problems, "memories": self.store.count()}

    def reindex(self, progress: Optional[Progress] = None, batch: int = WRITE_BATCH) -> int:
        """Re-embed every memory with the current model and record its fingerprint; returns count."""
        fp = self.embedder.fingerprint
        if self.store.vector is None:
            raise StoreError("this database's vectors need sqlite-vec, which cannot be loaded here")
        if self.store.reset_vectors_if_damaged():
            _log.warning("the vector index was damaged: recreated it empty, re-embedding every memory")
        total = self.store.count()
        done = 0
        for rows in self.store.iter_rows(batch):
            vecs = np.asarray(self.embedder.embed_batch([r["text"] for r in rows]), dtype=np.float32)
            with self.store.writer() as conn:
                self.store.put_vectors(conn, [r["id"] for r in rows], vecs)
                self.store.unqueue(conn, [r["id"] for r in rows])
            done += len(rows)
            if progress is not None:
                progress(done, total)
        self.store.meta_set("model_fingerprint", fp)
        with self._fp_lock:
            self._fingerprint_ok = True
        return done


    # --- background embedding (backlog.py) ---------------------------------------------------------
    def start_embed_worker(self, may_embed: Optional[Callable[[], bool]] = None) -> EmbedWorker:
        """Start the thread that drains the embedding backlog (``serve`` does; idempotent).

        ``may_embed``: asked before each round; False makes the worker wait (the service passes its
        memory governor's verdict)."""
        with self._worker_lock:
            if self._worker is None:
                self._worker = EmbedWorker(self, may_embed)
            self._worker.start()
            return self._worker

    def _wake_worker(self) -> None:
        if self._worker is not None:
            self._worker.wake()

    def embed_pending(self, limit: int = BATCH, pause: Optional[Callable[[], None]] = None) -> int:
        """Embed up to ``limit`` memories of the backlog, oldest first; returns how many were settled.

        Settled = vector written, or merged into a near-duplicate (see backlog.py for the order of rules).
        ``pause`` runs between texts and between layers (the worker parks there while a query embeds).
        Work is committed every ``COMMIT_S`` seconds, so a kill loses at most that much effort, never data.
        Transient failures (model missing, database busy) propagate; a text that fails otherwise is
        counted against its entry and skipped after ``MAX_ATTEMPTS``.
        """
        items = self.store.backlog_batch(limit, MAX_ATTEMPTS)
        if not items:
            return 0
        self._check_fingerprint()
        if self.store.vector is None:
            raise StoreError("this database's vectors need sqlite-vec, which cannot be loaded here")
        wait: Callable[[], None] = pause or self.query_first.wait_idle
        chunk: List[Tuple[int, int, str, np.ndarray]] = []
        settled = 0
        started = time.monotonic()
        try:
            for seq, mid, text, coll in items:
                wait()
                try:
                    vec = embed_one(self.embedder, text, wait)
                except (WorkerStopping, *TRANSIENT):
                    raise
                except Exception as exc:  # the text's own fault (or a bug): count it, move on
                    _log.warning("embedding memory %d failed: %s", mid, exc)
                    self.store.backlog_failed(seq, f"{type(exc).__name__}: {exc}")
                    continue
                chunk.append((seq, mid, coll, vec))
                if time.monotonic() - started >= COMMIT_S:
                    settled += self._settle(chunk)
                    chunk, started = [], time.monotonic()
        finally:
            if chunk:
                settled += self._settle(chunk)
        return settled

    def _settle(self, chunk: List[Tuple[int, int, str, np.ndarray]]) -> int:
        """Write a chunk of embedded backlog entries in one transaction (merging near-duplicates)."""
        merges = self._embed_time_duplicates(chunk) if self.settings.dedupe_threshold > 0 else {}
        now = time.time()
        n = 0
        with self.store.writer() as conn:
            for seq, mid, _coll, vec in chunk:
                if mid in merges:
                    n += self.store.backlog_merge(conn, seq, mid, merges[mid], now)
                else:
                    n += self.store.backlog_done(conn, seq, mid, vec)
            self.store.backlog_log(conn, n, now)
        return n

    def _embed_time_duplicates(self, chunk: List[Tuple[int, int, str, np.ndarray]]) -> Dict[int, int]:
        """Memories of ``chunk`` to merge: {id: id of its near-duplicate}, an embedded memory of the same
        collection or an earlier, kept memory of the chunk (which the index cannot see yet)."""
        found: Dict[int, int] = {}
        kept: List[Tuple[int, str, np.ndarray]] = []
        for _seq, mid, coll, vec in chunk:
            hits = [h for h in self.store.vector_search(vec, 2, {"collection": coll}) if h[0] != mid]
            best = hits[0] if hits else None
            for kid, kcoll, kvec in kept:
                sim = float(kvec @ vec)
                if kcoll == coll and (best is None or sim > best[1]):
                    best = (kid, sim)
            if best is not None and best[1] >= self.settings.dedupe_threshold:
                found[mid] = best[0]
            else:
                kept.append((mid, coll, vec))
        return found

    def backlog_owed(self) -> int:
        """Memories whose vector the backlog still owes (entries given up on after failures excluded)."""
        return self.store.backlog_owed(MAX_ATTEMPTS)

    def backlog_state(self) -> Dict[str, Any]:
        """The embedding backlog: mode, pending / failed entries, oldest age, drain rate, ETA, worker."""
        info: Dict[str, Any] = {"mode": "background" if self.background else "inline",
                                **self.store.backlog_stats(time.time(), MAX_ATTEMPTS)}
        todo = info["pending"] - info["failed"]
        rate = info["drain_per_min"]
        info["eta_s"] = 0.0 if todo == 0 else (round(todo / rate * 60.0, 1) if rate > 0 else None)
        info["worker"] = (self._worker.describe() if self._worker is not None
                          else {"state": "not running in this process", "last_error": None, "embedded": 0})
        return info


def _export_line(row: Mapping[str, Any]) -> str:
    """One memory as an export line: its record without what the importing store recomputes (content
    hash, embedding state: an import embeds, or queues, every memory anew)."""
    rec = MemoryRecord.from_row(row).to_dict()
    del rec["content_hash"], rec["embedding"]
    return json.dumps(rec, ensure_ascii=False) + "\n"


def _json_line(line: str) -> Any:
    """One JSONL line parsed; a line nested too deeply for the parser is an InvalidInput like any other."""
    try:
        return json.loads(line)
    except RecursionError:
        raise InvalidInput("the line is nested too deeply to parse", field="line") from None


# --- fusion ---------------------------------------------------------------------------------------
def _ranks(hits: Sequence[Tuple[int, float]]) -> Dict[int, int]:
    """id -> 1-based rank in one retriever's list."""
    return {i: n + 1 for n, (i, _) in enumerate(hits)}


def _minmax(hits: Sequence[Tuple[int, float]]) -> Dict[int, float]:
    if not hits:
        return {}
    values = [s for _, s in hits]
    lo, hi = min(values), max(values)
    span = hi - lo
    return {i: (s - lo) / span if span > 0 else 1.0 for i, s in hits}


def _fuse(vec_hits: Sequence[Tuple[int, float]], kw_hits: Sequence[Tuple[int, float]],
          alpha: float = HYBRID_ALPHA) -> List[Tuple[int, float]]:
    """Convex combination of each retriever's min-max-normalised scores (absent from a side = 0).

    Cosine and BM25 live on incomparable scales; normalising each pool to 0..1 makes them addable
    while keeping the size of the gaps, which reciprocal-rank fusion discards.
    """
    nv, nk = _minmax(vec_hits), _minmax(kw_hits)
    fused = ((i, alpha * nv.get(i, 0.0) + (1 - alpha) * nk.get(i, 0.0)) for i in set(nv) | set(nk))
    return sorted(fused, key=lambda kv: (-kv[1], kv[0]))


# --- validation -----------------------------------------------------------------------------------
def _text(value: Any, fname: str, limit: int) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"{fname} must be a string", field=fname)
    if not value.strip():
        raise InvalidInput(f"{fname} must not be empty", field=fname)
    if len(value) > limit:
        raise InvalidInput(f"{fname} is {len(value):,} characters; the limit is {limit:,}", field=fname)
    _encodable(value, fname)
    return _nfc(value)


def _nfc(value: str) -> str:
    """NFC form: "café" typed on a Mac (NFD) and elsewhere (NFC) must be one tag and one text."""
    return value if value.isascii() else unicodedata.normalize("NFC", value)


def _no_format_chars(value: str, fname: str) -> None:
    """Refuse invisible characters in labels: bidi overrides and zero-width characters (Unicode Cf) and
    controls (Cc) let two tags look identical, or a tag read differently from what it is."""
    if value.isascii() and value.isprintable():
        return
    for ch in value:
        if unicodedata.category(ch) in ("Cf", "Cc"):
            raise InvalidInput(f"{fname} must not contain invisible or control characters "
                               f"(U+{ord(ch):04X})", field=fname)


def _encodable(value: str, fname: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(f"{fname} is not valid Unicode (lone surrogate)", field=fname) from None


def _name(value: Any, fname: str, *, required: bool = False, limit: int = MAX_NAME_CHARS,
          label: bool = False) -> Optional[str]:
    """A short string; ``label`` (tags, collections) also refuses invisible characters."""
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"{fname} must be a non-empty string", field=fname)
    if len(value) > limit:
        raise InvalidInput(f"{fname} is longer than {limit} characters", field=fname)
    _encodable(value, fname)
    if label:
        _no_format_chars(value, fname)
    return _nfc(value)


def _int(value: Any, fname: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InvalidInput(f"{fname} must be an integer from {lo} to {hi}", field=fname)
    try:
        n = int(value)
    except ValueError:
        raise InvalidInput(f"{fname} must be an integer from {lo} to {hi}", field=fname) from None
    if not lo <= n <= hi:
        raise InvalidInput(f"{fname} must be from {lo} to {hi}", field=fname)
    return n


def _validate_id(value: Any) -> int:
    return _int(value, "id", 1, INT64_MAX)


def _number(value: Any, fname: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInput(f"{fname} must be a number from {lo} to {hi}", field=fname)
    if not lo <= value <= hi:
        raise InvalidInput(f"{fname} must be from {lo} to {hi}", field=fname)
    return float(value)


def _tags(value: Any, fname: str) -> List[str]:
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise InvalidInput(f"{fname} must be a list of strings", field=fname)
    if len(value) > MAX_TAGS:
        raise InvalidInput(f"{fname}: {len(value)} tags; the limit is {MAX_TAGS}", field=fname)
    out: List[str] = []
    for t in value:
        t = cast(str, _name(t, fname, required=True, limit=MAX_TAG_CHARS, label=True))
        if t not in out:
            out.append(t)
    return out


def _timestamp(value: Any, fname: str) -> float:
    ts = _parse_timestamp(value, fname)
    if not MIN_TIMESTAMP <= ts <= MAX_TIMESTAMP:
        raise InvalidInput(f"{fname} must be between 1970 and 9999", field=fname)
    return ts


def _parse_timestamp(value: Any, fname: str) -> float:
    if isinstance(value, bool):
        raise InvalidInput(f"{fname} must be an ISO-8601 time or Unix seconds", field=fname)
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise InvalidInput(f"{fname} must be finite", field=fname)
        return float(value)
    if isinstance(value, str):
        try:
            return iso_seconds(value)
        except ValueError:
            raise InvalidInput(f"{fname} is not an ISO-8601 time: {value[:40]!r}", field=fname) from None
    raise InvalidInput(f"{fname} must be an ISO-8601 time or Unix seconds", field=fname)


def _metadata(value: Any, fname: str) -> Dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidInput(f"{fname} must be a JSON object", field=fname)
    if _depth(dict(value)) > MAX_METADATA_DEPTH:
        raise InvalidInput(f"{fname} is nested more than {MAX_METADATA_DEPTH} levels deep", field=fname)
    try:
        encoded = json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{fname} is not JSON-serialisable: {exc}", field=fname) from None
    except RecursionError:
        raise InvalidInput(f"{fname} is nested more than {MAX_METADATA_DEPTH} levels deep", field=fname) from None
    if len(encoded) > MAX_METADATA_CHARS:
        raise InvalidInput(f"{fname} is larger than {MAX_METADATA_CHARS} characters as JSON", field=fname)
    _encodable(encoded, fname)
    return cast(Dict[str, Any], json.loads(encoded))


def _validate_item(item: Any, prefix: str = "", partial: bool = False) -> Dict[str, Any]:
    """A memory to store, checked and normalised; unknown keys are refused (never silently ignored)."""
    if not isinstance(item, Mapping):
        raise InvalidInput("a memory must be an object", field=prefix.rstrip(".") or "body")
    unknown = [k for k in item if k not in ITEM_KEYS]
    if unknown:
        raise InvalidInput(f"unknown field {unknown[0]!r}", field=prefix + str(unknown[0]))
    out: Dict[str, Any] = {
        "text": _text(item.get("text"), prefix + "text", MAX_TEXT_CHARS),
        "collection": _name(item.get("collection") if item.get("collection") is not None else "default",
                            prefix + "collection", required=True, label=True),
        "tags": _tags(item.get("tags"), prefix + "tags"),
        "source": _name(item.get("source"), prefix + "source"),
        "session_id": _name(item.get("session_id"), prefix + "session_id"),
        "importance": _number(item.get("importance", 0.5) if item.get("importance") is not None else 0.5,
                              prefix + "importance", 0.0, 1.0),
        "metadata": _metadata(item.get("metadata"), prefix + "metadata"),
    }
    if item.get("created_at") is not None and not partial:
        out["created_at"] = _timestamp(item["created_at"], prefix + "created_at")
    return out


def _validate_filters(filters: Any) -> Dict[str, Any]:
    """Filters checked and normalised; an unknown key is an error naming it (the seed ignored them)."""
    if filters is None:
        return {}
    if not isinstance(filters, Mapping):
        raise InvalidInput("filters must be an object", field="filters")
    out: Dict[str, Any] = {}
    for key, value in filters.items():
        fname = f"filters.{key}"
        if key not in FILTER_KEYS:
            raise InvalidInput(f"unknown filter {key!r}; known: {', '.join(FILTER_KEYS)}", field=fname)
        if value is None:
            continue
        if key in ("collection", "source", "session_id"):
            out[key] = _name(value, fname, required=True, label=key == "collection")
        elif key in ("tags_any", "tags_all"):
            tags = _tags(value, fname)
            if tags:
                out[key] = tags
        elif key == "min_importance":
            out[key] = _number(value, fname, 0.0, 1.0)
        elif key == "untrusted_time":
            if value not in UNTRUSTED_TIME:
                raise InvalidInput(f"{fname} must be one of {', '.join(UNTRUSTED_TIME)}", field=fname)
            out[key] = value
        elif key in ("since", "until"):
            out[key] = _timestamp(value, fname)
        elif key == "metadata":
            if not isinstance(value, Mapping):
                raise InvalidInput("filters.metadata must be an object of key: value", field=fname)
            md: Dict[str, Any] = {}
            for mk, mv in value.items():
                if not isinstance(mk, str) or not mk or len(mk) > MAX_METADATA_KEY_CHARS or any(c in mk for c in '"\\'):
                    raise InvalidInput(f"metadata filter keys must be 1-{MAX_METADATA_KEY_CHARS} characters "
                                       "without quotes or backslashes", field=f"{fname}.{mk}")
                if mv is not None and not isinstance(mv, (str, int, float, bool)):
                    raise InvalidInput("metadata filter values must be strings, numbers, booleans or null",
                                       field=f"{fname}.{mk}")
                if isinstance(mv, str):
                    _encodable(mv, f"{fname}.{mk}")
                if isinstance(mv, int) and not isinstance(mv, bool) and abs(mv) > INT64_MAX:
                    raise InvalidInput("metadata filter integers must fit in 64 bits", field=f"{fname}.{mk}")
                if isinstance(mv, float) and not math.isfinite(mv):
                    raise InvalidInput("metadata filter values must be finite", field=f"{fname}.{mk}")
                md[mk] = mv
            if md:
                out[key] = md
    return out
