"""What MCP adds to a search: REST ``POST /v1/recall`` vs MCP ``tools/call memory_search`` (same arguments),
alternated request by request so both see the same machine load, on a store seeded by
``bench.http_bench --workdir``. Reports each side's p50 and the median of the per-pair differences (MCP
minus REST) for each repetition, and the median over the repetitions.

    python -m bench.mcp_overhead --workdir /tmp/work10k --pairs 400                 # in-process (test client)
    python -m bench.mcp_overhead --workdir /tmp/work10k --pairs 400 --http --repeat 3  # through Waitress

``--http`` starts the real service (``web.serve`` on Waitress, as ``bench.http_bench`` does) and sends both
faces over one keep-alive loopback connection. By default each pair uses two different queries from one
pool, so neither side gets the other's embedding-cache hit and both embed; ``--cached`` embeds the pool
first and sends the *same* query to both sides, so neither embeds and the difference left is the protocol's
own cost (parsing, checking, shaping) with far less noise from the model. With ``--http`` the server's CPU
time per request (all its threads, from ``/proc``) is reported too: on a shared machine the wall time is
mostly waiting for a core, the CPU time is what the request itself cost.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from .http_bench import (TOKEN, _Client, _mcp_failed, _Server, default_model_dir, make_queries, mcp_search,
                         read_status_kb)

# send(face, query, i) -> None; raises on a failed answer. Its ``rss`` attribute (HTTP only) reads the
# server's VmRSS and VmHWM in MB.
Send = Callable[[str, str, int], None]
_REST_BODY = {"topk": 5, "mode": "hybrid"}


@contextmanager
def _in_process(workdir: Path, model_dir: Path) -> Iterator[Send]:
    """Both faces through the Flask test client (no sockets, no Waitress queueing)."""
    from memento_edge.config import Settings
    from memento_edge.memory import Memory
    from memento_edge.web import create_app

    tokens = [{"name": "bench", "sha256": hashlib.sha256(TOKEN.encode()).hexdigest(), "scopes": ["read"]}]
    settings = Settings.load(env={}, home=str(workdir), model_dir=str(model_dir), tokens=tokens,
                             rate_limit_per_minute=0)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with Memory(settings) as memory:
        client = create_app(settings, memory).test_client()

        def send(face: str, query: str, i: int) -> None:
            if face == "rest":
                resp = client.post("/v1/recall", json=dict(_REST_BODY, query=query), headers=auth)
            else:
                _, path, body, headers = mcp_search(query, i)
                resp = client.post(path, json=body, headers={**auth, **headers})
            assert resp.status_code == 200 and not _mcp_failed(resp.get_json()), resp.get_data(as_text=True)[:300]

        yield send


@contextmanager
def _over_http(workdir: Path, model_dir: Path) -> Iterator[Send]:
    """Both faces through the real service on Waitress, over one keep-alive loopback connection."""
    server = _Server(workdir, model_dir)
    server.start()
    client = _Client(server.port)
    try:
        def send(face: str, query: str, i: int) -> None:
            if face == "rest":
                status, payload = client.call("POST", "/v1/recall", dict(_REST_BODY, query=query))
            else:
                _, path, body, headers = mcp_search(query, i)
                status, payload = client.call("POST", path, body, headers)
            assert status == 200 and not _mcp_failed(payload), f"HTTP {status}: {str(payload)[:300]}"

        pid = server.proc.pid if server.proc is not None else 0
        send.rss = lambda: {k: round(v / 1024, 1) for k, v in read_status_kb(pid).items()}  # type: ignore[attr-defined]
        send.cpu_ns = lambda: server_cpu_ns(pid)  # type: ignore[attr-defined]
        yield send
    finally:
        client.close()
        server.stop()


def server_cpu_ns(pid: int) -> int:
    """CPU time the process ``pid`` has run, all threads, in ns (``/proc/<pid>/task/*/schedstat``: exact, not
    tick-sampled, and unaffected by how long the process waited for a core - what a loaded machine inflates)."""
    total = 0
    for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        try:
            total += int(stat.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # a thread that ended between the listing and the read
    return total


def _alternate(send: Send, queries: List[str], pairs: int, cached: bool) -> Dict[str, Any]:
    """``pairs`` REST/MCP pairs, the order swapped every pair; p50s and the median per-pair difference (wall
    time, and with ``--http`` also the server's CPU time per request)."""
    wall: Dict[str, List[float]] = {"rest": [], "mcp": []}
    cpu: Dict[str, List[float]] = {"rest": [], "mcp": []}
    cpu_now: Callable[[], int] = getattr(send, "cpu_ns", lambda: 0)
    for i in range(pairs):
        a, b = (queries[i % len(queries)],) * 2 if cached else (queries[2 * i], queries[2 * i + 1])
        order: Tuple[Tuple[str, str], ...] = (("rest", a), ("mcp", b)) if i % 2 else (("mcp", a), ("rest", b))
        for face, query in order:
            c0, t0 = cpu_now(), time.perf_counter()
            send(face, query, i)
            wall[face].append((time.perf_counter() - t0) * 1000)
            cpu[face].append((cpu_now() - c0) / 1e6)
    out = {"rest_p50_ms": round(statistics.median(wall["rest"]), 3),
           "mcp_p50_ms": round(statistics.median(wall["mcp"]), 3),
           "median_pair_difference_ms": round(statistics.median(m - r for m, r in zip(wall["mcp"], wall["rest"])), 3)}
    if hasattr(send, "cpu_ns"):
        out.update({"server_cpu_rest_p50_ms": round(statistics.median(cpu["rest"]), 3),
                    "server_cpu_mcp_p50_ms": round(statistics.median(cpu["mcp"]), 3),
                    "server_cpu_median_pair_difference_ms": round(statistics.median(
                        m - r for m, r in zip(cpu["mcp"], cpu["rest"])), 3)})
    return out


def run(workdir: Path, pairs: int = 400, model_dir: Optional[Path] = None, *, http: bool = False,
        cached: bool = False, repeat: int = 1) -> Dict[str, Any]:
    """Alternate REST and MCP searches ``pairs`` times, ``repeat`` times; latency summary in ms."""
    model_dir = model_dir or default_model_dir()
    pool = 100 if cached else 2 * pairs * repeat
    queries = make_queries(pool + 20, seed=21)
    warm, queries = queries[:20], queries[20:]
    load_start = [round(x, 2) for x in os.getloadavg()]
    with (_over_http if http else _in_process)(workdir, model_dir) as send:
        for i, q in enumerate(warm + (queries if cached else [])):  # load the model, settle caches (and
            send("rest", q, i)                                     # with --cached embed the whole pool)
        rss = getattr(send, "rss", dict)
        server_rss: Dict[str, Any] = {"after_rest_only": rss()}  # the server before its first MCP request
        reps = []
        for r in range(repeat):
            chunk = queries if cached else queries[2 * pairs * r:2 * pairs * (r + 1)]
            reps.append(_alternate(send, chunk, pairs, cached))
        server_rss["after_mcp_and_rest"] = rss()
    return {"transport": "http" if http else "in-process", "cached": cached, "pairs": pairs, "repetitions": reps,
            **({"server_rss_mb": server_rss} if http else {}),
            "median_of_pair_differences_ms": round(statistics.median(
                r["median_pair_difference_ms"] for r in reps), 3),
            **({"median_of_server_cpu_pair_differences_ms": round(statistics.median(
                r["server_cpu_median_pair_difference_ms"] for r in reps), 3)} if http else {}),
            "loadavg_start": load_start, "loadavg_end": [round(x, 2) for x in os.getloadavg()]}


def main() -> None:
    """CLI."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, required=True, help="a store seeded by bench.http_bench --workdir")
    ap.add_argument("--pairs", type=int, default=400)
    ap.add_argument("--repeat", type=int, default=1, help="repetitions (each with its own queries)")
    ap.add_argument("--http", action="store_true", help="through the real service on Waitress")
    ap.add_argument("--cached", action="store_true",
                    help="same query on both sides, embedded beforehand: the protocol's cost alone")
    ap.add_argument("--model-dir", type=Path, default=None)
    args = ap.parse_args()
    print(run(args.workdir, args.pairs, args.model_dir, http=args.http, cached=args.cached, repeat=args.repeat))


if __name__ == "__main__":
    main()
