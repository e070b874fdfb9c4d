"""Text -> 384-d unit vectors: the Embedder protocol, the onnxruntime embedder and its LRU cache.

:class:`OnnxEmbedder` runs the int8 graph built by :mod:`memento_edge.model` with onnxruntime and
the ``tokenizers`` WordPiece tokenizer. It is written for a 512 MB single-core board serving many
Waitress threads:

* the session is created lazily (or warmed up in the background) and can be unloaded when idle or
  under memory pressure; the next call loads it again;
* one session is shared by every thread (``InferenceSession.run`` is thread-safe); loading and
  unloading are guarded by a condition variable and an in-flight counter, so a session is never
  freed while a ``run`` uses it;
* batches of any mix of lengths are sorted by length and cut into mini-batches whose padded size
  stays under ``batch_token_budget`` (the old project padded everything to one shape and crashed);
* timeouts are plain bounded waits plus onnxruntime's ``RunOptions.terminate``, so they work in
  every thread (the old project used SIGALRM, which only works in the main thread).

:class:`FakeEmbedder` at the bottom is a deterministic hashing embedder for OTHER modules' unit
tests; the product never uses it.
"""
from __future__ import annotations

import ctypes
import hashlib
import heapq
import logging
import os
import re
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import numpy as np

from .config import Settings
from .errors import EmbedTimeout, ModelUnavailable
from .governor import malloc_trim
from .model import MANIFEST_FILE, TOKENIZER_FILE, load_manifest, verify_model_dir

log = logging.getLogger(__name__)

DIM = 384


@runtime_checkable
class Embedder(Protocol):
    """What :class:`memento_edge.memory.Memory` needs from an embedding backend."""

    dim: int
    backend: str

    @property
    def fingerprint(self) -> str:
        """Identity of the model (manifest fingerprint); raises ModelUnavailable if it is missing."""
        ...

    @property
    def loaded(self) -> bool:
        """Whether the model is in memory right now."""
        ...

    def embed_batch(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts), dim)`` float32 L2-normalised vectors, any mix of lengths."""
        ...

    def embed(self, text: str) -> np.ndarray:
        """``(dim,)`` float32 L2-normalised vector of one text (cached)."""
        ...

    def load(self) -> None:
        """Load the model now (idempotent, thread-safe)."""
        ...

    def unload(self) -> None:
        """Free the model; the next embed loads it again."""
        ...

    def start_warmup(self) -> threading.Thread:
        """Load the model in a daemon thread (``settings.warmup``); failures are only logged."""
        ...

    def stats(self) -> Dict[str, Any]:
        """Counters for ``/v1/stats`` and the bench."""
        ...

    def shrink_cache(self, fraction: float = 0.5) -> None:
        """Drop the oldest ``fraction`` of the cache (memory governor)."""
        ...


# ================================================================================================
# LRU cache
# ================================================================================================

# Python-side cost of one entry besides the vector itself: 16-byte digest key (bytes object),
# ndarray header, OrderedDict node. Counted so that `cache_mb` bounds real memory, not just floats.
_ENTRY_OVERHEAD = 256


class Watchdog:
    """One daemon thread that calls a function when a deadline passes, for any number of runs.

    Replaces a ``threading.Timer`` per inference: starting a thread costs little alone, but
    ``Thread.start()`` waits until the new thread holds the GIL, which under 4 concurrent recalls is a
    scheduling round (up to the 5 ms switch interval) added to every query. Here arming and disarming
    are a heap push and a dict delete under one lock; the thread sleeps until the earliest deadline.
    """

    def __init__(self, name: str = "memento-watchdog") -> None:
        self._name = name
        self._cond = threading.Condition(threading.Lock())
        self._heap: List[Tuple[float, int]] = []
        self._armed: Dict[int, Callable[[], None]] = {}
        self._seq = 0
        self._thread: Optional[threading.Thread] = None
        self._stopped = False

    def arm(self, timeout: float, fire: Callable[[], None]) -> int:
        """Call ``fire()`` (on the watchdog thread) after ``timeout`` s unless disarmed; returns a handle."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._seq += 1
            handle = self._seq
            self._armed[handle] = fire
            heapq.heappush(self._heap, (deadline, handle))
            if self._thread is None:
                self._stopped = False
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
            elif self._heap[0][1] == handle:   # a new earliest deadline: the sleeper must re-plan
                self._cond.notify()
        return handle

    def disarm(self, handle: int) -> None:
        """Cancel ``handle`` (a no-op when it already fired). Its heap entry is dropped when due."""
        with self._cond:
            self._armed.pop(handle, None)
            if not self._armed:
                self._heap.clear()      # nothing armed: no stale entries to wake up for

    def stop(self) -> None:
        """End the thread (armed deadlines are dropped); a later ``arm`` starts a new one."""
        with self._cond:
            self._stopped = True
            self._armed.clear()
            self._heap.clear()
            self._cond.notify()
            thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            due: List[Callable[[], None]] = []
            with self._cond:
                if self._stopped:
                    return
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    _deadline, handle = heapq.heappop(self._heap)
                    fire = self._armed.pop(handle, None)
                    if fire is not None:
                        due.append(fire)
                if not due:
                    self._cond.wait(self._heap[0][0] - now if self._heap else None)
                    continue
            for fire in due:
                try:
                    fire()
                except Exception:  # a failing callback must not kill the watchdog for everyone
                    log.exception("watchdog callback failed")


class LRUCache:
    """Thread-safe LRU map text -> vector, capped by entry count AND by bytes.

    Keys are 16-byte BLAKE2b digests of the text, so a cached 100,000-character text costs the same
    as a short one. Vectors are stored read-only and returned as copies: a caller cannot corrupt
    what the next caller gets.
    """

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max(0, int(max_entries))
        self.max_bytes = max(0, int(max_bytes))
        self._data: "OrderedDict[bytes, np.ndarray]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @staticmethod
    def key(text: str) -> bytes:
        """The cache key of ``text`` (lone surrogates from JSON input are tolerated)."""
        return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()

    @staticmethod
    def _cost(vec: np.ndarray) -> int:
        return int(vec.nbytes) + _ENTRY_OVERHEAD

    def get(self, text: str) -> Optional[np.ndarray]:
        """A copy of the cached vector of ``text`` (and mark it recently used), or None."""
        k = self.key(text)
        with self._lock:
            vec = self._data.get(k)
            if vec is None:
                self.misses += 1
                return None
            self._data.move_to_end(k)
            self.hits += 1
        return vec.copy()

    def put(self, text: str, vec: np.ndarray) -> None:
        """Store a private read-only copy of ``vec`` for ``text``, evicting the least recently used."""
        stored = np.array(vec, dtype=np.float32, copy=True)
        stored.flags.writeable = False
        cost = self._cost(stored)
        if self.max_entries == 0 or cost > self.max_bytes:
            return
        k = self.key(text)
        with self._lock:
            old = self._data.pop(k, None)
            if old is not None:
                self._bytes -= self._cost(old)
            self._data[k] = stored
            self._bytes += cost
            self._evict_locked(self.max_entries, self.max_bytes)

    def _evict_locked(self, max_entries: int, max_bytes: int) -> None:
        while self._data and (len(self._data) > max_entries or self._bytes > max_bytes):
            _k, vec = self._data.popitem(last=False)
            self._bytes -= self._cost(vec)
            self.evictions += 1

    def shrink(self, fraction: float = 0.5) -> int:
        """Evict the least recently used ``fraction`` (0..1) of the entries; return how many went."""
        fraction = min(1.0, max(0.0, float(fraction)))
        with self._lock:
            before = len(self._data)
            keep = before - int(round(before * fraction))
            self._evict_locked(keep, self.max_bytes)
            return before - len(self._data)

    def clear(self) -> None:
        """Drop every entry (counters are kept)."""
        with self._lock:
            self._data.clear()
            self._bytes = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def __contains__(self, text: object) -> bool:
        if not isinstance(text, str):
            return False
        with self._lock:
            return self.key(text) in self._data

    @property
    def bytes(self) -> int:
        """Accounted bytes of the cache (vectors + per-entry overhead)."""
        with self._lock:
            return self._bytes

    def stats(self) -> Dict[str, Any]:
        """entries, bytes, limits, hits, misses, hit_rate, evictions."""
        with self._lock:
            lookups = self.hits + self.misses
            return {
                "entries": len(self._data),
                "bytes": self._bytes,
                "max_entries": self.max_entries,
                "max_bytes": self.max_bytes,
                "hits": self.hits,
                "misses": self.misses,
                "hit_rate": round(self.hits / lookups, 4) if lookups else 0.0,
                "evictions": self.evictions,
            }

    @classmethod
    def from_settings(cls, settings: Settings) -> "LRUCache":
        """A cache sized by ``cache_entries`` and ``cache_mb``."""
        return cls(settings.cache_entries, int(settings.cache_mb * 1024 * 1024))


# ================================================================================================
# onnxruntime embedder
# ================================================================================================

_OPT_LEVELS = ("disable", "basic", "extended", "all")


@dataclass(frozen=True)
class EmbedderOptions:
    """onnxruntime session choices, each switchable so bench/ can measure what it buys.

    The default is the profile tuned for a 512 MB board: no CPU arena and no memory-pattern
    planning (both keep peak buffers around after a long batch), no weight prepacking (prepacking
    copies the memory-mapped int8 weights into private heap), no spinning threads (a spinning
    thread burns the one core the web server also needs), sequential execution, one inter-op
    thread. ``seed_style()`` is plain ``InferenceSession`` defaults, the bench's baseline.

    ``batching``: the int8 graph quantises activations dynamically with ONE scale per tensor, so
    in a padded mini-batch a text's vector depends on its batch-mates and on the padding (cosine
    to the text embedded alone measured as low as 0.977). ``per_text`` (default) runs each text
    alone, unpadded: a text always gets the same vector, whichever call embeds it, which dedupe
    and exact-match recall rely on; it costs at most ~25% throughput on short texts (x86, 1
    thread, 8 x 16 tokens; nothing at 128 tokens). ``padded`` sorts by length and cuts mini-batches
    under ``batch_token_budget``: exact for the fp32 graph, faster for bulk int8 imports.
    """

    profile: str = "tuned"
    plain_session: bool = False          # True: InferenceSession(path) with no SessionOptions at all
    cpu_mem_arena: bool = False
    mem_pattern: bool = False
    # Prepacking stays ON: turning it off saved 10 MB at load but nothing after the first runs
    # (107.2 vs 107.2 MB) and cost +51% latency (1.72 -> 2.60 ms, bench ablation 2026-11-25), beyond
    # the ~30% a memory win may cost. Arena, memory pattern and spinning off cost no latency.
    disable_prepacking: bool = False
    allow_spinning: bool = False
    sequential: bool = True
    inter_op_threads: int = 1
    intra_op_threads: Optional[int] = None   # None: settings.ort_threads
    graph_optimization: str = "all"          # disable | basic | extended | all
    max_concurrent_runs: Optional[int] = None  # None: cpu_count // intra_op_threads (>= 1)
    batching: str = "per_text"               # per_text | padded (see the class docstring)
    verify: str = "deep"                     # deep: sha256 every file at load; fast: sizes + fingerprint
    model_file: str = "model.onnx"           # relative to the model dir ("fp32/model.onnx" for the bench)

    def __post_init__(self) -> None:
        if self.graph_optimization not in _OPT_LEVELS:
            raise ValueError(f"graph_optimization must be one of {_OPT_LEVELS}")
        if self.batching not in ("per_text", "padded"):
            raise ValueError("batching must be 'per_text' or 'padded'")
        if self.verify not in ("deep", "fast"):
            raise ValueError("verify must be 'deep' or 'fast'")

    @classmethod
    def tuned(cls, **changes: Any) -> "EmbedderOptions":
        """The profile for the board (the default)."""
        return replace(cls(), **changes)

    @classmethod
    def seed_style(cls, **changes: Any) -> "EmbedderOptions":
        """onnxruntime defaults, as the old project used them (bench baseline)."""
        base = cls(profile="default", plain_session=True, cpu_mem_arena=True, mem_pattern=True,
                   disable_prepacking=False, allow_spinning=True, sequential=True, inter_op_threads=0,
                   intra_op_threads=0, batching="padded")
        return replace(base, **changes)

    @classmethod
    def named(cls, profile: str, **changes: Any) -> "EmbedderOptions":
        """``"tuned"`` or ``"default"`` (alias ``"seed"``)."""
        if profile == "tuned":
            return cls.tuned(**changes)
        if profile in ("default", "seed", "seed_style"):
            return cls.seed_style(**changes)
        raise ValueError(f"unknown embedder profile {profile!r} (tuned, default)")


def tune_malloc() -> None:
    """Cap glibc malloc at 2 arenas (long-lived multi-threaded service); same as MALLOC_ARENA_MAX=2.

    Each Waitress thread would otherwise get its own arena that keeps freed inference buffers, so RSS
    creeps up with the thread count (HTTP bench, 10k memories, 8 clients: server VmHWM 152.6 -> 149.4 MB).
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, 2)          # M_ARENA_MAX
        # No M_MMAP_THRESHOLD: a 128 KB threshold turned the int8 scan's 1.5 MB block temporaries into
        # an mmap/munmap pair each (HTTP recall p50 at 4 clients 17.7 -> 36.3 ms, measured).
    except (OSError, AttributeError):
        pass


class CachedEmbedding:
    """``embed`` / ``embed_batch`` over the LRU cache, shared by the onnxruntime and numpy embedders.

    The class using it provides ``dim``, ``cache`` (:class:`LRUCache`), ``_stats_lock``, ``timeouts``,
    ``last_embed_ms`` and ``_infer(texts) -> (n, dim)`` (inference without the cache).
    """

    dim: int
    cache: "LRUCache"
    _stats_lock: threading.Lock
    last_embed_ms: Optional[float]

    timeouts: int

    def _infer(self, texts: List[str]) -> np.ndarray:  # pragma: no cover - provided by the embedder
        raise NotImplementedError

    def _count_timeout(self) -> None:
        with self._stats_lock:
            self.timeouts += 1

    def shrink_cache(self, fraction: float = 0.5) -> None:
        """Evict the least recently used ``fraction`` of cached vectors (memory governor)."""
        self.cache.shrink(fraction)

    def embed(self, text: str) -> np.ndarray:
        """``(384,)`` float32 unit vector of ``text``; served from the LRU cache when possible."""
        return self.embed_batch([text])[0]

    def embed_batch(self, texts: Sequence[str]) -> np.ndarray:
        """``(n, 384)`` float32 unit vectors; cache hits skip inference, duplicates run once."""
        if isinstance(texts, str):
            raise TypeError("embed_batch takes a sequence of strings, not a string")
        texts = list(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        pending: Dict[str, List[int]] = {}
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {i} is {type(text).__name__}, not str")
            if text in pending:
                pending[text].append(i)
                continue
            vec = self.cache.get(text)
            if vec is None:
                pending[text] = [i]
            else:
                out[i] = vec
        if pending:
            start = time.perf_counter()
            unique = list(pending)
            vectors = self._infer(unique)
            for text, vec in zip(unique, vectors):
                self.cache.put(text, vec)
                out[pending[text]] = vec
            with self._stats_lock:
                self.last_embed_ms = round((time.perf_counter() - start) * 1000.0, 3)
        return out


class LazyModel(CachedEmbedding):
    """The model lifecycle both real embedders share: lazy, thread-safe load; in-flight runs counted so
    an unload waits for them; idle unload; close; background warm-up; load/unload counters.

    Subclasses set ``settings`` and ``model_dir``, call :meth:`_init_lifecycle`, and provide
    ``fingerprint``, ``_create_runtime()`` (the loaded model, any object; raise ModelUnavailable) and
    ``_infer``. A run takes the runtime with :meth:`_acquire` and gives it back with :meth:`_release`.
    """

    settings: Settings
    model_dir: Any
    _THREAD_PREFIX = "memento-embedder"

    def _init_lifecycle(self) -> None:
        # State below is guarded by _cond.
        self._cond = threading.Condition(threading.Lock())
        self._runtime: Any = None
        self._loading = False
        self._unloading = False
        self._inflight = 0
        self._generation = 0
        self._closed = False
        self._last_used = time.monotonic()
        self._loaded_fingerprint: Optional[str] = None
        self._stats_lock = threading.Lock()
        self.load_count = 0
        self.unload_count = 0
        self.timeouts = 0
        self.load_ms: Optional[float] = None
        self.last_embed_ms: Optional[float] = None
        self.last_error: Optional[str] = None

    @property
    def fingerprint(self) -> str:  # pragma: no cover - provided by the embedder
        """The model's manifest fingerprint, without loading it."""
        raise NotImplementedError

    def _create_runtime(self) -> Any:  # pragma: no cover - provided by the embedder
        raise NotImplementedError

    @property
    def loaded(self) -> bool:
        """Whether the model is in memory."""
        with self._cond:
            return self._runtime is not None

    def load(self) -> None:
        """Load the model now (no-op when loaded; waits if another thread is loading)."""
        self._acquire(time.monotonic() + max(float(self.settings.request_timeout), 0.0), wait=True)
        self._release()

    def _acquire(self, deadline: float, *, wait: bool = True) -> Any:
        """The runtime, with the in-flight counter raised; loads it if needed.

        Waiting for another thread's load or unload is bounded by ``deadline`` (EmbedTimeout).
        The thread that loads is not interrupted (a half-created model is useless).
        """
        with self._cond:
            while True:
                if self._closed:
                    raise ModelUnavailable("embedder is closed")
                if self._runtime is not None and not self._unloading:
                    self._inflight += 1
                    self._last_used = time.monotonic()
                    return self._runtime
                if not self._loading and not self._unloading:
                    self._loading = True
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not wait:
                    raise self._timed_out("timed out waiting for the embedding model to load",
                                          self.settings.request_timeout)
                self._cond.wait(remaining)
        return self._load_as_loader()

    def _load_as_loader(self) -> Any:
        # Called by the one thread that set _loading; loads outside the lock so stats()/loaded stay
        # responsive.
        start = time.perf_counter()
        try:
            runtime = self._create_runtime()
        except ModelUnavailable as exc:
            self._loader_failed(str(exc))
            raise
        except Exception as exc:   # runtime / tokenizer errors: corrupt or incompatible files
            self._loader_failed(repr(exc))
            raise ModelUnavailable(f"cannot load the embedding model from {self.model_dir}: {exc}") from exc
        elapsed = (time.perf_counter() - start) * 1000.0
        try:
            fp: Optional[str] = self.fingerprint
        except ModelUnavailable:
            fp = None
        with self._cond:
            if fp != self._loaded_fingerprint:
                # A different model: cached vectors belong to the old one.
                self.cache.clear()
                self._loaded_fingerprint = fp
            self._runtime = runtime
            self._loading = False
            self._generation += 1
            self._inflight += 1
            self._last_used = time.monotonic()
            self.load_count += 1
            self.load_ms = round(elapsed, 1)
            self.last_error = None
            self._cond.notify_all()
            self._start_idle_watch_locked()
            log.info("embedding model loaded from %s in %.0f ms", self.model_dir, elapsed)
            return runtime

    def _timed_out(self, message: str, timeout: float) -> EmbedTimeout:
        """Count a timeout and return the error to raise (clients retry after a quarter of it)."""
        self._count_timeout()
        return EmbedTimeout(message, retry_after=max(1.0, timeout / 4))

    def _loader_failed(self, message: str) -> None:
        with self._cond:
            self._loading = False
            self.last_error = message
            self._cond.notify_all()

    def _release(self) -> None:
        with self._cond:
            self._inflight -= 1
            self._last_used = time.monotonic()
            self._cond.notify_all()

    def unload(self) -> None:
        """Free the model once in-flight runs finish; the next call reloads it."""
        with self._cond:
            while self._unloading:          # another unload is on it
                self._cond.wait()
            if self._runtime is None and not self._loading:
                return
            self._unloading = True
            try:
                while self._inflight > 0 or self._loading:
                    self._cond.wait()
                self._drop_locked("requested")
            finally:
                self._unloading = False
                self._cond.notify_all()
        malloc_trim()

    def _drop_locked(self, reason: str) -> None:
        if self._runtime is None:
            return
        self._runtime = None
        self._generation += 1
        self.unload_count += 1
        log.info("embedding model unloaded (%s)", reason)

    def close(self) -> None:
        """Unload and refuse further work (stops the idle watcher)."""
        self.unload()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __enter__(self) -> "LazyModel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _start_idle_watch_locked(self) -> None:
        minutes = float(self.settings.idle_unload_minutes or 0.0)
        if minutes <= 0:
            return
        threading.Thread(target=self._idle_watch, args=(self._generation, minutes * 60.0),
                         name=f"{self._THREAD_PREFIX}-idle", daemon=True).start()

    def _idle_watch(self, generation: int, idle_s: float) -> None:
        """Unload after ``idle_s`` without use; exits when this model is gone (a reload starts anew)."""
        unloaded = False
        with self._cond:
            while (not self._closed and self._runtime is not None and self._generation == generation):
                remaining = self._last_used + idle_s - time.monotonic()
                if remaining <= 0 and self._inflight == 0 and not self._unloading:
                    self._drop_locked(f"idle for {idle_s / 60:.1f} min")
                    self._cond.notify_all()
                    unloaded = True
                    break
                # Busy (in flight) with the idle time already spent: re-check when a run releases.
                self._cond.wait(remaining if remaining > 0 else idle_s)
        if unloaded:
            malloc_trim()

    def start_warmup(self) -> threading.Thread:
        """Load the model and run one tiny inference in a daemon thread (``settings.warmup``).

        The one warm-up path: ``web.serve`` calls it; a failure is only logged (a missing model is
        reported by the first real call too, and recall degrades to keyword search meanwhile).
        """
        def warm() -> None:
            try:
                self._infer(["warm up"])
                log.info("embedding model warmed up")
            except Exception as exc:
                log.warning("embedding model warm-up failed: %s", exc)

        t = threading.Thread(target=warm, name=f"{self._THREAD_PREFIX}-warmup", daemon=True)
        t.start()
        return t

    def _lifecycle_stats(self) -> Dict[str, Any]:
        """The stats keys both embedders report."""
        try:
            fp: Optional[str] = self.fingerprint
        except ModelUnavailable:
            fp = None
        with self._cond:
            loaded, inflight = self._runtime is not None, self._inflight
        with self._stats_lock:
            return {"loaded": loaded, "backend": getattr(self, "backend", None), "model_dir": str(self.model_dir),
                    "fingerprint": fp, "cache": self.cache.stats(), "load_count": self.load_count,
                    "unload_count": self.unload_count, "timeouts": self.timeouts, "in_flight": inflight,
                    "load_ms": self.load_ms, "last_embed_ms": self.last_embed_ms, "last_error": self.last_error}


class OnnxEmbedder(LazyModel):
    """The production embedder: int8 MiniLM on onnxruntime, with an LRU cache (see module doc)."""

    dim = DIM
    backend = "onnxruntime"
    _TOKENIZE_CHUNK = 256   # texts tokenised at a time: bounds memory of a 10,000-text reindex

    def __init__(self, settings: Settings, options: Optional[EmbedderOptions] = None, *,
                 seed_style: bool = False, cache: Optional[LRUCache] = None) -> None:
        self.settings = settings
        self.options = options or (EmbedderOptions.seed_style() if seed_style else EmbedderOptions.tuned())
        self.model_dir = settings.model_path
        self.cache = cache if cache is not None else LRUCache.from_settings(settings)
        intra = self.options.intra_op_threads
        self._intra_threads = settings.ort_threads if intra is None else intra
        slots = self.options.max_concurrent_runs
        if slots is None:
            slots = max(1, (os.cpu_count() or 1) // max(1, self._intra_threads or 1))
        self.max_concurrent_runs = max(1, int(slots))
        self._slots = threading.BoundedSemaphore(self.max_concurrent_runs)
        self._watchdog = Watchdog("memento-embed-timeout")

        self._init_lifecycle()
        self._manifest_cache: Optional[Tuple[Tuple[int, int], str]] = None
        self.embed_count = 0
        self.run_count = 0

    # --- identity ---------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """The manifest fingerprint, read from manifest.json without loading the session."""
        mpath = self.model_dir / MANIFEST_FILE
        try:
            st = mpath.stat()
        except OSError:
            load_manifest(self.model_dir)   # raises ModelUnavailable with the how-to-build message
            raise ModelUnavailable(f"cannot read {mpath}") from None
        key = (st.st_mtime_ns, st.st_size)
        cached = self._manifest_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        fp = load_manifest(self.model_dir).fingerprint
        self._manifest_cache = (key, fp)
        return fp

    @property
    def _session(self) -> Any:
        """The onnxruntime session, or None when unloaded (the runtime is ``(session, tokenizer)``)."""
        runtime = self._runtime
        return None if runtime is None else runtime[0]

    # --- loading ----------------------------------------------------------------------------
    def _session_options(self) -> Any:
        import onnxruntime as ort

        o = self.options
        so = ort.SessionOptions()
        so.enable_cpu_mem_arena = o.cpu_mem_arena
        so.enable_mem_pattern = o.mem_pattern
        so.intra_op_num_threads = max(0, int(self._intra_threads))
        so.inter_op_num_threads = max(0, int(o.inter_op_threads))
        so.execution_mode = (ort.ExecutionMode.ORT_SEQUENTIAL if o.sequential
                             else ort.ExecutionMode.ORT_PARALLEL)
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[o.graph_optimization]
        so.log_severity_level = 3   # warnings about unused initializers etc. are noise in the service log
        if o.disable_prepacking:
            so.add_session_config_entry("session.disable_prepacking", "1")
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if o.allow_spinning else "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "1" if o.allow_spinning else "0")
        return so

    def _create_runtime(self) -> Tuple[Any, Any]:
        """Verify the model directory and create ``(session, tokenizer)``. Overridden by test fakes."""
        import onnxruntime as ort
        from tokenizers import Tokenizer

        verify_model_dir(self.model_dir, deep=self.options.verify == "deep")
        model_path = self.model_dir / self.options.model_file
        if not model_path.is_file():
            raise ModelUnavailable(f"model file {model_path} not found")
        tokenizer = Tokenizer.from_file(str(self.model_dir / TOKENIZER_FILE))
        tokenizer.enable_truncation(max_length=int(self.settings.max_tokens))
        tokenizer.no_padding()
        if self.options.plain_session:
            session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        else:
            session = ort.InferenceSession(str(model_path), sess_options=self._session_options(),
                                           providers=["CPUExecutionProvider"])
        return session, tokenizer

    def close(self) -> None:
        """Unload, refuse further work and stop the timeout watchdog."""
        super().close()
        self._watchdog.stop()

    def __enter__(self) -> "OnnxEmbedder":
        return self

    # --- embedding --------------------------------------------------------------------------
    def _infer(self, texts: List[str]) -> np.ndarray:
        """Run the model on ``texts`` (no cache), chunk by chunk, mini-batch by mini-batch."""
        result = np.empty((len(texts), self.dim), dtype=np.float32)
        for lo in range(0, len(texts), self._TOKENIZE_CHUNK):
            chunk = texts[lo:lo + self._TOKENIZE_CHUNK]
            ids = self._tokenize(chunk)
            # per_text: a budget of 0 makes every text its own batch (see EmbedderOptions.batching).
            budget = self.settings.batch_token_budget if self.options.batching == "padded" else 0
            for batch in plan_batches([len(x) for x in ids], budget):
                vecs = self._run([ids[j] for j in batch])
                result[[lo + j for j in batch]] = vecs
        with self._stats_lock:
            self.embed_count += len(texts)
        return result

    def _tokenize(self, texts: List[str]) -> List[np.ndarray]:
        deadline = time.monotonic() + max(self.settings.request_timeout, 0.0)
        _session, tokenizer = self._acquire(deadline)
        try:
            # One encode() per text, not encode_batch(): the batch call starts a rayon thread pool
            # per core, memory the board does not have; tokenising is microseconds next to a run.
            return [np.asarray(tokenizer.encode(t).ids, dtype=np.int64) for t in texts]
        finally:
            self._release()

    def _run(self, seqs: List[np.ndarray]) -> np.ndarray:
        """One inference over ``seqs`` padded to the longest; bounded by ``request_timeout``."""
        timeout = max(float(self.settings.request_timeout), 0.0)
        deadline = time.monotonic() + timeout
        if not self._slots.acquire(timeout=timeout):
            raise self._timed_out(f"embedding model busy for more than {timeout:g}s", timeout)
        try:
            session, _tok = self._acquire(deadline)
            try:
                longest = max(len(s) for s in seqs)
                ids = np.zeros((len(seqs), longest), dtype=np.int64)
                mask = np.zeros((len(seqs), longest), dtype=np.int64)
                for row, s in enumerate(seqs):
                    ids[row, :len(s)] = s
                    mask[row, :len(s)] = 1
                return self._run_session(session, ids, mask, timeout)
            finally:
                del session
                self._release()
        finally:
            self._slots.release()

    def _run_session(self, session: Any, ids: np.ndarray, mask: np.ndarray, timeout: float) -> np.ndarray:
        import onnxruntime as ort

        run_options = ort.RunOptions()
        fired = threading.Event()

        def stop() -> None:
            fired.set()
            run_options.terminate = True   # onnxruntime aborts the run at the next node

        handle = self._watchdog.arm(timeout, stop) if timeout > 0 else None
        try:
            (vecs,) = session.run(["sentence_embedding"], {"input_ids": ids, "attention_mask": mask},
                                  run_options)
        except Exception as exc:
            if fired.is_set():
                raise self._timed_out(f"embedding took longer than {timeout:g}s and was stopped", timeout) from exc
            raise ModelUnavailable(f"embedding inference failed: {exc}") from exc
        finally:
            if handle is not None:
                self._watchdog.disarm(handle)
        with self._stats_lock:
            self.run_count += 1
        return np.asarray(vecs, dtype=np.float32)

    # --- stats ------------------------------------------------------------------------------
    def stats(self) -> Dict[str, Any]:
        """loaded, backend, fingerprint, cache counters, embed/run/load counters and timings."""
        out = self._lifecycle_stats()
        with self._stats_lock:
            out.update(profile=self.options.profile, options=asdict(self.options), embed_count=self.embed_count,
                       run_count=self.run_count, max_concurrent_runs=self.max_concurrent_runs)
        return out


def plan_batches(lengths: Sequence[int], token_budget: int) -> List[List[int]]:
    """Group indices into mini-batches by length so that ``len(batch) * longest <= token_budget``.

    Indices are sorted by length first, so texts of similar length share a batch and padding stays
    small; a text longer than the budget runs alone. Returns lists of original indices.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: List[List[int]] = []
    current: List[int] = []
    for i in order:
        # Sorted ascending: the newcomer is the longest of the candidate batch.
        if current and (len(current) + 1) * lengths[i] > token_budget:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def make_embedder(settings: Settings, options: Optional[EmbedderOptions] = None, *,
                  backend: Optional[str] = None) -> Embedder:
    """The best available embedder for ``settings``.

    onnxruntime + tokenizers when both import (x86, aarch64, armv7 with wheels), else the numpy
    int8 fallback of :mod:`memento_edge.fallback` (armv6, same weights). ``backend`` forces one
    ("onnxruntime" or "numpy-int8"). The model loads on first use (``web.serve`` warms it up when
    ``settings.warmup``).
    """
    embedder: Any
    want = backend
    if want in (None, "onnxruntime"):
        try:
            import onnxruntime  # noqa: F401
            import tokenizers  # noqa: F401
        except ImportError as exc:
            if want == "onnxruntime":
                raise ModelUnavailable(f"onnxruntime backend unavailable: {exc}") from exc
        else:
            want = "onnxruntime"
    if want == "onnxruntime":
        embedder = OnnxEmbedder(settings, options)
    elif want in (None, "numpy-int8"):
        try:
            from .fallback import NumpyEmbedder
        except ImportError as exc:
            raise ModelUnavailable("no embedding backend: onnxruntime/tokenizers are not installed and "
                                   f"the numpy fallback is unavailable ({exc})") from exc
        embedder = NumpyEmbedder(settings)
    else:
        raise ValueError(f"unknown embedder backend {backend!r}")
    return embedder


# ================================================================================================
# FakeEmbedder: FOR UNIT TESTS OF OTHER MODULES ONLY
# ================================================================================================

_WORD = re.compile(r"\w+", re.UNICODE)


class FakeEmbedder:
    """DETERMINISTIC HASHING EMBEDDER FOR UNIT TESTS ONLY - NEVER USED BY THE PRODUCT.

    Each lower-cased word adds +-1 at three hashed positions of a 384-d vector, which is then
    L2-normalised: texts sharing words get a high cosine, unrelated texts about 0. Same text,
    same vector, in every process. It honours the :class:`Embedder` protocol (load/unload,
    cache, stats) so tests of memory.py / web/ can exercise those paths without the model.
    ``fail_with`` makes every embed raise that exception (to test degradation paths).
    """

    dim = DIM
    backend = "fake"

    def __init__(self, settings: Optional[Settings] = None, *, fingerprint: str = "fake-test-embedder",
                 fail_with: Optional[BaseException] = None) -> None:
        s = settings or Settings()
        self.cache = LRUCache.from_settings(s)
        self._fingerprint = fingerprint
        self.fail_with = fail_with
        self._loaded = False
        self._lock = threading.Lock()
        self.embed_count = 0
        self.load_count = 0
        self.unload_count = 0

    @property
    def fingerprint(self) -> str:
        """``"fake-test-embedder"`` unless given another (to test model-mismatch handling)."""
        return self._fingerprint

    @property
    def loaded(self) -> bool:
        """Whether load() (or an embed) happened since the last unload()."""
        return self._loaded

    def load(self) -> None:
        """Mark loaded (no model involved)."""
        with self._lock:
            if not self._loaded:
                self._loaded = True
                self.load_count += 1

    def unload(self) -> None:
        """Mark unloaded; the next embed "reloads"."""
        with self._lock:
            if self._loaded:
                self._loaded = False
                self.unload_count += 1

    def start_warmup(self) -> threading.Thread:
        """"Load" in a daemon thread, like the real embedders."""
        t = threading.Thread(target=self.load, name="memento-fake-warmup", daemon=True)
        t.start()
        return t

    @staticmethod
    def vector(text: str) -> np.ndarray:
        """The fake vector of ``text`` (no cache, no counters)."""
        vec = np.zeros(DIM, dtype=np.float64)
        words = _WORD.findall(text.lower()) or [text]
        for word in words:
            digest = hashlib.blake2b(word.encode("utf-8", "surrogatepass"), digest_size=12).digest()
            for j in range(3):
                idx = int.from_bytes(digest[4 * j:4 * j + 3], "little") % DIM
                vec[idx] += 1.0 if digest[4 * j + 3] & 1 else -1.0
        norm = float(np.linalg.norm(vec))
        if norm == 0.0:   # the +-1s cancelled out: fall back to one position
            vec[digest[0] % DIM] = 1.0
            norm = 1.0
        return (vec / norm).astype(np.float32)

    def embed_batch(self, texts: Sequence[str]) -> np.ndarray:
        """``(n, 384)`` fake unit vectors."""
        if self.fail_with is not None:
            raise self.fail_with
        self.load()
        texts = list(texts)
        out = np.empty((len(texts), DIM), dtype=np.float32)
        for i, text in enumerate(texts):
            vec = self.cache.get(text)
            if vec is None:
                vec = self.vector(text)
                self.cache.put(text, vec)
                with self._lock:
                    self.embed_count += 1
            out[i] = vec
        return out

    def embed(self, text: str) -> np.ndarray:
        """``(384,)`` fake unit vector."""
        return self.embed_batch([text])[0]

    def shrink_cache(self, fraction: float = 0.5) -> None:
        """Evict the oldest ``fraction`` of the cache."""
        self.cache.shrink(fraction)

    def stats(self) -> Dict[str, Any]:
        """Same keys as OnnxEmbedder.stats() where they make sense."""
        return {"loaded": self._loaded, "backend": self.backend, "fingerprint": self._fingerprint,
                "cache": self.cache.stats(), "embed_count": self.embed_count,
                "load_count": self.load_count, "unload_count": self.unload_count,
                "load_ms": 0.0, "last_embed_ms": None}


__all__ = ["Embedder", "EmbedderOptions", "FakeEmbedder", "LRUCache", "OnnxEmbedder", "make_embedder",
           "plan_batches", "DIM"]
