"""What MCP adds to a search, in-process: REST ``POST /v1/recall`` vs MCP ``tools/call memory_search`` on the
same app (Flask test client: no sockets, no Waitress queueing), alternated request by request so both see the
same machine load, on a store seeded by ``bench.http_bench --workdir``.

    python -m bench.mcp_overhead --workdir /tmp/work10k --pairs 400

Reports each side's p50 and the median of the per-pair differences (MCP minus REST); each pair uses two
different queries from one pool, so neither side gets the other's embedding-cache hit.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List

from .http_bench import MCP_HEADERS, TOKEN, default_model_dir, make_queries, mcp_search


def run(workdir: Path, pairs: int = 400, model_dir: Path = None) -> Dict[str, Any]:  # type: ignore[assignment]
    """Alternate REST and MCP searches ``pairs`` times; latency summary in ms."""
    import hashlib

    from memento_edge.config import Settings
    from memento_edge.memory import Memory
    from memento_edge.web import create_app

    tokens = [{"name": "bench", "sha256": hashlib.sha256(TOKEN.encode()).hexdigest(), "scopes": ["read"]}]
    settings = Settings.load(env={}, home=str(workdir), model_dir=str(model_dir or default_model_dir()),
                             tokens=tokens, rate_limit_per_minute=0)
    queries = make_queries(2 * pairs + 20, seed=21)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with Memory(settings) as memory:
        client = create_app(settings, memory).test_client()
        for q in queries[:20]:  # load the model, settle caches and allocator
            client.post("/v1/recall", json={"query": q, "topk": 5}, headers=auth)
        rest: List[float] = []
        mcp: List[float] = []
        for i in range(pairs):
            a, b = queries[20 + 2 * i], queries[21 + 2 * i]
            first, second = ((rest, a), (mcp, b)) if i % 2 else ((mcp, a), (rest, b))
            for side, query in (first, second):
                t0 = time.perf_counter()
                if side is rest:
                    resp = client.post("/v1/recall", json={"query": query, "topk": 5, "mode": "hybrid"}, headers=auth)
                else:
                    _, path, body, _headers = mcp_search(query, i)
                    resp = client.post(path, json=body, headers={**auth, **MCP_HEADERS})
                side.append((time.perf_counter() - t0) * 1000)
                assert resp.status_code == 200, resp.get_data(as_text=True)[:300]
    diffs = [m - r for m, r in zip(mcp, rest)]
    return {"pairs": pairs, "rest_p50_ms": round(statistics.median(rest), 3),
            "mcp_p50_ms": round(statistics.median(mcp), 3),
            "median_pair_difference_ms": round(statistics.median(diffs), 3)}


def main() -> None:
    """CLI."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, required=True, help="a store seeded by bench.http_bench --workdir")
    ap.add_argument("--pairs", type=int, default=400)
    ap.add_argument("--model-dir", type=Path, default=None)
    args = ap.parse_args()
    print(run(args.workdir, args.pairs, args.model_dir))


if __name__ == "__main__":
    main()
