"""Background embedding (#13 item 4) measured: how fast a write is acknowledged, how fast the backlog
drains, and whether queries really go first while the worker drains it.

    python -m bench.backlog [--backlog 200] [--queries 40] [--seed 50] [--backend numpy-int8] [--out FILE]
    python -m bench.backlog --ack-only --backlog 50        # phases 0-2 only (no draining)

The real model (``--model-dir``, default models/minilm-int8), durable writes (synchronous=FULL):

0. **ack, inline**: ``--inline-acks`` remembers with ``embed_mode: inline`` (they wait for the model):
   the comparison, measured at the same machine load;
1. **seed** (background from here on): ``--seed`` memories written and drained in this thread, no
   queries: the drain rate alone;
2. **ack, worker idle**: ``--backlog`` remembers timed one by one: the backlog;
3. **query, worker idle**: ``--queries`` vector recalls, nothing else running;
4. **worker draining, query-first on**: the worker drains the backlog while as many new queries run
   back to back, each followed by a timed write (ack while draining). Only queries that ended with
   work still pending count;
5. **worker draining, query-first off**: a second backlog, with the QueryFirst gate replaced by one that
   never parks the worker (its nice +10 still applies): what the gate buys.

Besides latencies (which move with the machine's load: the load average is in the output), phases 4
and 5 count the worker's steps - layers of the numpy int8 runtime, whole texts on onnxruntime - that
started while a query was embedding: with query-first that is at most the one step in flight when a
query arrives. The worker's embedding order is compared with the write order. Queries differ from each
other, so the embedding cache never answers one. Under qemu-user every guest thread is a host thread,
so a one-core Pi Zero is not modelled: there the latencies of 4 and 5 are a lower bound on the gap.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

from .engine import DEFAULT_MODEL_DIR, gen_query, gen_text, now_ms, platform_info, summarize

WORKER_THREAD = "memento-embed-backlog"  # backlog.EmbedWorker's thread name


class _Recorder:
    """The real embedder, recording the texts the backlog worker embeds (in order) and how many worker
    steps (layers of the numpy int8 runtime, else whole texts) started while a query was embedding:
    the load-independent measure of "queries first" (wall-clock times move with the machine's load)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.worker_texts: List[str] = []
        self.steps_during_queries = 0
        self._queries = 0
        self._lock = threading.Lock()
        if hasattr(inner, "embed_deferring"):  # the numpy int8 runtime: the worker embeds layer by layer
            self.embed_deferring = self._embed_deferring

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @contextlib.contextmanager
    def _query(self) -> Iterator[None]:
        with self._lock:
            self._queries += 1
        try:
            yield
        finally:
            with self._lock:
                self._queries -= 1

    def _step(self) -> None:
        with self._lock:
            if self._queries:
                self.steps_during_queries += 1

    def embed(self, text: str) -> Any:
        """As the inner embedder's (a query)."""
        with self._query():
            return self._inner.embed(text)

    def embed_batch(self, texts: Sequence[str]) -> Any:
        """As the inner embedder's; from the worker thread one step per call."""
        if threading.current_thread().name != WORKER_THREAD:
            with self._query():
                return self._inner.embed_batch(texts)
        self.worker_texts.extend(texts)
        self._step()
        return self._inner.embed_batch(texts)

    def _embed_deferring(self, text: str, pause: Callable[[], None]) -> Any:
        self.worker_texts.append(text)

        def counted() -> None:  # runs before each layer: the layer that follows is one step
            pause()
            self._step()

        return self._inner.embed_deferring(text, counted)


class _NoGate:
    """A QueryFirst that never parks the worker (the ablation of phase 5)."""

    @contextlib.contextmanager
    def foreground(self) -> Iterator[None]:
        """Queries are not announced."""
        yield

    def wait_idle(self, stop: Optional[threading.Event] = None) -> None:
        """Never waits."""


def _timed(fn: Callable[[], Any]) -> float:
    t = now_ms()
    fn()
    return now_ms() - t


def _queries_while_draining(mem: Any, first: int, n: int, write_from: int) -> Dict[str, Any]:
    """Vector recalls back to back while the backlog drains, one timed write after each; only the
    queries that ended with work still pending count."""
    q_ms: List[float] = []
    w_ms: List[float] = []
    for i in range(n):
        took = _timed(lambda i=i: mem.recall(gen_query(first + i), topk=5, mode="vector"))
        state = mem.backlog_state()
        if state["pending"] == state["failed"]:
            break
        q_ms.append(took)
        w_ms.append(_timed(lambda i=i: mem.remember(gen_text(write_from + i), collection="bench")))
    return {"query": summarize(q_ms), "ack": summarize(w_ms)}


def _drain(mem: Any, timeout_s: float) -> float:
    """Seconds until the backlog is empty (the worker drains it)."""
    t0 = time.monotonic()
    while True:
        state = mem.backlog_state()
        if state["failed"]:
            raise RuntimeError(f"the worker failed on {state['failed']} texts: {state['worker']['last_error']}")
        if not state["pending"]:
            break
        if time.monotonic() - t0 > timeout_s:
            raise RuntimeError(f"backlog not drained in {timeout_s:.0f} s")
        time.sleep(0.05)
    return time.monotonic() - t0


def _phase_drain(mem: Any, rec: _Recorder, texts: List[str], qfirst: int,
                 args: argparse.Namespace) -> Dict[str, Any]:
    """Queue ``texts``, wake the worker, query while it drains (counting the worker's steps that ran
    during a query), then wait for the rest."""
    if texts:
        mem.remember_many([{"text": t, "collection": "bench"} for t in texts])
    steps = rec.steps_during_queries
    t0 = time.monotonic()
    mem.start_embed_worker()  # idempotent; wakes nothing by itself when running
    mem._wake_worker()
    out = _queries_while_draining(mem, qfirst, args.queries, 70_000_000 + qfirst)
    out["worker_steps_during_queries"] = rec.steps_during_queries - steps
    _drain(mem, args.timeout)
    out["drain_s"] = round(time.monotonic() - t0, 2)
    out["drained_per_min"] = round(60.0 * (len(texts) + out["ack"].get("n", 0)) / max(out["drain_s"], 1e-9), 1)
    return out


def _inline_acks(args: argparse.Namespace, work: Path, inner: Any) -> Dict[str, float]:
    """The same write with embed_mode inline (it waits for the model): the comparison at the same load."""
    from memento_edge.memory import Memory

    with Memory(_settings(args, work, "inline.db", "inline"), embedder=inner) as mem:
        return summarize([_timed(lambda i=i: mem.remember(gen_text(5_000_000 + i), collection="bench"))
                          for i in range(args.inline_acks)])


def _settings(args: argparse.Namespace, work: Path, db: str, mode: str) -> Any:
    from memento_edge.config import Settings

    return Settings.load(env={"MEMENTO_CONFIG": ""}, home=str(work), db=str(work / db),
                         model_dir=str(args.model_dir), embed_mode=mode, request_timeout=args.timeout)


def run(args: argparse.Namespace, work: Path) -> Dict[str, Any]:
    """All phases on one store in ``work``; the result as a JSON-able dict."""
    from memento_edge.embedder import make_embedder
    from memento_edge.memory import Memory

    settings = _settings(args, work, "backlog.db", "background")
    rec = _Recorder(make_embedder(settings, backend=None if args.backend == "auto" else args.backend))
    res: Dict[str, Any] = {"backend": rec.backend, "load_before": os.getloadavg()}
    rec.load()
    res["ack_inline"] = _inline_acks(args, work, rec)
    with Memory(settings, embedder=rec) as mem:
        t0 = time.monotonic()
        mem.remember_many([{"text": gen_text(i), "collection": "bench"} for i in range(args.seed)])
        while mem.embed_pending():
            pass
        res["seed_drain_per_min"] = round(60.0 * args.seed / max(time.monotonic() - t0, 1e-9), 1)

        backlog = [gen_text(1_000_000 + i) for i in range(args.backlog)]
        res["ack_worker_idle"] = summarize([_timed(lambda t=t: mem.remember(t, collection="bench"))
                                            for t in backlog])
        if args.ack_only:
            return dict(res, load_after=os.getloadavg())
        res["query_worker_idle"] = summarize([_timed(lambda i=i: mem.recall(gen_query(i), topk=5, mode="vector"))
                                              for i in range(args.queries)])
        rec.worker_texts.clear()
        res["draining_gated"] = _phase_drain(mem, rec, [], 10_000, args)  # the backlog written above
        res["order_preserved"] = rec.worker_texts[:len(backlog)] == backlog
        mem.query_first = _NoGate()  # the worker and recall read the attribute on each use
        res["draining_ungated"] = _phase_drain(mem, rec, [gen_text(3_000_000 + i) for i in range(args.backlog)],
                                               20_000, args)
        res["worker"] = mem.backlog_state()["worker"]
    res["load_after"] = os.getloadavg()
    return res


def _markdown(res: Dict[str, Any]) -> str:
    rows = [("remember acknowledged, embed_mode inline (waits for the model)", res["ack_inline"]),
            ("remember acknowledged, background, worker idle", res["ack_worker_idle"])]
    head = (f"backend {res['backend']}; load average {res['load_before'][0]:.1f} -> {res['load_after'][0]:.1f}; "
            f"drain alone {res['seed_drain_per_min']}/min")
    if "draining_gated" in res:
        gated, ungated = res["draining_gated"], res["draining_ungated"]
        rows += [("remember acknowledged, background, worker draining", gated["ack"]),
                 ("vector recall, worker idle", res["query_worker_idle"]),
                 ("vector recall, worker draining, query-first", gated["query"]),
                 ("vector recall, worker draining, no query-first", ungated["query"])]
        unit = "layers" if res["backend"] == "numpy-int8" else "texts"
        head += (f"; order preserved: {res['order_preserved']}; worker {unit} run during queries: "
                 f"{gated['worker_steps_during_queries']} with query-first, "
                 f"{ungated['worker_steps_during_queries']} without ({gated['query'].get('n', 0)} / "
                 f"{ungated['query'].get('n', 0)} queries)")
    lines = [head, "", "| measure | n | median ms | p95 ms | max ms |", "|---|---:|---:|---:|---:|"]
    for name, s in rows:
        if s.get("n"):
            lines.append(f"| {name} | {s['n']} | {s['median']:.1f} | {s['p95']:.1f} | {s['max']:.1f} |")
        else:
            lines.append(f"| {name} | 0 | - | - | - |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the phases and print the JSON result and a Markdown table."""
    ap = argparse.ArgumentParser(prog="python -m bench.backlog", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    ap.add_argument("--backend", choices=["auto", "onnxruntime", "numpy-int8"], default="auto")
    ap.add_argument("--seed", type=int, default=50, help="memories in the store before the backlog")
    ap.add_argument("--backlog", type=int, default=200, help="memories queued per drain phase")
    ap.add_argument("--queries", type=int, default=40, help="queries per phase")
    ap.add_argument("--inline-acks", type=int, default=3, help="writes timed with embed_mode inline")
    ap.add_argument("--ack-only", action="store_true", help="stop after the acknowledgement phases")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds a drain may take")
    ap.add_argument("--out", type=Path, help="also write the JSON result here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="memento-backlog-") as tmp:
        res = run(args, Path(tmp))
    res["platform"] = platform_info()
    res["args"] = {k: str(v) for k, v in vars(args).items()}
    text = json.dumps(res, indent=2, default=str)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    print(text)
    print(_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
