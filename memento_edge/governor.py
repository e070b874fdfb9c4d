"""Memory governor: keeps the service's resident memory under ``settings.rss_limit_mb``.

A Pi Zero has 512 MB and no swap worth using; the kernel's OOM killer is the alternative to this module.
The governor reads the process RSS from ``/proc/self/statm`` (one small read, no psutil on the device)
at most every ``interval`` seconds and reacts in two steps:

* above ``soft`` (85 %) of the limit: shrink the embedder's LRU cache and, if no request is embedding
  right now, unload the model (the next embed reloads it - slow, but better than being killed); then ask
  glibc to hand freed heap pages back to the kernel (``malloc_trim``), since Python and onnxruntime keep
  freed memory otherwise and the RSS would not drop;
* above ``hard`` (95 %): additionally *shed* requests that would embed (remember, import, vector/hybrid
  recall) with :class:`~memento_edge.errors.Busy` (HTTP 503 + Retry-After). Keyword recall, reads,
  health and metrics keep working.

With ``rss_limit_mb == 0`` the governor only reports the RSS. It also runs the idle unload
(``settings.idle_unload_minutes``) from :meth:`Governor.tick`, which ``web.serve`` calls from a
background thread so an idle service frees the model even when no request arrives.
"""
from __future__ import annotations

import ctypes
import gc
import logging
import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, Optional

from .errors import Busy

log = logging.getLogger(__name__)

OK, SOFT, HARD = "ok", "soft", "hard"


def read_rss_bytes(path: str = "/proc/self/statm") -> Optional[int]:
    """Resident set size of this process in bytes, or None where ``/proc`` is unavailable."""
    try:
        with open(path, "rb") as fh:
            fields = fh.read(128).split()
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def malloc_trim() -> None:
    """Return free heap pages to the kernel (glibc keeps them otherwise); best effort, Linux only.

    Called after a model unload (embedder), after relief under memory pressure (governor) and after a
    large write body (web).
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Governor:
    """RSS watchdog shared by all request threads (thread-safe; checks are cheap and rate-limited)."""

    def __init__(self, rss_limit_mb: float, embedder_getter: Callable[[], Any], *,
                 idle_unload_minutes: float = 0.0, interval: float = 0.5, soft: float = 0.85,
                 hard: float = 0.95, retry_after: float = 5.0,
                 rss_reader: Callable[[], Optional[int]] = read_rss_bytes,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit_bytes = int(rss_limit_mb * 1024 * 1024) if rss_limit_mb and rss_limit_mb > 0 else 0
        self.idle_unload_seconds = max(0.0, float(idle_unload_minutes or 0.0)) * 60.0
        self._embedder_getter = embedder_getter
        self.interval = interval
        self.soft = soft
        self.hard = hard
        self.retry_after = retry_after
        self._read_rss = rss_reader
        self._clock = clock
        self._lock = threading.Lock()
        self._last_check = float("-inf")
        self._last_relief = float("-inf")
        self._state = OK
        self._rss: Optional[int] = None
        self._in_flight = 0
        self._last_activity = clock()
        self.shed_count = 0
        self.relief_count = 0
        self.idle_unloads = 0

    # --- state ------------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        """``ok``, ``soft`` or ``hard`` as of the last check (refreshed if older than ``interval``)."""
        return self.check()

    @property
    def rss_bytes(self) -> Optional[int]:
        """The RSS read by the last check."""
        return self._rss

    def check(self, force: bool = False) -> str:
        """Re-read the RSS if the last reading is older than ``interval``; react; return the state."""
        now = self._clock()
        with self._lock:
            if not force and now - self._last_check < self.interval:
                return self._state
            self._last_check = now
            rss = self._read_rss()
            self._rss = rss
            if not self.limit_bytes or rss is None:
                self._state = OK
                return OK
            ratio = rss / self.limit_bytes
            state = HARD if ratio >= self.hard else SOFT if ratio >= self.soft else OK
            if state != self._state:
                log.log(logging.WARNING if state != OK else logging.INFO,
                        "memory governor: %s (RSS %.1f MB of %.1f MB limit)", state, rss / 1048576,
                        self.limit_bytes / 1048576)
            self._state = state
            # Relief at most once per interval*4: shrinking and trimming every check would only burn CPU.
            relieve = state != OK and now - self._last_relief >= self.interval * 4
            if relieve:
                self._last_relief = now
            idle = self._in_flight == 0
        if relieve:
            self._relieve(unload=idle)
        return state

    def _relieve(self, *, unload: bool) -> None:
        embedder = self._embedder()
        if embedder is not None:
            try:
                embedder.shrink_cache(0.5)
                if unload and getattr(embedder, "loaded", False):
                    embedder.unload()
                    log.warning("memory governor: unloaded the model to free memory")
            except Exception:  # relief is best effort: never fail a request because of it
                log.exception("memory governor: relief failed")
        gc.collect()
        malloc_trim()
        self.relief_count += 1

    def _embedder(self) -> Any:
        try:
            return self._embedder_getter()
        except Exception:
            return None

    # --- request hooks ----------------------------------------------------------------------------
    def admit_embedding(self) -> None:
        """Raise :class:`Busy` if memory is critically high; call before any work that would embed."""
        if self.check() == HARD:
            with self._lock:
                self.shed_count += 1
            raise Busy("the server is low on memory and is not taking work that needs the embedding "
                       "model right now; keyword recall still works", retry_after=self.retry_after)

    def pace(self, done: int, total: Optional[int]) -> None:
        """Between the mini-batches of a long write: re-check memory (relief runs if needed) and stop the
        rest of the work with :class:`Busy` when it is critically high. What was stored stays stored; a
        retry recognises it (exact duplicates return their ids)."""
        if self.check() == HARD:
            with self._lock:
                self.shed_count += 1
            of = f" of {total}" if total is not None else ""
            raise Busy(f"the server ran low on memory during this write and stopped after {done}{of} "
                       "memories; retry the rest shortly", retry_after=self.retry_after)

    @contextmanager
    def embedding(self) -> Iterator[None]:
        """Admit (or shed) a request that will embed and mark it in flight while it runs."""
        # Counted in flight *before* the check, so relief triggered by this very check does not
        # unload the model this request is about to use.
        with self._lock:
            self._in_flight += 1
        try:
            self.admit_embedding()
            yield
        finally:
            with self._lock:
                self._in_flight -= 1
                self._last_activity = self._clock()

    def tick(self) -> None:
        """Periodic housekeeping (background thread): RSS check and the idle model unload."""
        self.check(force=True)
        if not self.idle_unload_seconds:
            return
        with self._lock:
            idle_for = self._clock() - self._last_activity
            busy = self._in_flight > 0
        if busy or idle_for < self.idle_unload_seconds:
            return
        embedder = self._embedder()
        if embedder is not None and getattr(embedder, "loaded", False):
            try:
                embedder.unload()
                self.idle_unloads += 1
                log.info("unloaded the model after %.0f idle minutes", idle_for / 60)
                gc.collect()
                malloc_trim()
            except Exception:
                log.exception("idle unload failed")

    def start_background(self, period: float = 5.0) -> threading.Event:
        """Run :meth:`tick` every ``period`` seconds in a daemon thread; set the returned event to stop."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(period):
                try:
                    self.tick()
                except Exception:
                    log.exception("memory governor tick failed")

        threading.Thread(target=loop, name="memento-governor", daemon=True).start()
        return stop

    def stats(self) -> Dict[str, Any]:
        """Governor state for /v1/stats and /metrics."""
        state = self.check()
        return {
            "state": state,
            "rss_bytes": self._rss,
            "rss_limit_bytes": self.limit_bytes,
            "in_flight_embeds": self._in_flight,
            "shed_requests": self.shed_count,
            "reliefs": self.relief_count,
            "idle_unloads": self.idle_unloads,
        }
