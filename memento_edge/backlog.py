"""Background embedding: writes that never wait for the model.

With ``embed_mode: background`` (the default on armv6l, where one embedding takes seconds),
``Memory.remember`` commits the text, metadata, tags and keyword index and answers at once with
``"embedding": "pending"``; the vector is owed in the ``embed_backlog`` table (migration
``m004_embed_backlog``). The :class:`EmbedWorker` thread pays the debt in queue order, a few texts per
transaction, at a lower priority than queries; a restart (or kill -9) resumes from the table.

Order of the rules that touch a pending memory (also in the README):

1. **Write time - exact dedupe.** The same text in the same collection returns the existing id
   (``created: false``), pending or not; nothing new is queued.
2. **Embed time - near-duplicate merge** (only when ``dedupe_threshold`` > 0). Once its vector exists,
   a pending memory whose nearest embedded neighbour in the collection (or an earlier memory of the same
   batch) is at least that similar is *merged*: it is deleted and ``get`` of its id answers NotFound
   naming the memory it was merged into - the same end state an inline write reaches by refusing it.
3. **update** of a memory's text in background mode drops its vector and re-queues it at the end of
   the backlog (keyword recall sees the new text at once); an embedding of the old text that was in
   flight is discarded when it lands. Updates of other fields leave the queue alone. In inline mode a
   text update embeds at once and takes the memory off the backlog.
4. **delete** drops the debt with the memory (``ON DELETE CASCADE``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, Optional

import numpy as np

from .errors import Busy, MementoError, ModelMismatch, ModelUnavailable, StoreError

if TYPE_CHECKING:  # pragma: no cover
    from .memory import Memory

BATCH = 8               # texts read per round; one transaction per round (or per COMMIT_S of work)
COMMIT_S = 2.0          # on a slow board, commit what is done every few seconds rather than per round
MAX_ATTEMPTS = 3        # non-transient failures before an entry is skipped (reported as failed)
POLL_S = 5.0            # idle re-check of the table: the CLI beside the service may have queued work
BACKOFF_MAX_S = 60.0    # longest wait after a transient failure (model missing, database busy)
WORKER_NICE = 10        # the worker thread's nice increment: queries keep the CPU on a one-core board
# Failures that are not the text's fault: wait and retry without counting an attempt.
TRANSIENT = (ModelUnavailable, ModelMismatch, Busy, StoreError)


class QueryFirst:
    """Queries take the model first: the worker parks while any foreground embedding runs, and a large
    inline write parks between its texts while a recall query embeds (``Memory._bulk_vectors``)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._active = 0
        self._queries = 0

    @contextlib.contextmanager
    def foreground(self, *, query: bool = False) -> Iterator[None]:
        """Mark a query (``query=True``) or an inline write as using the model for the duration of the block."""
        with self._cond:
            self._active += 1
            self._queries += int(query)
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._queries -= int(query)
                self._cond.notify_all()

    def wait_for_queries(self, timeout: float) -> None:
        """Return once no recall query embeds, or after ``timeout`` s (the write must still progress)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queries:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)

    def wait_idle(self, stop: Optional[threading.Event] = None) -> None:
        """Return once no foreground embedding runs (or ``stop`` is set)."""
        with self._cond:
            while self._active and not (stop is not None and stop.is_set()):
                self._cond.wait(0.5)


def embed_one(embedder: Any, text: str, pause: Callable[[], None]) -> np.ndarray:
    """``text``'s vector for the worker: layer by layer with ``pause`` between layers when the embedder
    can (the numpy int8 runtime), else one call after ``pause`` (onnxruntime: milliseconds)."""
    deferring = getattr(embedder, "embed_deferring", None)
    if callable(deferring):
        return np.asarray(deferring(text, pause), dtype=np.float32)
    pause()
    return np.asarray(embedder.embed_batch([text])[0], dtype=np.float32)


class EmbedWorker:
    """The thread that drains the backlog of one :class:`~memento_edge.memory.Memory`."""

    def __init__(self, memory: "Memory", may_embed: Optional[Callable[[], bool]] = None) -> None:
        self.memory = memory
        # The service's memory governor: False while memory is critically high (the worker then waits
        # like after a transient failure, so it never reloads a model the governor has just unloaded).
        self.may_embed = may_embed or (lambda: True)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.state = "stopped"          # stopped | idle | embedding | waiting (transient failure)
        self.last_error: Optional[str] = None
        self.embedded = 0               # vectors written by this process's worker

    def start(self) -> None:
        """Start the thread (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="memento-embed-backlog", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """New work was queued by this process: look now instead of at the next poll."""
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the thread to stop after the text in hand (work done so far is committed)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.state = "stopped"

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called."""
        return self._stop.is_set()

    def pause(self) -> None:
        """Between texts and between layers: park while a query embeds; raise to abandon on stop."""
        self.memory.query_first.wait_idle(self._stop)
        if self._stop.is_set():
            raise WorkerStopping("the background worker is stopping")

    def _run(self) -> None:
        _lower_thread_priority()
        backoff = 1.0
        while not self._stop.is_set():
            try:
                if not self.may_embed():
                    raise Busy("memory is critically high: background embedding waits")
                self.state = "embedding"
                done = self.memory.embed_pending(BATCH, pause=self.pause)
                self.embedded += done
                self.last_error = None
                backoff = 1.0
            except WorkerStopping:
                break
            except TRANSIENT as exc:
                self.state, self.last_error = "waiting", str(exc)
                _log.warning("background embedding paused for %.0f s: %s", backoff, exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            except Exception as exc:  # a bug must not kill the thread silently: log, back off, retry
                self.state, self.last_error = "waiting", f"{type(exc).__name__}: {exc}"
                _log.exception("background embedding failed")
                self._stop.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            if done == 0:
                self.state = "idle"
                self._wake.wait(POLL_S)
                self._wake.clear()
        self.state = "stopped"

    def describe(self) -> Dict[str, Any]:
        """The worker's state for stats: state, last error, vectors written by this process."""
        alive = self._thread is not None and self._thread.is_alive()
        return {"state": self.state if alive else "stopped", "last_error": self.last_error,
                "embedded": self.embedded}


class WorkerStopping(MementoError):
    """Raised inside ``pause`` to abandon the text in hand when the worker stops (work done is kept)."""


def _lower_thread_priority() -> None:
    # Linux applies nice per thread (PRIO_PROCESS with a thread id). Elsewhere the QueryFirst gate alone
    # gives queries the model.
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICE)
    except (AttributeError, OSError):
        pass


_log = logging.getLogger(__name__)
__all__ = ["EmbedWorker", "QueryFirst", "WorkerStopping", "embed_one", "BATCH", "COMMIT_S", "MAX_ATTEMPTS",
           "TRANSIENT"]
