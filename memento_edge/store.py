"""All SQL lives here: connection setup, migrations, the vector index, FTS5, search and filters.

Concurrency model: one writer connection behind a lock (SQLite allows one writer anyway; the lock keeps
Python threads from queueing inside SQLite's busy handler) and a small pool of reader connections, which
WAL lets run alongside the writer. Connections are opened with ``check_same_thread=False`` but a
connection is only ever used by one thread at a time (the lock or the pool guarantees it).

Vectors live in one of two backends, fixed when the database is created and recorded in ``meta``:

* ``sqlite-vec``: a ``vec0`` virtual table (L2 distance over L2-normalised vectors, which ranks exactly
  like cosine and lets sqlite-vec use its faster L2 kernel);
* ``numpy``: a plain table of float32 BLOBs scanned in chunks with numpy - the armv6 profile, where no
  sqlite-vec build exists, and any Python whose sqlite3 cannot load extensions.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from . import migrations
from .clock import ClockReading
from .disk import DISK_FULL, DatabaseLock, disk_problem, disk_state
from .errors import Busy, InvalidInput, StorageFull, StoreError

log = logging.getLogger(__name__)

SQLITE_HEADER = b"SQLite format 3\x00"
_MAX_VEC_K = 4096  # sqlite-vec refuses larger k in a KNN query
# Below this many filter matches an exact lookup of each candidate's vector is cheaper than a KNN scan.
_EXACT_FILTER_LIMIT = 512
_NUMPY_CHUNK = 2048
# Page cache of each pooled reader connection (the writer keeps 1 MB). Recall reads a few pages per query
# and the OS caches the file anyway; at 1 MB, five readers held 3.6 MB after a full scan each vs 1.1 MB
# at 256 KiB (10k memories, measured).
READER_CACHE_KIB = 256

# Words that carry no topic: dropping them from the keyword query keeps BM25 from ranking every turn
# that says "what did you do" above the one that answers it.
_STOPWORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being below
    between both but by can could did do does doing down during each few for from further had has have
    having he her here hers herself him himself his how i if in into is it its itself just me more most my
    myself no nor not now of off on once only or other our ours ourselves out over own same she should so
    some such than that the their theirs them themselves then there these they this those through to too
    under until up very was we were what when where which while who whom why will with would you your
    yours yourself yourselves""".split()
)


def content_hash(text: str) -> str:
    """Stable hash of a memory's text (dedupe key together with the collection)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


# Keyword queries. A question's words are cut the way FTS5's unicode61 tokenizer cuts a memory (runs of
# letters and digits), with three differences that keep BM25 from matching on noise:
# - contraction tails ("what's", "won't", "we're") are dropped, not searched as the terms s/t/re, which
#   match every possessive in the store; a negated auxiliary ("don't", "won't") goes with its tail;
# - a token group joined by punctuation that looks like an identifier (192.168.1.40, AX-88213, 9:30,
#   k8s-worker-3) is searched as one FTS5 phrase, so "1" and "40" alone do not match half the store;
# - stopwords are dropped unless nothing else is left.
_CONTRACTION_TAILS = frozenset({"s", "t", "ll", "re", "ve", "d", "m"})
_NEGATED_AUX = frozenset(
    "ain aren can couldn didn doesn don hadn hasn haven isn mightn mustn needn shan shouldn wasn weren won "
    "wouldn".split()
)
_APOSTROPHES = "'\u2019\u02bc`\u00b4"
# Punctuation that joins the parts of one identifier; other punctuation inside a word only joins digits.
_ID_JOINERS = frozenset(".-_:@#")
_MAX_QUERY_TERMS = 64


@dataclass(frozen=True)
class QueryTerm:
    """One searched term of a keyword query: ``text`` as the user wrote it (lower case), ``tokens`` as
    FTS5 sees them (one token, or several searched as a phrase)."""

    text: str
    tokens: Tuple[str, ...]

    @property
    def fts(self) -> str:
        """The term as a quoted FTS5 string (a phrase when it has several tokens)."""
        return '"' + " ".join(self.tokens) + '"'


def _tokens(chunk: str) -> List[str]:
    out: List[str] = []
    current: List[str] = []
    for ch in chunk:
        if ch.isalnum():
            current.append(ch)
        elif current:
            out.append("".join(current))
            current = []
    if current:
        out.append("".join(current))
    return out


def _chunk_terms(chunk: str) -> List[QueryTerm]:
    """The terms of one whitespace-separated chunk of a query (already lower case)."""
    chunk = "".join("'" if ch in _APOSTROPHES else ch for ch in chunk)
    # Trim outer punctuation so "work:" or "(Tom's)" behave like the bare word.
    lo, hi = 0, len(chunk)
    while lo < hi and not chunk[lo].isalnum():
        lo += 1
    while hi > lo and not chunk[hi - 1].isalnum():
        hi -= 1
    chunk = chunk[lo:hi]
    if "'" in chunk:
        head, tail = chunk.rsplit("'", 1)
        if tail in _CONTRACTION_TAILS:
            if tail == "t" and head in _NEGATED_AUX:
                return []
            chunk = head
    toks = _tokens(chunk)
    if len(toks) == 1:
        return [] if toks[0] in _CONTRACTION_TAILS else [QueryTerm(toks[0], (toks[0],))]
    joined_id = any(ch in _ID_JOINERS or ch == "'" for ch in chunk) or any(ch.isdigit() for ch in chunk)
    if toks and joined_id:
        return [QueryTerm(chunk, tuple(toks))]
    return [QueryTerm(t, (t,)) for t in toks if t not in _CONTRACTION_TAILS]


def query_terms(text: str, *, keep_stopwords: bool = False) -> List[QueryTerm]:
    """The distinct keyword terms of free text, in order (see the comment above for what is dropped)."""
    seen: Dict[str, QueryTerm] = {}
    for chunk in text.lower().split():
        for term in _chunk_terms(chunk):
            seen.setdefault(" ".join(term.tokens), term)
    terms = list(seen.values())
    if not keep_stopwords:
        content = [t for t in terms if len(t.tokens) > 1 or t.tokens[0] not in _STOPWORDS]
        terms = content or terms
    return terms[:_MAX_QUERY_TERMS]


def fts_query(text: str, *, keep_stopwords: bool = False) -> Optional[str]:
    """Turn free text into a safe FTS5 query: each term quoted, OR-ed (see :func:`query_terms`).

    Quoting every term means user input can never be parsed as FTS5 syntax (``NEAR``, ``*``, ``:``, ...).
    Returns ``None`` when nothing searchable is left.
    """
    terms = query_terms(text, keep_stopwords=keep_stopwords)
    if not terms:
        return None
    return " OR ".join(t.fts for t in terms)


def _translate(exc: sqlite3.Error) -> Exception:
    msg = str(exc)
    low = msg.lower()
    if "disk is full" in low or "database or disk is full" in low:
        return StorageFull("the disk is full: nothing was written")
    if "locked" in low or "busy" in low:
        return Busy("the database is busy; retry shortly", retry_after=1.0)
    if "malformed" in low or "not a database" in low or "file is encrypted" in low:
        return StoreError(f"the database file is damaged: {msg} (run `memento-edge check`, "
                          "or `memento-edge restore` from a backup)")
    if "readonly" in low or "read-only" in low:
        return StoreError(f"the database is read-only: {msg}")
    return StoreError(f"database error: {msg}")


class _VectorIndex:
    """Interface of the two vector backends."""

    name = ""
    table = ""

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def create(self, conn: sqlite3.Connection) -> None:
        raise NotImplementedError

    def put(self, conn: sqlite3.Connection, ids: Sequence[int], vectors: np.ndarray) -> None:
        raise NotImplementedError

    def delete(self, conn: sqlite3.Connection, memory_id: int) -> None:
        raise NotImplementedError

    def count(self, conn: sqlite3.Connection) -> int:
        raise NotImplementedError

    def search(self, conn: sqlite3.Connection, query: np.ndarray, k: int,
               candidate_sql: Optional[Tuple[str, List[Any]]], candidates: Optional[int]) -> List[Tuple[int, float]]:
        """Top ``k`` ids by cosine similarity (highest first), restricted to ``candidate_sql`` if given."""
        raise NotImplementedError

    def get(self, conn: sqlite3.Connection, memory_id: int) -> Optional[np.ndarray]:
        raise NotImplementedError

    def damaged(self, conn: sqlite3.Connection) -> List[str]:
        """Problems with the stored vectors' shape (empty = ok)."""
        raise NotImplementedError

    def reset(self, conn: sqlite3.Connection) -> None:
        """Drop every vector and recreate the empty index (reindex of a damaged index)."""
        conn.execute(f"DROP TABLE IF EXISTS {self.table}")
        self.create(conn)


class _SqliteVecIndex(_VectorIndex):
    name = "sqlite-vec"
    table = "memory_vec"

    def create(self, conn: sqlite3.Connection) -> None:
        # chunk_size 64 (default 1024): a point lookup walks the overflow chain of one chunk blob, so
        # small chunks make the exact re-rank ~15x cheaper (0.5 ms -> 32 us per random id at 10k, under
        # load) at the same bytes per row and KNN speed, and an empty database is 100 KB, not 1.6 MB.
        conn.execute(f"CREATE VIRTUAL TABLE IF NOT EXISTS memory_vec USING vec0(embedding float[{self.dim}], "
                     f"chunk_size=64)")

    def put(self, conn: sqlite3.Connection, ids: Sequence[int], vectors: np.ndarray) -> None:
        # vec0 has no upsert: delete first so update() and reindex() can reuse put().
        conn.executemany("DELETE FROM memory_vec WHERE rowid = ?", [(int(i),) for i in ids])
        conn.executemany(
            "INSERT INTO memory_vec (rowid, embedding) VALUES (?, ?)",
            [(int(i), np.ascontiguousarray(v, dtype=np.float32).tobytes()) for i, v in zip(ids, vectors)],
        )

    def delete(self, conn: sqlite3.Connection, memory_id: int) -> None:
        conn.execute("DELETE FROM memory_vec WHERE rowid = ?", (memory_id,))

    def count(self, conn: sqlite3.Connection) -> int:
        return int(conn.execute("SELECT count(*) FROM memory_vec").fetchone()[0])

    def get(self, conn: sqlite3.Connection, memory_id: int) -> Optional[np.ndarray]:
        row = conn.execute("SELECT embedding FROM memory_vec WHERE rowid = ?", (memory_id,)).fetchone()
        return None if row is None else np.frombuffer(row[0], dtype=np.float32)

    def damaged(self, conn: sqlite3.Connection) -> List[str]:
        # vec0 keeps vectors in chunk blobs of `size` rows each; a blob of another length breaks every
        # KNN query over the table ("vectors blob size doesn't match").
        rows = conn.execute(
            """SELECT c.chunk_id FROM memory_vec_chunks c
               LEFT JOIN memory_vec_vector_chunks00 v ON v.rowid = c.chunk_id
               WHERE v.vectors IS NULL OR length(v.vectors) != c.size * ?
                  OR length(c.rowids) != c.size * 8 LIMIT 20""", (self.dim * 4,)).fetchall()
        return [f"vector index chunk {r[0]} is damaged (run `memento-edge reindex`)" for r in rows]

    def _knn(self, conn: sqlite3.Connection, qb: bytes, k: int) -> List[Tuple[int, float]]:
        rows = conn.execute(
            "SELECT rowid, distance FROM memory_vec WHERE embedding MATCH ? AND k = ?", (qb, k)
        ).fetchall()
        # Unit vectors: |a-b|^2 = 2 - 2cos(a,b).
        return [(int(r), 1.0 - (d * d) / 2.0) for r, d in rows]

    def search(self, conn, query, k, candidate_sql, candidates):
        qb = np.ascontiguousarray(query, dtype=np.float32).tobytes()
        if candidate_sql is None:
            return self._knn(conn, qb, min(k, _MAX_VEC_K))
        where, params = candidate_sql
        if candidates is not None and candidates <= _EXACT_FILTER_LIMIT:
            return self._exact(conn, qb, k, where, params)
        total = self.count(conn)
        # Widen the KNN until k filtered hits are found: post-filtering the nearest K overall is exact
        # as soon as K contains k matches (the seed took k first and then filtered, and came back short).
        want = max(k * 4, int(k * total / max(candidates or 1, 1) * 2))
        while True:
            kk = min(want, _MAX_VEC_K, total)
            hits = self._knn(conn, qb, kk) if kk > 0 else []
            if hits:
                ok = self._filter_ids(conn, [h[0] for h in hits], where, params)
                found = [h for h in hits if h[0] in ok]
            else:
                found = []
            if len(found) >= k or kk >= total:
                return found[:k]
            if kk >= _MAX_VEC_K:
                return self._exact(conn, qb, k, where, params)
            want = kk * 8

    @staticmethod
    def _filter_ids(conn, ids: List[int], where: str, params: List[Any]) -> set:
        marks = ",".join("?" * len(ids))
        rows = conn.execute(f"SELECT m.id FROM memories m WHERE m.id IN ({marks}) AND {where}",
                            [*ids, *params]).fetchall()
        return {r[0] for r in rows}

    @staticmethod
    def _exact(conn, qb: bytes, k: int, where: str, params: List[Any]) -> List[Tuple[int, float]]:
        ids = [r[0] for r in conn.execute(f"SELECT m.id FROM memories m WHERE {where}", params)]
        return _point_distances(conn, qb, ids)[:k]


def _point_distances(conn: sqlite3.Connection, qb: bytes, ids: Sequence[int]) -> List[Tuple[int, float]]:
    """Exact cosine of the query with each id's vector, best first.

    One ``rowid = ?`` query per id: vec0 answers a point lookup in microseconds but plans ``rowid IN
    (...)`` as a full scan (measured 8 us vs 8.6 ms for 40 ids at 10k).
    """
    out: List[Tuple[int, float]] = []
    for mid in ids:
        row = conn.execute("SELECT vec_distance_l2(embedding, ?) FROM memory_vec WHERE rowid = ?",
                           (qb, mid)).fetchone()
        if row is not None:
            d = row[0]
            out.append((int(mid), 1.0 - (d * d) / 2.0))
    out.sort(key=lambda t: (-t[1], t[0]))
    return out


class _NumpyIndex(_VectorIndex):
    name = "numpy"
    table = "memory_vectors"

    def create(self, conn: sqlite3.Connection) -> None:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS memory_vectors (id INTEGER PRIMARY KEY, embedding BLOB NOT NULL)"
        )

    def put(self, conn, ids, vectors):
        conn.executemany(
            "INSERT OR REPLACE INTO memory_vectors (id, embedding) VALUES (?, ?)",
            [(int(i), np.ascontiguousarray(v, dtype=np.float32).tobytes()) for i, v in zip(ids, vectors)],
        )

    def delete(self, conn, memory_id):
        conn.execute("DELETE FROM memory_vectors WHERE id = ?", (memory_id,))

    def count(self, conn):
        return int(conn.execute("SELECT count(*) FROM memory_vectors").fetchone()[0])

    def get(self, conn, memory_id):
        row = conn.execute("SELECT embedding FROM memory_vectors WHERE id = ?", (memory_id,)).fetchone()
        if row is None or len(row[0]) != self.dim * 4:
            return None
        return np.frombuffer(row[0], dtype=np.float32)

    def damaged(self, conn: sqlite3.Connection) -> List[str]:
        """Vectors whose blob is not ``dim`` float32s (skipped by search; `reindex` rewrites them)."""
        ids = [r[0] for r in conn.execute("SELECT id FROM memory_vectors WHERE length(embedding) != ? LIMIT 20",
                                          (self.dim * 4,))]
        return [f"vector of memory {i} has the wrong length (run `memento-edge reindex`)" for i in ids]

    def search(self, conn, query, k, candidate_sql, candidates):
        q = np.ascontiguousarray(query, dtype=np.float32)
        # A blob of the wrong length (damage) is skipped rather than breaking every search: check names it.
        size = self.dim * 4
        if candidate_sql is None:
            sql, params = "SELECT id, embedding FROM memory_vectors WHERE length(embedding) = ?", [size]
        else:
            where, params = candidate_sql
            sql = (f"SELECT v.id, v.embedding FROM memory_vectors v JOIN memories m ON m.id = v.id "
                   f"WHERE length(v.embedding) = ? AND {where}")
            params = [size, *params]
        best_ids = np.empty(0, dtype=np.int64)
        best_scores = np.empty(0, dtype=np.float32)
        cur = conn.execute(sql, params)
        # Stream in chunks and keep a running top-k: memory stays bounded whatever the store size.
        while True:
            rows = cur.fetchmany(_NUMPY_CHUNK)
            if not rows:
                break
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            mat = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), self.dim)
            scores = mat @ q
            best_ids = np.concatenate([best_ids, ids])
            best_scores = np.concatenate([best_scores, scores])
            if len(best_scores) > k:
                keep = np.argpartition(-best_scores, k - 1)[:k]
                best_ids, best_scores = best_ids[keep], best_scores[keep]
        # Ties broken by id so results are deterministic (and comparable with sqlite-vec's).
        order = np.lexsort((best_ids, -best_scores))
        return [(int(best_ids[i]), float(best_scores[i])) for i in order[:k]]


class _Int8Cache:
    """In-memory int8 copy of every sqlite-vec vector, for a fast brute-force first pass.

    sqlite-vec's KNN reads every vector through SQLite's page cache on each query (about 6 ms at 10k
    memories on this machine, most of a recall); a contiguous int8 matrix scanned in cache-sized blocks
    is several times faster and costs 1/4 of float32 RAM (3.8 MB at 10k, 38 MB at 100k). Scores are
    approximate (per-vector scale), so the store re-ranks a margin of candidates exactly with sqlite-vec.
    """

    _BLOCK = 1024  # rows per block: the float32 temporary stays inside L2 cache

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.generation: Optional[int] = None
        self.n = 0
        self.ids = np.empty(0, dtype=np.int64)
        self.codes = np.empty((0, dim), dtype=np.int8)
        self.scales = np.empty(0, dtype=np.float32)
        self.pos: Dict[int, int] = {}

    def _reserve(self, need: int) -> None:
        if need <= len(self.ids):
            return
        cap = max(need, 2 * len(self.ids), 1024)  # doubling: appends are amortised O(1)
        for name in ("ids", "codes", "scales"):
            old = getattr(self, name)
            new = np.empty((cap,) + old.shape[1:], dtype=old.dtype)
            new[: self.n] = old[: self.n]
            setattr(self, name, new)

    @staticmethod
    def _quantise(vectors: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        scale = np.abs(vectors).max(axis=1) / 127.0
        scale[scale == 0] = 1.0
        return np.round(vectors / scale[:, None]).astype(np.int8), scale.astype(np.float32)

    def put(self, ids: Sequence[int], vectors: np.ndarray) -> None:
        codes, scales = self._quantise(np.asarray(vectors, dtype=np.float32).reshape(len(ids), self.dim))
        for mid, code, scale in zip(ids, codes, scales):
            row = self.pos.get(int(mid))
            if row is None:
                self._reserve(self.n + 1)
                row = self.n
                self.n += 1
                self.pos[int(mid)] = row
                self.ids[row] = int(mid)
            self.codes[row] = code
            self.scales[row] = scale

    def remove(self, mid: int) -> None:
        row = self.pos.pop(int(mid), None)
        if row is None:
            return
        last = self.n - 1
        if row != last:  # move the last row into the hole: no O(n) shift
            moved = int(self.ids[last])
            self.ids[row], self.codes[row], self.scales[row] = moved, self.codes[last], self.scales[last]
            self.pos[moved] = row
        self.n = last

    def rebuild(self, conn: sqlite3.Connection, generation: int) -> None:
        self.__init__(self.dim)  # type: ignore[misc]
        cur = conn.execute("SELECT rowid, embedding FROM memory_vec")
        while True:
            rows = cur.fetchmany(_NUMPY_CHUNK)
            if not rows:
                break
            vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), self.dim)
            self.put([r[0] for r in rows], vecs)
        self.generation = generation

    def scores_of(self, query: np.ndarray, ids: Sequence[int]) -> Dict[int, float]:
        """Approximate cosine of ``query`` with the cached vectors of ``ids`` (ids not cached are left out)."""
        pairs = [(int(i), self.pos[int(i)]) for i in ids if int(i) in self.pos]
        if not pairs:
            return {}
        rows = np.fromiter((r for _, r in pairs), dtype=np.int64, count=len(pairs))
        q = np.ascontiguousarray(query, dtype=np.float32)
        vals = (self.codes[rows].astype(np.float32) @ q) * self.scales[rows]
        return {i: float(v) for (i, _), v in zip(pairs, vals.tolist())}

    def scores(self, query: np.ndarray) -> np.ndarray:
        """Approximate cosine of ``query`` with every cached vector (row order of ``ids``)."""
        out = np.empty(self.n, dtype=np.float32)
        q = np.ascontiguousarray(query, dtype=np.float32)
        for start in range(0, self.n, self._BLOCK):
            stop = min(start + self._BLOCK, self.n)
            out[start:stop] = self.codes[start:stop].astype(np.float32) @ q
        out *= self.scales[: self.n]
        return out


class _TextDecoder:
    """SQLite TEXT -> str, lenient: invalid UTF-8 (another tool's write, a flipped bit on the card)
    becomes U+FFFD instead of an error, so one damaged row cannot make a read, a recall or the whole
    export fail. ``repairs`` counts the values it had to repair; ``Store.integrity_check`` names the rows.
    """

    def __init__(self) -> None:
        self.repairs = 0

    def __call__(self, raw: bytes) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.repairs += 1  # a diagnostic count: an occasional lost increment between threads is fine
            return raw.decode("utf-8", "replace")


EXTENSIONS_NOTE = ("this Python's sqlite3 cannot load extensions, so vectors use the numpy scan instead of "
                   "sqlite-vec (recall about 4-5x slower at 10k memories); install memento-edge with a Python "
                   "whose sqlite3 can (Debian/Ubuntu's /usr/bin/python3; scripts/setup picks one)")


def sqlite_can_load_extensions() -> bool:
    """True when this Python's ``sqlite3`` was built with loadable-extension support (pyenv's default
    build and some distributions' are not: sqlite-vec cannot load there)."""
    return hasattr(sqlite3.Connection, "enable_load_extension")


def _load_sqlite_vec(conn: sqlite3.Connection) -> bool:
    """Load sqlite-vec into ``conn``; False when this Python or platform can't."""
    try:
        import sqlite_vec  # noqa: PLC0415 - optional on armv6

        conn.enable_load_extension(True)
        sqlite_vec.load(conn)
        conn.enable_load_extension(False)
        return True
    except (ImportError, AttributeError, sqlite3.Error, OSError):
        return False


class Store:
    """A memento-edge SQLite database. Thread-safe; use one instance per process and database."""

    def __init__(self, path: os.PathLike, *, dim: int = 384, synchronous: str = "FULL",
                 vector_backend: str = "auto", max_readers: int = 8, busy_timeout_ms: int = 5000) -> None:
        self.path = Path(path)
        self.dim = dim
        self.synchronous = synchronous.upper()
        self._busy_ms = busy_timeout_ms
        # Why this store only reads (a full or read-only disk at open), or None: see _open_read_only.
        self.read_only: Optional[str] = None
        self._lock = DatabaseLock(self.path)
        self._check_file()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the directory of {self.path}: {exc.strerror}") from None
        # Shared while open: `restore` takes it exclusively, so it cannot swap the file under us.
        self._lock.acquire_shared(busy_timeout_ms / 1000)
        self._wlock = threading.RLock()
        self._readers: "queue.LifoQueue[sqlite3.Connection]" = queue.LifoQueue()
        self._reader_slots = threading.BoundedSemaphore(max_readers)
        self._all: List[sqlite3.Connection] = []
        self._closed = False
        self._vec_loadable: Optional[bool] = None
        self.text_decoder = _TextDecoder()
        # In-memory int8 copy of the sqlite-vec vectors (built on the first vector search). Kept in step
        # with our own writes after each commit; a 'vec_gen' counter in meta, bumped by every vector
        # write, tells us when another process (the CLI beside the service) changed the vectors.
        self._cache_lock = threading.Lock()
        self._vcache: Optional[_Int8Cache] = None
        self._pending: List[Tuple[str, Any, Any]] = []
        self._new_gen: Optional[int] = None
        self._inflight_gen: Optional[int] = None
        self._writer: Optional[sqlite3.Connection] = None
        try:
            self._writer = self._connect()
            migrations.migrate(self._writer)
            self.vector: Optional[_VectorIndex] = self._setup_vectors(vector_backend)
        except (sqlite3.Error, StoreError) as exc:
            reason = disk_problem(self.path.parent) if self.path.exists() else None
            self._close_connections()
            if reason is None:
                self._lock.release()
                raise (_translate(exc) if isinstance(exc, sqlite3.Error) else exc) from exc
            self._open_read_only(reason)
        except BaseException:
            self.close()
            raise
        if isinstance(self.vector, _SqliteVecIndex):
            self._vcache = _Int8Cache(self.dim)

    # --- connections ----------------------------------------------------------------------------
    def _check_file(self) -> None:
        """Refuse, without writing a byte, a file that is not a healthy memento-edge SQLite database.

        A 0-byte file is refused too (SQLite would silently make it a new, empty store), and ``PRAGMA
        quick_check`` catches damaged pages before a write lands in a damaged file.
        """
        if not self.path.exists():
            return
        if self.path.is_dir():
            raise StoreError(f"{self.path} is a directory, not a database file")
        with open(self.path, "rb") as fh:
            head = fh.read(16)
        if not head and not _nonempty(Path(str(self.path) + "-wal")):
            raise StoreError(f"{self.path} is empty (0 bytes), not a memento-edge database; it was left "
                             f"untouched. {self._restore_hint()}, or move it away to start an empty store")
        if head and head != SQLITE_HEADER:
            raise StoreError(f"{self.path} is not a SQLite database (corrupt or another kind of file); "
                             f"it was left untouched. {self._restore_hint()}")
        if not head:
            return
        try:
            conn = _connect_read_only(self.path)
            try:
                names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                damage = [r[0] for r in conn.execute("PRAGMA quick_check(3)")] if names else ["ok"]
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path} cannot be read as a database ({exc}); it was left untouched. "
                             f"{self._restore_hint()}") from exc
        if names and "_migrations" not in names:
            raise StoreError(f"{self.path} is a SQLite database of another application; it was left untouched")
        if damage != ["ok"]:
            raise StoreError(f"{self.path} is damaged ({'; '.join(damage)[:300]}); it was left untouched. "
                             f"{self._restore_hint()}")

    def _open_read_only(self, reason: str) -> None:
        """Serve reads from a database the disk will not let us write (full, or mounted read-only).

        Reads, keyword and vector recall keep working; every write raises StorageFull / StoreError with
        ``reason``, and readiness says so. Only a database already at the current schema qualifies.
        """
        self.read_only = reason
        self._writer = None
        try:
            with self.reader() as c:
                if migrations.latest() not in migrations.applied(c):
                    raise StoreError(f"{self.path} needs a schema upgrade, but {reason}")
            self.vector = self._setup_vectors("auto")
        except BaseException:
            self.close()
            raise

    def _restore_hint(self) -> str:
        backups = self.path.parent / "backups"
        where = f" (the service's backups are in {backups})" if backups.is_dir() else ""
        return f"Restore a backup with `memento-edge restore BACKUP`{where}"

    def _connect(self) -> sqlite3.Connection:
        try:
            if self.read_only is not None:
                conn = _connect_read_only(self.path, check_same_thread=False)
            else:
                conn = self._connect_writable()
        except sqlite3.Error as exc:
            raise _translate(exc) from exc
        conn.text_factory = self.text_decoder
        loaded = _load_sqlite_vec(conn)
        if self._vec_loadable is None:
            self._vec_loadable = loaded
        self._all.append(conn)
        return conn

    def _connect_writable(self) -> sqlite3.Connection:
        conn = sqlite3.connect(str(self.path), timeout=self._busy_ms / 1000, isolation_level=None,
                               check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_ms)}")
            conn.execute("PRAGMA journal_mode = WAL")
            # FULL: the WAL is fsynced at every commit, so an acknowledged write survives power loss.
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA cache_size = -1000")  # 1 MB per connection: the board has 512 MB
            conn.execute("PRAGMA journal_size_limit = 4194304")  # truncate the WAL after checkpoints
            conn.execute("PRAGMA temp_store = FILE")
        except sqlite3.Error:
            conn.close()
            raise
        return conn

    @contextlib.contextmanager
    def reader(self) -> Iterator[sqlite3.Connection]:
        """Borrow a reader connection (WAL readers run alongside the writer)."""
        if self._closed:
            raise StoreError("the store is closed")
        if not self._reader_slots.acquire(timeout=self._busy_ms / 1000):
            raise Busy("too many concurrent readers", retry_after=0.5)
        try:
            try:
                conn = self._readers.get_nowait()
            except queue.Empty:
                with self._wlock:
                    conn = self._connect()
                conn.execute(f"PRAGMA cache_size = -{READER_CACHE_KIB}")
            try:
                yield conn
            except sqlite3.Error as exc:
                raise _translate(exc) from exc
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                self._readers.put(conn)
        finally:
            self._reader_slots.release()

    @contextlib.contextmanager
    def writer(self) -> Iterator[sqlite3.Connection]:
        """The writer connection inside ``BEGIN IMMEDIATE``; commits on success, rolls back on error."""
        if self._closed:
            raise StoreError("the store is closed")
        if self.read_only is not None or self._writer is None:
            error = StorageFull if self.read_only == DISK_FULL else StoreError
            raise error(f"the database is read-only: {self.read_only or 'not open for writing'} (it was "
                        "opened read-only; free space or remount, then restart the service)")
        with self._wlock:
            conn = self._writer
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise _translate(exc) from exc
            self._pending, self._new_gen = [], None
            try:
                yield conn
                if self._pending:
                    with self._cache_lock:
                        self._inflight_gen = self._new_gen
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                self._inflight_gen = None
                raise _translate(exc) from exc
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                self._inflight_gen = None
                raise
            if self._pending:
                self._apply_pending()

    def _apply_pending(self) -> None:
        """After a commit: replay this transaction's vector changes into the int8 cache."""
        with self._cache_lock:
            cache = self._vcache
            if cache is not None and self._new_gen is not None and cache.generation == self._new_gen - 1:
                for op, a, b in self._pending:
                    if op == "put":
                        cache.put(a, b)
                    elif op == "del":
                        cache.remove(a)
                    else:  # "reset": the table was emptied
                        cache.__init__(cache.dim)  # type: ignore[misc]
                cache.generation = self._new_gen
            self._inflight_gen = None
            self._pending = []

    def _note_vector_change(self, conn: sqlite3.Connection, op: Tuple[str, Any, Any]) -> None:
        if self._vcache is None:
            return
        if self._new_gen is None:
            conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('vec_gen', '0')")
            conn.execute("UPDATE meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) WHERE key = 'vec_gen'")
            self._new_gen = self._generation(conn)
        self._pending.append(op)

    @staticmethod
    def _generation(conn: sqlite3.Connection) -> int:
        row = conn.execute("SELECT value FROM meta WHERE key = 'vec_gen'").fetchone()
        return int(row[0]) if row else 0

    def _vec_put(self, conn: sqlite3.Connection, ids: Sequence[int], vectors: np.ndarray) -> None:
        self._require_vectors().put(conn, ids, vectors)
        self._note_vector_change(conn, ("put", [int(i) for i in ids], np.array(vectors, dtype=np.float32)))

    def _vec_delete(self, conn: sqlite3.Connection, memory_id: int) -> None:
        self._require_vectors().delete(conn, memory_id)
        self._note_vector_change(conn, ("del", int(memory_id), None))

    def close(self) -> None:
        """Checkpoint the WAL and close every connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with self._wlock:
            try:
                if self._writer is not None:
                    self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
            self._close_connections()
        self._lock.release()

    def _close_connections(self) -> None:
        for conn in self._all:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self._all.clear()
        self._readers = queue.LifoQueue()

    # --- meta and vectors -------------------------------------------------------------------------
    def _setup_vectors(self, wanted: str) -> Optional[_VectorIndex]:
        recorded = self.meta_get("vector_backend")
        if recorded is not None:
            dim = int(self.meta_get("dim") or self.dim)
            self.dim = dim
            if recorded == _SqliteVecIndex.name and not self._vec_loadable:
                # Written on a machine with sqlite-vec, opened without it: keyword search still works.
                return None
            index: _VectorIndex = _SqliteVecIndex(dim) if recorded == _SqliteVecIndex.name else _NumpyIndex(dim)
            return index
        if wanted not in ("auto", "sqlite-vec", "numpy"):
            raise InvalidInput("vector_backend must be auto, sqlite-vec or numpy", field="vector_backend")
        if wanted == "sqlite-vec" and not self._vec_loadable:
            raise StoreError("sqlite-vec cannot be loaded by this Python (sqlite3 without extension "
                             "support, or no sqlite-vec build for this platform)")
        use_vec = wanted == "sqlite-vec" or (wanted == "auto" and self._vec_loadable)
        if not use_vec and wanted == "auto" and not sqlite_can_load_extensions():
            log.warning("new database %s: %s", self.path, EXTENSIONS_NOTE)
        index = _SqliteVecIndex(self.dim) if use_vec else _NumpyIndex(self.dim)
        with self.writer() as conn:
            index.create(conn)
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('vector_backend', ?)", (index.name,))
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('dim', ?)", (str(self.dim),))
        return index

    @property
    def vector_backend(self) -> str:
        """``sqlite-vec``, ``numpy``, or ``unavailable`` (sqlite-vec database opened without sqlite-vec)."""
        return self.vector.name if self.vector is not None else "unavailable"

    def meta_get(self, key: str) -> Optional[str]:
        """A value of the ``meta`` table, or None."""
        with self.reader() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def meta_set(self, key: str, value: str, conn: Optional[sqlite3.Connection] = None) -> None:
        """Set a ``meta`` value (inside ``conn``'s transaction when given)."""
        if conn is not None:
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))
            return
        with self.writer() as c:
            c.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def _require_vectors(self) -> _VectorIndex:
        if self.vector is None:
            raise StoreError("this database's vectors need sqlite-vec, which cannot be loaded here")
        return self.vector

    # --- writes ---------------------------------------------------------------------------------
    def find_duplicate(self, conn: sqlite3.Connection, collection: str, text: str) -> Optional[int]:
        """Id of a memory with exactly ``text`` in ``collection``, if any."""
        row = conn.execute(
            "SELECT id FROM memories WHERE collection = ? AND content_hash = ? AND text = ? LIMIT 1",
            (collection, content_hash(text), text),
        ).fetchone()
        return None if row is None else int(row[0])

    def insert(self, conn: sqlite3.Connection, row: Mapping[str, Any], vector: Optional[np.ndarray],
               stamp: Optional[ClockReading] = None) -> int:
        """Insert one memory (inside the caller's ``writer()`` transaction); returns its id.

        ``stamp`` is the clock reading of the write (default: the wall clock, trusted). An explicit
        ``created_at`` in ``row`` is the caller's own date and always counts as trusted.
        """
        if stamp is None:
            stamp = ClockReading(wall=time.time(), trusted=True, boot_id=None, boot_ns=None)
        now = stamp.wall
        trusted = (stamp.trusted or row.get("created_at") is not None) and not row.get("clock_untrusted")
        cur = conn.execute(
            """INSERT INTO memories (text, collection, source, session_id, importance, metadata,
                                     created_at, updated_at, content_hash,
                                     clock_trusted, clock_boot_id, clock_boot_ns)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (row["text"], row["collection"], row.get("source"), row.get("session_id"),
             float(row.get("importance", 0.5)), json.dumps(row.get("metadata") or {}, ensure_ascii=False),
             row.get("created_at", now), now, content_hash(row["text"]),
             int(trusted), None if trusted else stamp.boot_id, None if trusted else stamp.boot_ns),
        )
        mid = int(cur.lastrowid or 0)
        tags = row.get("tags") or []
        if tags:
            conn.executemany("INSERT OR IGNORE INTO memory_tags (tag, memory_id) VALUES (?, ?)",
                             [(t, mid) for t in tags])
        if vector is not None:
            self._vec_put(conn, [mid], vector[None, :])
        return mid

    def update(self, conn: sqlite3.Connection, memory_id: int, fields: Mapping[str, Any],
               tags: Optional[Sequence[str]], vector: Optional[np.ndarray], now: Optional[float] = None) -> bool:
        """Update columns / tags / vector of one memory; False when it does not exist."""
        if not conn.execute("SELECT 1 FROM memories WHERE id = ?", (memory_id,)).fetchone():
            return False
        cols = dict(fields)
        if "metadata" in cols:
            cols["metadata"] = json.dumps(cols["metadata"] or {}, ensure_ascii=False)
        if "text" in cols:
            cols["content_hash"] = content_hash(cols["text"])
        cols["updated_at"] = time.time() if now is None else now
        assignments = ", ".join(f"{k} = ?" for k in cols)  # keys come from memory.py's fixed list
        conn.execute(f"UPDATE memories SET {assignments} WHERE id = ?", [*cols.values(), memory_id])
        if tags is not None:
            conn.execute("DELETE FROM memory_tags WHERE memory_id = ?", (memory_id,))
            conn.executemany("INSERT OR IGNORE INTO memory_tags (tag, memory_id) VALUES (?, ?)",
                             [(t, memory_id) for t in tags])
        if vector is not None:
            self._vec_put(conn, [memory_id], vector[None, :])
        return True

    def delete(self, memory_id: int) -> bool:
        """Delete a memory with its tags, FTS entry and vector; False when absent."""
        with self.writer() as conn:
            cur = conn.execute("DELETE FROM memories WHERE id = ?", (memory_id,))
            if cur.rowcount == 0:
                return False
            if self.vector is not None:
                self._vec_delete(conn, memory_id)
            elif self.vector_backend == "unavailable":
                raise StoreError("deleting needs sqlite-vec here (the vector would be left behind)")
            return True

    def drop_vector(self, conn: sqlite3.Connection, memory_id: int) -> None:
        """Remove one memory's vector (its text changed and the new vector is owed), if vectors work here."""
        if self.vector is not None:
            self._vec_delete(conn, memory_id)

    def put_vectors(self, conn: sqlite3.Connection, ids: Sequence[int], vectors: np.ndarray) -> None:
        """Replace the vectors of ``ids`` (reindex)."""
        self._vec_put(conn, ids, vectors)

    # --- reads ----------------------------------------------------------------------------------
    _COLUMNS = ("m.id, m.text, m.collection, m.source, m.session_id, m.importance, m.metadata, "
                "m.created_at, m.updated_at, m.content_hash, m.clock_trusted, "
                "(SELECT json_group_array(tag) FROM memory_tags t WHERE t.memory_id = m.id) AS tags, "
                # Owed a vector by the background worker (one lookup in embed_backlog's unique index).
                "CASE WHEN EXISTS (SELECT 1 FROM embed_backlog b WHERE b.memory_id = m.id) "
                "THEN 'pending' ELSE 'done' END AS embedding")

    def _select(self, c: sqlite3.Connection, tail: str, params: Sequence[Any]) -> List[Dict[str, Any]]:
        """Memories ``SELECT``ed with ``_COLUMNS`` and the SQL ``tail`` (WHERE / ORDER BY / LIMIT)."""
        cur = c.cursor()
        cur.row_factory = sqlite3.Row  # read by name: the SELECT list can change without breaking _row
        return [self._row(r) for r in cur.execute(f"SELECT {self._COLUMNS} FROM memories m {tail}", params)]

    @staticmethod
    def _row(r: sqlite3.Row) -> Dict[str, Any]:
        return {
            "id": r["id"], "text": r["text"], "collection": r["collection"], "source": r["source"],
            "session_id": r["session_id"], "importance": r["importance"], "metadata": _load_metadata(r["metadata"]),
            "created_at": r["created_at"], "updated_at": r["updated_at"], "content_hash": r["content_hash"],
            "clock_trusted": bool(r["clock_trusted"]), "tags": sorted(json.loads(r["tags"])) if r["tags"] else [],
            "embedding": r["embedding"],
        }

    def get_many(self, ids: Sequence[int], conn: Optional[sqlite3.Connection] = None) -> Dict[int, Dict[str, Any]]:
        """Rows for ``ids`` (missing ids are absent from the result)."""
        if not ids:
            return {}
        out: Dict[int, Dict[str, Any]] = {}
        with (contextlib.nullcontext(conn) if conn is not None else self.reader()) as c:
            for start in range(0, len(ids), 500):
                part = list(ids[start:start + 500])
                marks = ",".join("?" * len(part))
                for row in self._select(c, f"WHERE m.id IN ({marks})", part):
                    out[row["id"]] = row
        return out

    def get(self, memory_id: int) -> Optional[Dict[str, Any]]:
        """One row, or None."""
        return self.get_many([memory_id]).get(memory_id)

    def recent(self, collection: Optional[str], limit: int, before_id: Optional[int]) -> List[Dict[str, Any]]:
        """Newest first (by id: ids are monotonic even when the board's clock is not)."""
        where, params = ["1"], []  # type: List[str], List[Any]
        if collection is not None:
            where.append("m.collection = ?")
            params.append(collection)
        if before_id is not None:
            where.append("m.id < ?")
            params.append(before_id)
        with self.reader() as c:
            return self._select(c, f"WHERE {' AND '.join(where)} ORDER BY m.id DESC LIMIT ?", [*params, limit])

    def iter_rows(self, batch: int = 500) -> Iterator[List[Dict[str, Any]]]:
        """Every memory in id order, ``batch`` rows at a time (bounded memory for export/reindex)."""
        last = 0
        while True:
            with self.reader() as c:
                out = self._select(c, "WHERE m.id > ? ORDER BY m.id LIMIT ?", (last, batch))
            if not out:
                return
            last = out[-1]["id"]
            yield out

    def count(self, filters: Optional[Mapping[str, Any]] = None) -> int:
        """Number of memories matching ``filters`` (normalised by memory.py)."""
        where, params = filter_sql(filters or {})
        with self.reader() as c:
            return int(c.execute(f"SELECT count(*) FROM memories m WHERE {where}", params).fetchone()[0])

    def vector_search(self, query: np.ndarray, k: int, filters: Optional[Mapping[str, Any]] = None,
                      exact: bool = True) -> List[Tuple[int, float]]:
        """Top ``k`` (id, cosine) by vector similarity among memories matching ``filters``.

        ``exact=False`` lets the in-memory int8 pass answer alone (order and scores within ~1e-3 of
        exact): enough for a candidate pool that is fused by rank anyway.
        """
        index = self._require_vectors()
        with self.reader() as c:
            cand: Optional[Tuple[str, List[Any]]] = None
            n: Optional[int] = None
            if filters:
                where, params = filter_sql(filters)
                cand = (where, params)
                n = int(c.execute(f"SELECT count(*) FROM memories m WHERE {where}", params).fetchone()[0])
                if n == 0:
                    return []
            if self._vcache is None or (n is not None and n <= _EXACT_FILTER_LIMIT):
                return index.search(c, query, k, cand, n)
            return self._cached_search(c, query, k, cand, n, exact)

    def exact_similarities(self, query: np.ndarray, ids: Sequence[int]) -> Dict[int, float]:
        """Exact cosine of ``query`` with each of ``ids``' stored vectors."""
        index = self._require_vectors()
        with self.reader() as c:
            if isinstance(index, _SqliteVecIndex):
                qb = np.ascontiguousarray(query, dtype=np.float32).tobytes()
                return dict(_point_distances(c, qb, list(ids)))
            out = {}
            for mid in ids:
                v = index.get(c, mid)
                if v is not None:
                    out[int(mid)] = float(v @ query)
            return out

    def approx_similarities(self, query: np.ndarray, ids: Sequence[int]) -> Dict[int, float]:
        """Cosine of ``query`` with each of ``ids``' vectors: from the in-memory int8 copy when the store
        keeps one (within ~1e-3 of exact, no SQLite lookups), else exact."""
        if self._vcache is None:
            return self.exact_similarities(query, ids)
        with self.reader() as c, self._cache_lock:
            gen = self._generation(c)
            if self._vcache.generation != gen and gen != self._inflight_gen:
                self._vcache.rebuild(c, gen)
            return self._vcache.scores_of(query, ids)

    def _cached_search(self, c: sqlite3.Connection, query: np.ndarray, k: int,
                       cand: Optional[Tuple[str, List[Any]]], n: Optional[int],
                       exact: bool = True) -> List[Tuple[int, float]]:
        assert self._vcache is not None
        with self._cache_lock:
            gen = self._generation(c)
            if self._vcache.generation != gen and gen != self._inflight_gen:
                self._vcache.rebuild(c, gen)
            scores = self._vcache.scores(query)
            ids = self._vcache.ids[: self._vcache.n].copy()
        total = len(ids)
        if total == 0:
            return []
        # Re-rank a margin of approximate candidates exactly: int8 scores may swap near-ties.
        margin = max(4 * k, k + 32) if exact else k

        if cand is None:
            top = np.argpartition(-scores, min(margin, total) - 1)[:margin] if total > margin else np.arange(total)
            if not exact:
                top = top[np.argsort(-scores[top], kind="stable")]
                return [(int(ids[i]), float(scores[i])) for i in top[:k]]
            return self._rerank(c, query, [int(i) for i in ids[top]], k)
        where, params = cand
        want = max(margin, int(margin * total / max(n or 1, 1) * 2))
        order: Optional[np.ndarray] = None
        while True:
            kk = min(want, total)
            if kk >= total:
                order = np.argsort(-scores, kind="stable")
            else:
                part = np.argpartition(-scores, kk - 1)[:kk]
                order = part[np.argsort(-scores[part], kind="stable")]
            chosen = [int(i) for i in ids[order]]
            ok = _SqliteVecIndex._filter_ids(c, chosen, where, params) if chosen else set()
            found = [i for i in chosen if i in ok]
            if len(found) >= margin or kk >= total:
                if not exact:
                    score_of = dict(zip(chosen, scores[order].tolist()))
                    return [(i, score_of[i]) for i in found[:k]]
                return self._rerank(c, query, found[:margin], k)
            want = kk * 8

    @staticmethod
    def _rerank(c: sqlite3.Connection, query: np.ndarray, ids: List[int], k: int) -> List[Tuple[int, float]]:
        qb = np.ascontiguousarray(query, dtype=np.float32).tobytes()
        return _point_distances(c, qb, ids)[:k]

    def keyword_search(self, query: str, k: int,
                       filters: Optional[Mapping[str, Any]] = None) -> List[Tuple[int, float]]:
        """Top ``k`` (id, bm25 score, higher is better) from FTS5 among memories matching ``filters``."""
        match = fts_query(query)
        if match is None:
            return []
        where, params = filter_sql(filters or {})
        if where != "1":  # a condition may have no parameter (untrusted_time)
            sql = f"""SELECT m.id, bm25(memories_fts) AS s FROM memories_fts
                      JOIN memories m ON m.id = memories_fts.rowid
                      WHERE memories_fts MATCH ? AND {where} ORDER BY s LIMIT ?"""
        else:
            # No filter: skip the join. The triggers keep the FTS index in step with `memories`, and
            # joining every match (often >1,000 for a 4-word query at 10k) costs ~20% of the search.
            sql = ("SELECT rowid, bm25(memories_fts) AS s FROM memories_fts "
                   "WHERE memories_fts MATCH ? ORDER BY s LIMIT ?")
        with self.reader() as c:
            rows = c.execute(sql, [match, *params, k]).fetchall()
        return [(int(r[0]), -float(r[1])) for r in rows]

    def term_matches(self, terms: Sequence[QueryTerm],
                     ids: Sequence[int]) -> Tuple[int, List[int], Dict[int, List[int]]]:
        """Keyword evidence for hybrid scoring: (memories in the store, memories matching each term,
        {id: indices of the terms that memory matches} for ``ids``).

        Counts are over the whole store (a term's rarity is a property of the collection, not of a
        filter). One FTS5 pass per term; the count and the membership of ``ids`` come from the same pass.
        """
        if not terms:
            return 0, [], {}
        # The ids are a bound JSON array, not literals in the SQL text: one statement whatever the ids.
        # With the ids in the text every recall prepared a new statement, and each pooled reader kept its
        # last 128 in the sqlite3 statement cache (+3 MB of SQLite heap at 4 threads, 10k store).
        id_list = json.dumps([int(i) for i in ids])
        sql = ("SELECT count(*), group_concat(CASE WHEN rowid IN (SELECT value FROM json_each(?)) "
               "THEN rowid END) FROM memories_fts WHERE memories_fts MATCH ?")
        matched: Dict[int, List[int]] = {}
        df: List[int] = []
        with self.reader() as c:
            n = int(c.execute("SELECT count(*) FROM memories").fetchone()[0])
            for t, term in enumerate(terms):
                count, hits = c.execute(sql, (id_list, term.fts)).fetchone()
                df.append(int(count))
                for mid in (hits.split(",") if hits else ()):
                    matched.setdefault(int(mid), []).append(t)
        return n, df, matched

    def session_neighbours(self, ids: Sequence[int],
                           filters: Optional[Mapping[str, Any]] = None) -> Dict[int, List[int]]:
        """{id: the memories just before and after it in its session} for those ``ids`` that have one, and
        the reverse links (a neighbour's entry lists the ``ids`` it is next to).

        A neighbour is the nearest lower or higher id with the same ``session_id``, kept only if it matches
        ``filters``: a dialogue turn is often understood only with the turn next to it (an answer after its
        question), which hybrid recall uses as context.
        """
        if not ids:
            return {}
        # The ids are one bound JSON array (see term_matches): one cached statement, whatever their number.
        sql = ("SELECT m.id, (SELECT max(n.id) FROM memories n WHERE n.session_id = m.session_id AND n.id < m.id), "
               "(SELECT min(n.id) FROM memories n WHERE n.session_id = m.session_id AND n.id > m.id) "
               "FROM memories m WHERE m.id IN (SELECT value FROM json_each(?)) AND m.session_id IS NOT NULL")
        where, params = filter_sql(filters or {})
        with self.reader() as c:
            pairs = {int(r[0]): [int(x) for x in r[1:] if x is not None]
                     for r in c.execute(sql, (json.dumps([int(i) for i in ids]),))}
            near = sorted({n for ns in pairs.values() for n in ns})
            if where != "1" and near:
                ok = _SqliteVecIndex._filter_ids(c, near, where, params)
                pairs = {i: [n for n in ns if n in ok] for i, ns in pairs.items()}
        out: Dict[int, List[int]] = {}
        for i, ns in pairs.items():
            for n in ns:
                out.setdefault(i, []).append(n)
                if i not in out.get(n, ()):
                    out.setdefault(n, []).append(i)
        return out

    def get_vector(self, memory_id: int) -> Optional[np.ndarray]:
        """The stored vector of one memory (tests, dedupe)."""
        index = self._require_vectors()
        with self.reader() as c:
            return index.get(c, memory_id)

    # --- idempotency ----------------------------------------------------------------------------
    def idempotency_get(self, key: str) -> Optional[Tuple[str, int, str]]:
        """(request_hash, status, body) stored for ``key``, or None."""
        with self.reader() as c:
            row = c.execute("SELECT request_hash, status, body FROM idempotency WHERE key = ?", (key,)).fetchone()
        return None if row is None else (row[0], int(row[1]), row[2])

    def idempotency_put(self, key: str, request_hash: str, status: int, body: str,
                        keep_seconds: float = 86400.0) -> None:
        """Record the first answer to ``key`` (older keys are pruned so the table stays small)."""
        now = time.time()
        with self.writer() as c:
            c.execute("INSERT OR IGNORE INTO idempotency (key, request_hash, status, body, created_at) "
                      "VALUES (?, ?, ?, ?, ?)", (key, request_hash, status, body, now))
            c.execute("DELETE FROM idempotency WHERE created_at < ?", (now - keep_seconds,))

    # --- clock guard (see clock.py) ---------------------------------------------------------------
    def untrusted_clock_count(self, boot_id: Optional[str] = None) -> int:
        """Rows whose time is not trusted (only those stamped in boot ``boot_id`` when given)."""
        sql, params = "SELECT count(*) FROM memories WHERE clock_trusted = 0", []  # type: str, List[Any]
        if boot_id is not None:
            sql += " AND clock_boot_id = ?"
            params.append(boot_id)
        with self.reader() as c:
            return int(c.execute(sql, params).fetchone()[0])

    def correct_clock(self, now: ClockReading) -> int:
        """Re-date the untrusted rows of ``now``'s boot by the boot time elapsed since; returns how many.

        ``now`` must be a trusted reading. One transaction: a crash leaves every row flagged or every row
        corrected. ``updated_at`` moves by the same offset as ``created_at`` (both were read from the same
        wrong clock; SQLite evaluates the right-hand sides on the old row, so the offset is the old one).
        """
        if not now.trusted or now.boot_id is None or now.boot_ns is None:
            return 0
        true_created = "(:wall - (:boot_ns - clock_boot_ns) / 1e9)"
        with self.writer() as c:
            cur = c.execute(
                f"""UPDATE memories SET updated_at = updated_at + ({true_created} - created_at),
                                        created_at = {true_created},
                                        clock_trusted = 1, clock_boot_id = NULL, clock_boot_ns = NULL
                    WHERE clock_trusted = 0 AND clock_boot_id = :boot_id AND clock_boot_ns IS NOT NULL""",
                {"wall": now.wall, "boot_ns": now.boot_ns, "boot_id": now.boot_id})
            return int(cur.rowcount)

    # --- embedding backlog (see backlog.py) -------------------------------------------------------
    @staticmethod
    def enqueue(conn: sqlite3.Connection, ids: Sequence[int], now: float) -> None:
        """Owe a vector for each of ``ids`` (in the caller's transaction); a queued id moves to the end."""
        rows = [(int(i),) for i in ids]
        conn.executemany("DELETE FROM embed_backlog WHERE memory_id = ?", rows)
        conn.executemany("INSERT INTO embed_backlog (memory_id, queued_at) VALUES (?, ?)",
                         [(int(i), now) for i in ids])

    @staticmethod
    def unqueue(conn: sqlite3.Connection, ids: Sequence[int]) -> None:
        """Drop the backlog entries of ``ids`` (their vectors were just written another way)."""
        conn.executemany("DELETE FROM embed_backlog WHERE memory_id = ?", [(int(i),) for i in ids])

    def backlog_batch(self, limit: int, max_attempts: int) -> List[Tuple[int, int, str, str]]:
        """The oldest ``limit`` entries not failed ``max_attempts`` times: (seq, id, text, collection)."""
        with self.reader() as c:
            rows = c.execute("""SELECT b.seq, m.id, m.text, m.collection FROM embed_backlog b
                                JOIN memories m ON m.id = b.memory_id
                                WHERE b.attempts < ? ORDER BY b.seq LIMIT ?""", (max_attempts, limit)).fetchall()
        return [(int(r[0]), int(r[1]), r[2], r[3]) for r in rows]

    def backlog_done(self, conn: sqlite3.Connection, seq: int, memory_id: int, vector: np.ndarray) -> bool:
        """Write the vector owed by entry ``seq`` and drop the entry; False, writing nothing, when the
        entry is gone (the memory was deleted, or its text updated and re-queued, since it was read)."""
        if conn.execute("DELETE FROM embed_backlog WHERE seq = ?", (seq,)).rowcount == 0:
            return False
        self._vec_put(conn, [memory_id], vector[None, :])
        return True

    @staticmethod
    def backlog_merge(conn: sqlite3.Connection, seq: int, memory_id: int, into: int, now: float) -> bool:
        """Merge pending memory ``memory_id`` into its near-duplicate ``into``: delete it and leave a
        pointer; False when entry ``seq`` is gone (see :meth:`backlog_done`)."""
        if conn.execute("DELETE FROM embed_backlog WHERE seq = ?", (seq,)).rowcount == 0:
            return False
        conn.execute("DELETE FROM memories WHERE id = ?", (memory_id,))
        conn.execute("INSERT OR REPLACE INTO embed_merged (memory_id, duplicate_of, merged_at) VALUES (?, ?, ?)",
                     (memory_id, into, now))
        return True

    @staticmethod
    def backlog_log(conn: sqlite3.Connection, embedded: int, now: float) -> None:
        """Count ``embedded`` vectors in this minute's bucket (an hour of buckets is kept)."""
        minute = int(now // 60)
        conn.execute("INSERT INTO embed_log (minute, embedded) VALUES (?, ?) "
                     "ON CONFLICT (minute) DO UPDATE SET embedded = embedded + excluded.embedded", (minute, embedded))
        conn.execute("DELETE FROM embed_log WHERE minute < ?", (minute - 60,))

    def backlog_failed(self, seq: int, error: str) -> None:
        """Count a non-transient failure of entry ``seq``."""
        with self.writer() as c:
            c.execute("UPDATE embed_backlog SET attempts = attempts + 1, last_error = ? WHERE seq = ?",
                      (error[:500], seq))

    def pending_ids(self, ids: Sequence[int]) -> set:
        """Those of ``ids`` that still owe a vector."""
        out: set = set()
        with self.reader() as c:
            for start in range(0, len(ids), 500):
                part = [int(i) for i in ids[start:start + 500]]
                marks = ",".join("?" * len(part))
                out.update(r[0] for r in c.execute(
                    f"SELECT memory_id FROM embed_backlog WHERE memory_id IN ({marks})", part))
        return out

    def merged_into(self, memory_id: int) -> Optional[int]:
        """The memory a merged near-duplicate ``memory_id`` was folded into, or None."""
        with self.reader() as c:
            row = c.execute("SELECT duplicate_of FROM embed_merged WHERE memory_id = ?", (memory_id,)).fetchone()
        return None if row is None else int(row[0])

    def backlog_owed(self, max_attempts: int) -> int:
        """Backlog entries still to embed (fewer than ``max_attempts`` failures)."""
        with self.reader() as c:
            return int(c.execute("SELECT count(*) FROM embed_backlog WHERE attempts < ?",
                                 (max_attempts,)).fetchone()[0])

    def backlog_stats(self, now: float, max_attempts: int, window_min: int = 10) -> Dict[str, Any]:
        """Pending and failed entries, the oldest one's age, and vectors embedded per minute lately."""
        with self.reader() as c:
            pending, failed, oldest = c.execute(
                "SELECT count(*), coalesce(sum(attempts >= ?), 0), min(queued_at) FROM embed_backlog",
                (max_attempts,)).fetchone()
            first_minute = int(now // 60) - window_min + 1
            done, since = c.execute("SELECT coalesce(sum(embedded), 0), min(minute) FROM embed_log "
                                    "WHERE minute >= ?", (first_minute,)).fetchone()
        # The rate spans from the first bucket seen in the window to now (at least a minute).
        span_min = max(1.0, (now - since * 60) / 60.0) if since is not None else float(window_min)
        return {"pending": int(pending), "failed": int(failed),
                "oldest_age_s": None if oldest is None else round(max(0.0, now - oldest), 1),
                "embedded_recent": int(done), "drain_per_min": round(done / span_min, 2)}

    # --- maintenance ----------------------------------------------------------------------------
    def stats(self) -> Dict[str, Any]:
        """Counts, sizes and versions."""
        with self.reader() as c:
            total = int(c.execute("SELECT count(*) FROM memories").fetchone()[0])
            colls = {r[0]: r[1] for r in c.execute(
                "SELECT collection, count(*) FROM memories GROUP BY collection ORDER BY 2 DESC LIMIT 100")}
            vectors = self.vector.count(c) if self.vector is not None else None
            schema = migrations.applied(c)
            try:
                vec_version = c.execute("SELECT vec_version()").fetchone()[0]
            except sqlite3.Error:
                vec_version = None
        db_bytes = self.path.stat().st_size if self.path.exists() else 0
        wal = Path(str(self.path) + "-wal")
        return {
            "memories": total, "vectors": vectors, "collections": colls, "db_path": str(self.path),
            "db_bytes": db_bytes, "wal_bytes": wal.stat().st_size if wal.exists() else 0,
            "vector_backend": self.vector_backend, "sqlite_version": sqlite3.sqlite_version,
            "sqlite_vec_version": vec_version, "schema": schema[-1] if schema else None,
            "sqlite_extensions": sqlite_can_load_extensions(),
            "vector_note": (EXTENSIONS_NOTE if self.vector_backend != _SqliteVecIndex.name
                            and not sqlite_can_load_extensions() else None),
            "model_fingerprint": self.meta_get("model_fingerprint"),
        }

    def integrity_check(self) -> List[str]:
        """Problems found by ``PRAGMA integrity_check`` and the FTS5 index check (empty list = ok)."""
        problems: List[str] = []
        with self.reader() as c:
            rows = [r[0] for r in c.execute("PRAGMA integrity_check").fetchall()]
            if rows != ["ok"]:
                problems.extend(rows)
        try:
            with self.writer() as c:
                c.execute("INSERT INTO memories_fts (memories_fts, rank) VALUES ('integrity-check', 1)")
        except StoreError as exc:
            problems.append(f"full-text index: {exc}")
        problems.extend(self._invalid_utf8_rows())
        if self.vector is not None:
            with self.reader() as c:
                problems.extend(self.vector.damaged(c))
                n_mem = int(c.execute("SELECT count(*) FROM memories").fetchone()[0])
                n_vec = self.vector.count(c)
                owed = int(c.execute("SELECT count(*) FROM embed_backlog").fetchone()[0])
            if n_vec != n_mem - owed:
                problems.append(f"{n_mem} memories ({owed} awaiting embedding) but {n_vec} vectors "
                                "(run `memento-edge reindex`)")
        return problems

    def health(self) -> Dict[str, Any]:
        """Readiness facts: can the database be read, and written (disk space, read-only mount or open)."""
        problems: List[str] = []
        readable = True
        try:
            with self.reader() as c:
                c.execute("SELECT 1 FROM meta LIMIT 1").fetchall()
        except (StoreError, Busy) as exc:
            readable = False
            problems.append(exc.message)
        disk = disk_state(self.path.parent)
        if disk["problem"]:
            problems.append(disk["problem"])
        if self.read_only is not None and self.read_only != disk["problem"]:
            problems.append(f"opened read-only at start: {self.read_only} (restart once it is fixed)")
        return {"db_readable": readable, "db_writable": readable and not problems and self.read_only is None,
                "read_only": self.read_only is not None, "disk_free_bytes": disk["free_bytes"],
                "disk_total_bytes": disk["total_bytes"], "error": "; ".join(problems) or None}

    def reset_vectors_if_damaged(self) -> bool:
        """Drop and recreate a vector index whose storage is damaged (reindex refills it); True if done."""
        index = self._require_vectors()
        with self.reader() as c:
            if not index.damaged(c):
                return False
        with self.writer() as c:
            index.reset(c)
            self._note_vector_change(c, ("reset", None, None))
        return True

    def _invalid_utf8_rows(self, limit: int = 20) -> List[str]:
        """One problem per memory whose text columns are not valid UTF-8 (the first ``limit``)."""
        problems: List[str] = []
        with self.reader() as c:
            c.text_factory = bytes
            try:
                cur = c.execute("SELECT id, text, collection, source, session_id, metadata FROM memories")
                for row in cur:
                    for name, value in zip(("text", "collection", "source", "session_id", "metadata"), row[1:]):
                        if value is not None and not _is_utf8(value):
                            problems.append(f"memory {row[0]}: {name} is not valid UTF-8 (shown and exported "
                                            "with U+FFFD; fix it with `memento-edge update`)")
                            break
                    if len(problems) >= limit:
                        break
            finally:
                c.text_factory = self.text_decoder
        return problems

    def backup(self, dest: os.PathLike, progress: Optional[Any] = None) -> Path:
        """Online backup through SQLite's backup API (a file copy would miss pages still in the WAL)."""
        dest = Path(dest)
        tmp = dest.with_name(dest.name + ".partial")
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_partials(dest.parent)
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            with _partial_lock(tmp):
                self._copy_verified(tmp, progress)
                _fsync_file(tmp)
                os.replace(tmp, dest)
            _fsync_dir(dest.parent)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()  # a failed backup leaves nothing behind
            if isinstance(exc, (OSError, sqlite3.Error, StoreError)):
                raise _backup_error(dest, exc) from exc
            raise
        return dest

    def _copy_verified(self, tmp: Path, progress: Optional[Any]) -> None:
        target = sqlite3.connect(str(tmp))
        try:
            def _progress(status: int, remaining: int, total: int) -> None:
                if progress is not None:
                    progress(total - remaining, total)

            with self.reader() as c:
                c.backup(target, pages=256, progress=_progress)
            target.execute("PRAGMA journal_mode = DELETE")
            ok = target.execute("PRAGMA integrity_check").fetchone()[0]
            if ok != "ok":
                raise StoreError(f"backup failed verification: {ok}")
        finally:
            target.close()


# A .partial file untouched for this long, and not locked by a running backup, was left by a killed one.
STALE_PARTIAL_S = 60.0


@contextlib.contextmanager
def _partial_lock(tmp: Path) -> Iterator[None]:
    """Hold a flock on a backup's .partial file while it is written, so cleanup can tell it is alive."""
    fd = os.open(str(tmp), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def remove_stale_partials(directory: Path) -> List[Path]:
    """Delete the .partial files killed backups left in ``directory`` (a backup that is still running
    holds a lock on its own); returns what was removed. Only SQLite (or empty) files are touched."""
    removed: List[Path] = []
    for path in directory.glob("*.partial"):
        try:
            st = path.stat()
            if time.time() - st.st_mtime < STALE_PARTIAL_S:
                continue
            with open(path, "rb") as fh:
                if fh.read(16) not in (b"", SQLITE_HEADER):
                    continue
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by a running backup?
            path.unlink()
            removed.append(path)
        except (BlockingIOError, OSError):
            continue
    return removed


def _backup_error(dest: Path, exc: BaseException) -> StoreError:
    """A failed backup as a domain error naming the destination (507 when the disk is full)."""
    translated = _translate(exc) if isinstance(exc, sqlite3.Error) else exc
    if isinstance(translated, StoreError):
        return type(translated)(f"cannot write the backup {dest}: {translated.message}")
    problem = disk_problem(dest.parent if dest.parent.exists() else Path("/"))
    detail = getattr(exc, "strerror", None) or str(exc)
    if problem == DISK_FULL or getattr(exc, "errno", None) == errno.ENOSPC:
        return StorageFull(f"cannot write the backup {dest}: the disk is full")
    return StoreError(f"cannot write the backup {dest}: {detail}")


def _connect_read_only(path: Path, **kwargs: Any) -> sqlite3.Connection:
    """A read-only connection, also on a disk where SQLite cannot create the ``-shm`` file (full or
    read-only): then, if the WAL holds nothing, the file is opened ``immutable`` (nothing to miss)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, **kwargs)
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.OperationalError:
        conn.close()
        if _nonempty(Path(str(path) + "-wal")):
            raise
    return sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True, isolation_level=None, **kwargs)


def _nonempty(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except OSError:
        return False


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _load_metadata(text: str) -> Any:
    """The stored metadata object, or its raw text when it cannot be parsed (too deep, not JSON).

    A row that cannot be decoded must not make every read of it fail; memory.py shows the text instead.
    """
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


def _fsync_file(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(str(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def restore(src: os.PathLike, dest: os.PathLike) -> Path:
    """Replace the database at ``dest`` with the verified backup ``src`` (no process may have it open).

    The backup is checked (integrity, memento-edge schema) before anything at ``dest`` is touched; the new
    file is written beside ``dest`` and renamed over it, so a crash leaves either the old or the new database.
    """
    src, dest = Path(src), Path(dest)
    if not src.exists():
        raise InvalidInput(f"backup file not found: {src}", field="src")
    if dest.parent.exists():
        lock = DatabaseLock(dest)
        lock.acquire_exclusive()  # refuses while any process (the service, a command) has dest open
        try:
            return _restore_unlocked(src, dest)
        finally:
            lock.release()
    return _restore_unlocked(src, dest)


def _restore_unlocked(src: Path, dest: Path) -> Path:
    with open(src, "rb") as fh:
        if fh.read(16) != SQLITE_HEADER:
            raise StoreError(f"{src} is not a SQLite database")
    try:
        source = sqlite3.connect(f"file:{src}?mode=ro", uri=True)
        try:
            ok = source.execute("PRAGMA integrity_check").fetchone()[0]
            if ok != "ok":
                raise StoreError(f"backup {src} is damaged: {ok}")
            names = {r[0] for r in source.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if "_migrations" not in names or "memories" not in names:
                raise StoreError(f"{src} is not a memento-edge database")
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(dest.name + ".restoring")
            if tmp.exists():
                tmp.unlink()
            target = sqlite3.connect(str(tmp))
            try:
                source.backup(target)
                target.execute("PRAGMA journal_mode = WAL")
            finally:
                target.close()
        finally:
            source.close()
    except sqlite3.Error as exc:
        raise _translate(exc) from exc
    _fsync_file(tmp)
    # The old WAL belongs to the old file: left beside the new one it would be replayed into it.
    for suffix in ("-wal", "-shm"):
        stale = Path(str(dest) + suffix)
        if stale.exists():
            stale.unlink()
    os.replace(tmp, dest)
    _fsync_dir(dest.parent)
    return dest


def filter_sql(filters: Mapping[str, Any]) -> Tuple[str, List[Any]]:
    """SQL condition on alias ``m`` for normalised ``filters`` (validated by memory.py)."""
    where: List[str] = []
    params: List[Any] = []
    for key in ("collection", "source", "session_id"):
        if filters.get(key) is not None:
            where.append(f"m.{key} = ?")
            params.append(filters[key])
    if filters.get("min_importance") is not None:
        where.append("m.importance >= ?")
        params.append(filters["min_importance"])
    if filters.get("since") is not None:
        where.append("m.created_at >= ?")
        params.append(filters["since"])
    if filters.get("until") is not None:
        where.append("m.created_at < ?")
        params.append(filters["until"])
    if filters.get("untrusted_time") == "exclude":
        where.append("m.clock_trusted = 1")
    if filters.get("tags_any"):
        tags = list(filters["tags_any"])
        where.append(f"EXISTS (SELECT 1 FROM memory_tags t WHERE t.memory_id = m.id AND t.tag IN "
                     f"({','.join('?' * len(tags))}))")
        params.extend(tags)
    if filters.get("tags_all"):
        tags = sorted(set(filters["tags_all"]))
        where.append(f"(SELECT count(*) FROM memory_tags t WHERE t.memory_id = m.id AND t.tag IN "
                     f"({','.join('?' * len(tags))})) = ?")
        params.extend(tags)
        params.append(len(tags))
    for key, value in (filters.get("metadata") or {}).items():
        path = '$."' + key + '"'  # key validated by memory.py: no quotes or backslashes
        if value is None:
            where.append("json_type(m.metadata, ?) = 'null'")
            params.append(path)
        elif isinstance(value, bool):
            where.append("json_type(m.metadata, ?) = ?")
            params.extend([path, "true" if value else "false"])
        else:
            where.append("json_extract(m.metadata, ?) = ?")
            params.extend([path, value])
    return (" AND ".join(where) if where else "1"), params
