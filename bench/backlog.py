"""Background embedding (#13 item 4) measured: how fast a write is acknowledged, how fast the backlog
drains, and whether queries really go first while the worker drains it.

    python -m bench.backlog [--backlog 200] [--queries 40] [--seed 50] [--backend numpy-int8] [--out FILE]

One store, ``embed_mode: background``, the real model (``--model-dir``, default models/minilm-int8):

1. **seed**: ``--seed`` memories written and drained in this thread (no queries): the drain rate alone;
2. **ack, worker idle**: ``--backlog`` remembers timed one by one (durable: synchronous=FULL);
3. **query, worker idle**: ``--queries`` vector recalls, nothing else running;
4. **query, worker draining (query-first on)**: the worker is started on the backlog and the same number
   of new queries run back to back while it drains; writes are timed meanwhile as well (ack while
   draining). Only queries that ended with the backlog still pending are counted;
5. **query, worker draining (query-first off)**: a second backlog, with the QueryFirst gate replaced by
   one that never parks the worker: what the gate buys (the worker's nice +10 still applies).

The worker's embedding order is recorded and compared with the write order. Queries differ from each
other, so the embedding cache never answers one. Under qemu-user every guest thread is a host thread:
a one-core Pi Zero is not modelled (the two threads may run on two host cores), so read the gated vs
ungated difference there as a lower bound.
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
    """The real embedder, recording the texts the backlog worker embeds (in order)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.worker_texts: List[str] = []
        if hasattr(inner, "embed_deferring"):  # the numpy int8 runtime: the worker embeds layer by layer
            self.embed_deferring = self._embed_deferring

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _note(self, texts: Sequence[str]) -> None:
        if threading.current_thread().name == WORKER_THREAD:
            self.worker_texts.extend(texts)

    def embed_batch(self, texts: Sequence[str]) -> Any:
        """As the inner embedder's."""
        self._note(texts)
        return self._inner.embed_batch(texts)

    def _embed_deferring(self, text: str, pause: Callable[[], None]) -> Any:
        self._note([text])
        return self._inner.embed_deferring(text, pause)


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


def _phase_drain(mem: Any, texts: List[str], qfirst: int, args: argparse.Namespace) -> Dict[str, Any]:
    """Queue ``texts``, wake the worker, query while it drains, then wait for the rest."""
    mem.remember_many([{"text": t, "collection": "bench"} for t in texts])
    t0 = time.monotonic()
    mem._wake_worker()
    out = _queries_while_draining(mem, qfirst, args.queries, 70_000_000 + qfirst)
    _drain(mem, args.timeout)
    out["drain_s"] = round(time.monotonic() - t0, 2)
    out["drained_per_min"] = round(60.0 * (len(texts) + out["ack"].get("n", 0)) / max(out["drain_s"], 1e-9), 1)
    return out


def run(args: argparse.Namespace, work: Path) -> Dict[str, Any]:
    """All phases on one store in ``work``; the result as a JSON-able dict."""
    from memento_edge.config import Settings
    from memento_edge.embedder import make_embedder
    from memento_edge.memory import Memory

    settings = Settings.load(env={"MEMENTO_CONFIG": ""}, home=str(work), db=str(work / "backlog.db"),
                             model_dir=str(args.model_dir), embed_mode="background",
                             request_timeout=args.timeout)
    rec = _Recorder(make_embedder(settings, backend=None if args.backend == "auto" else args.backend))
    res: Dict[str, Any] = {"backend": rec.backend, "load_before": os.getloadavg()}
    with Memory(settings, embedder=rec) as mem:
        mem.embedder.load()
        t0 = time.monotonic()
        mem.remember_many([{"text": gen_text(i), "collection": "bench"} for i in range(args.seed)])
        while mem.embed_pending():
            pass
        res["seed_drain_per_min"] = round(60.0 * args.seed / (time.monotonic() - t0), 1)

        backlog = [gen_text(1_000_000 + i) for i in range(args.backlog)]
        res["ack_worker_idle"] = summarize([_timed(lambda t=t: mem.remember(t, collection="bench"))
                                            for t in backlog])
        res["query_worker_idle"] = summarize([_timed(lambda i=i: mem.recall(gen_query(i), topk=5, mode="vector"))
                                              for i in range(args.queries)])
        mem.start_embed_worker()  # the first worker texts are the backlog's, then the writes made meanwhile
        gated = _queries_while_draining(mem, 10_000, args.queries, 2_000_000)
        _drain(mem, args.timeout)
        res["order_preserved"] = rec.worker_texts[:len(backlog)] == backlog
        res["query_worker_draining_gated"] = gated["query"]
        res["ack_worker_draining"] = gated["ack"]

        mem.query_first = _NoGate()  # the worker and recall read the attribute on each use
        res["query_worker_draining_ungated"] = _phase_drain(
            mem, [gen_text(3_000_000 + i) for i in range(args.backlog)], 20_000, args)["query"]
        res["worker"] = mem.backlog_state()["worker"]
    res["load_after"] = os.getloadavg()
    return res


def _markdown(res: Dict[str, Any]) -> str:
    rows = [("remember acknowledged, worker idle", res["ack_worker_idle"]),
            ("remember acknowledged, worker draining", res["ack_worker_draining"]),
            ("vector recall, worker idle", res["query_worker_idle"]),
            ("vector recall, worker draining, query-first", res["query_worker_draining_gated"]),
            ("vector recall, worker draining, no query-first", res["query_worker_draining_ungated"])]
    lines = [f"backend {res['backend']}; load {res['load_before'][0]:.1f} -> {res['load_after'][0]:.1f}; "
             f"order preserved: {res['order_preserved']}; drain alone {res['seed_drain_per_min']}/min",
             "", "| measure | n | median ms | p95 ms | max ms |", "|---|---:|---:|---:|---:|"]
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
