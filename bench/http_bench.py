"""HTTP benchmark: recall and remember latency/throughput through the real service, plus its memory.

What it does, in order:

1. seeds a fresh store with N short (~100-character) memories through the Python API
   (``Memory.remember_many``) with the real int8 model, before any server runs;
2. starts the service as a subprocess (``web.serve`` on Waitress, production settings except that the
   rate limiter is off) on a free 127.0.0.1 port, with one API token;
3. for each client count (default 1, 4, 8): ``seconds`` of recall (hybrid, topk 5, a query pool larger than
   the embedding cache so queries are embedded, not served from the cache), then ``seconds`` of the same
   search through MCP (``POST /mcp`` ``tools/call`` ``memory_search``, protocol 2026-07-28, a second query
   pool so neither face gets the other's cache hits), then ``seconds`` of remember (new texts); each client is
   a thread with its own keep-alive ``http.client`` connection;
4. samples the server's VmRSS and VmHWM from ``/proc/<pid>/status`` every 100 ms throughout.

A 3-second ``GET /healthz`` phase first gives the floor of the HTTP stack (Waitress + Flask) alone.

Every loop is bounded by time and by count; all traffic goes to loopback. Output: a JSON document and a
Markdown section (default ``bench/results/<date>-http.{json,md}``).

    python -m bench.http_bench --memories 10000 --seconds 10 --out bench/results/2026-11-25-http

``run(...)`` returns the same dict for ``bench/run.py``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import http.client
import json
import math
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
TOKEN = "mem_http-bench-token"
TARGETS = {"recall_p50_ms_at_4_clients": 15.0, "server_rss_mb_max": 150.0,
           "hostile_normal_p95_ms": 1000.0, "hostile_server_rss_mb_max": 150.0,
           # MCP costs no more than REST for the same search (issue #11): p50 and the server's RSS.
           "mcp_search_p50_over_recall_ms": 1.0, "mcp_rss_over_recall_mb": 3.0}
MAX_REQUESTS_PER_CLIENT = 200_000  # count bound on top of the time bound

# The server: the production entry point with settings from MEMENTO_* (the same thing `memento-edge serve`
# runs, without the CLI's argument parsing).
RUNNER = ("from memento_edge.config import Settings\n"
          "from memento_edge.web import serve\n"
          "serve(Settings.load())\n")

# --- deterministic text ----------------------------------------------------------------------------------
_NAMES = ["Ada", "Ben", "Chloe", "Dmitri", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kofi", "Lena",
          "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tove"]
_DOING = ["booked", "cancelled", "moved", "asked about", "paid for", "forgot", "planned", "confirmed",
          "complained about", "recommended", "borrowed", "returned", "ordered", "fixed", "lost"]
_THINGS = ["the dentist appointment", "a table at the Thai place", "the train tickets to Porto",
           "the broken bike light", "the library books", "a birthday cake with strawberries",
           "the quarterly tax return", "new running shoes", "the plumber visit", "a violin lesson",
           "the car insurance renewal", "two concert tickets", "the garden hose", "a laptop charger",
           "the passport photos", "flu vaccine shots", "a week of hiking maps", "the kitchen paint",
           "the school trip form", "a vegetarian cookbook"]
_WHEN = ["on Monday morning", "next Friday", "before the holidays", "after work on Tuesday", "this weekend",
         "at the end of the month", "on the 14th", "tomorrow at noon", "last Thursday", "in early spring"]
_WHERE = ["near the station", "downtown", "at the market", "online", "by phone", "at the office",
          "at the community centre", "in the old town", "at the clinic", "at home"]
_ASK = ["when is {name}'s {thing}", "who {doing} {thing}", "did anyone mention {thing}",
        "what happened with {thing} {when}", "{thing} {where}", "remind me about {thing}",
        "plans involving {thing}", "has {name} {doing} {thing} yet"]


def make_texts(n: int, seed: int = 7, start: int = 0) -> List[str]:
    """``n`` distinct, deterministic memory texts of roughly 80-120 characters."""
    rnd = random.Random(seed)
    return [_one_text(rnd, i) for i in range(start, start + n)]


def _one_text(rnd: random.Random, i: int) -> str:
    # The serial number keeps every text distinct (exact-duplicate detection would otherwise merge them).
    return (f"{rnd.choice(_NAMES)} {rnd.choice(_DOING)} {rnd.choice(_THINGS)} {rnd.choice(_WHEN)} "
            f"{rnd.choice(_WHERE)} (note {i}).")


def make_queries(n: int, seed: int = 11) -> List[str]:
    """``n`` distinct, deterministic queries (different phrasing from the stored texts)."""
    rnd = random.Random(seed)
    seen: Dict[str, None] = {}
    while len(seen) < n:
        q = rnd.choice(_ASK).format(name=rnd.choice(_NAMES), doing=rnd.choice(_DOING),
                                    thing=rnd.choice(_THINGS), when=rnd.choice(_WHEN),
                                    where=rnd.choice(_WHERE))
        if q in seen:  # the template space is finite: a counter word keeps the pool distinct
            q = f"{q} {len(seen)}"
        seen[q] = None
    return list(seen)


# --- client -----------------------------------------------------------------------------------------------
class _Client:
    """One keep-alive connection (one per thread)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn: Optional[http.client.HTTPConnection] = None

    def call(self, method: str, path: str, body: Any = None,
             extra_headers: Optional[Dict[str, str]] = None) -> Tuple[int, Any]:
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        headers = {"Authorization": f"Bearer {TOKEN}", **(extra_headers or {})}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            self.conn.request(method, path, body=data, headers=headers)
            resp = self.conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException):
            self.close()
            raise
        try:
            return resp.status, json.loads(raw) if raw else None
        except ValueError:
            return resp.status, None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


# --- server process + RSS sampler -------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def read_status_kb(pid: int) -> Dict[str, int]:
    """VmRSS and VmHWM (kB) of ``pid`` from /proc; empty if the process is gone."""
    out: Dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


class _Sampler(threading.Thread):
    """Samples the server's memory every ``interval`` seconds; ``mark(phase)`` labels what follows."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pid = pid
        self.interval = interval
        self.stop_event = threading.Event()
        self.phase = "start"
        self.samples: List[Tuple[float, str, int, int]] = []  # (t, phase, rss_kb, hwm_kb)
        self.t0 = time.monotonic()

    def mark(self, phase: str) -> None:
        self.phase = phase
        self.sample()

    def sample(self) -> None:
        st = read_status_kb(self.pid)
        if st:
            self.samples.append((time.monotonic() - self.t0, self.phase, st.get("VmRSS", 0),
                                 st.get("VmHWM", 0)))

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            self.sample()

    def summary(self) -> Dict[str, Any]:
        if not self.samples:
            return {}
        rss = [s[2] for s in self.samples]
        by_phase: Dict[str, int] = {}
        for _t, phase, r, _h in self.samples:
            by_phase[phase] = max(by_phase.get(phase, 0), r)
        return {
            "samples": len(self.samples),
            "rss_mb_min": round(min(rss) / 1024, 1),
            "rss_mb_max": round(max(rss) / 1024, 1),
            "rss_mb_last": round(rss[-1] / 1024, 1),
            "hwm_mb": round(max(s[3] for s in self.samples) / 1024, 1),
            "rss_mb_max_by_phase": {k: round(v / 1024, 1) for k, v in by_phase.items()},
        }


class _Server:
    def __init__(self, home: Path, model_dir: Path) -> None:
        self.home = home
        self.model_dir = model_dir
        self.proc: Optional[subprocess.Popen] = None
        self.port = 0
        self.log_path = home / "server.log"

    def start(self, timeout: float = 120.0) -> None:
        config = self.home / "config.yaml"
        config.write_text(json.dumps({  # JSON is YAML
            "tokens": [{"name": "bench", "sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
                        "scopes": ["read", "write"]}],
            "rate_limit_per_minute": 0,  # the limiter would otherwise be what is measured
        }))
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEMENTO_")}
        for _attempt in range(3):
            self.port = _free_port()
            env.update({"MEMENTO_HOME": str(self.home), "MEMENTO_CONFIG": str(config),
                        "MEMENTO_MODEL_DIR": str(self.model_dir), "MEMENTO_HOST": "127.0.0.1",
                        "MEMENTO_PORT": str(self.port), "MEMENTO_LOG_LEVEL": "WARNING"})
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen([sys.executable, "-c", RUNNER], cwd=str(REPO), env=env,
                                             stdout=log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + timeout
            client = _Client(self.port)
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    if client.call("GET", "/healthz")[0] == 200:
                        client.close()
                        return
                except (OSError, http.client.HTTPException):
                    time.sleep(0.1)
            client.close()
            if self.proc.poll() is None:
                break
        self.stop()
        raise RuntimeError(f"server did not start:\n{self.log_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""


# --- load phases ------------------------------------------------------------------------------------------
def _percentile(sorted_ms: Sequence[float], q: float) -> float:
    if not sorted_ms:
        return float("nan")
    # Nearest-rank percentile: the smallest value with at least q% of the samples at or below it.
    k = max(0, min(len(sorted_ms) - 1, math.ceil(q / 100.0 * len(sorted_ms)) - 1))
    return sorted_ms[k]


def _mcp_failed(payload: Any) -> bool:
    """True for an MCP answer that is a JSON-RPC error or a tool error (it must not count as a success)."""
    if not isinstance(payload, dict) or payload.get("jsonrpc") != "2.0":
        return False
    return "error" in payload or bool(payload.get("result", {}).get("isError"))


MCP_HEADERS = {"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/call", "Mcp-Name": "memory_search"}
MCP_META = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}


def mcp_search(query: str, i: int) -> Tuple[str, str, Any, Dict[str, str]]:
    """The MCP request equivalent to REST ``POST /v1/recall {"query", "topk": 5, "mode": "hybrid"}``."""
    return "POST", "/mcp", {"jsonrpc": "2.0", "id": i, "method": "tools/call", "params": {
        "name": "memory_search", "arguments": {"query": query, "topk": 5, "mode": "hybrid"},
        "_meta": MCP_META}}, MCP_HEADERS


def _phase(port: int, clients: int, seconds: float, make_request: Callable[[int, int], Tuple[Any, ...]],
           expect: int) -> Dict[str, Any]:
    """``clients`` threads send ``make_request(client_no, i)`` for ``seconds``; latency stats of the lot.

    ``make_request`` returns ``(method, path, body)``, optionally followed by extra headers and a label;
    with several labels the result also has ``by_label`` (interleaved A/B comparisons share one phase, so
    both sides see the same machine load).
    """
    latencies: List[List[float]] = [[] for _ in range(clients)]
    labels: List[List[str]] = [[] for _ in range(clients)]
    took: List[List[float]] = [[] for _ in range(clients)]  # the engine's own took_ms (recall only)
    errors: List[str] = []
    start_barrier = threading.Barrier(clients + 1)
    stop_at: List[float] = [0.0]

    def worker(n: int) -> None:
        client = _Client(port)
        start_barrier.wait()
        try:
            for i in range(MAX_REQUESTS_PER_CLIENT):
                if time.monotonic() >= stop_at[0]:
                    break
                method, path, body, *extra = make_request(n, i)
                t0 = time.perf_counter()
                try:
                    status, payload = client.call(method, path, body, *extra[:1])
                except (OSError, http.client.HTTPException) as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                dt = (time.perf_counter() - t0) * 1000.0
                if status != expect or _mcp_failed(payload):
                    errors.append(f"HTTP {status}: {str(payload)[:200]}")
                    continue
                latencies[n].append(dt)
                labels[n].append(extra[1] if len(extra) > 1 else "")
                if isinstance(payload, dict) and isinstance(payload.get("took_ms"), (int, float)):
                    took[n].append(float(payload["took_ms"]))
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.monotonic() + seconds
    t_start = time.monotonic()
    start_barrier.wait()
    for t in threads:
        t.join(seconds + 120)
    elapsed = time.monotonic() - t_start
    lat = sorted(x for per in latencies for x in per)
    engine = sorted(x for per in took for x in per)
    by_label: Dict[str, List[float]] = {}
    for per_lat, per_label in zip(latencies, labels):
        for dt, label in zip(per_lat, per_label):
            by_label.setdefault(label, []).append(dt)
    split = {label: {"requests": len(v), "p50_ms": round(_percentile(sorted(v), 50), 2),
                     "p95_ms": round(_percentile(sorted(v), 95), 2)} for label, v in by_label.items()}
    return {
        **({"by_label": split} if len(split) > 1 else {}),
        "clients": clients,
        "requests": len(lat),
        "errors": len(errors),
        "error_examples": errors[:3],
        "seconds": round(elapsed, 2),
        "throughput_rps": round(len(lat) / elapsed, 1) if elapsed > 0 else 0.0,
        "p50_ms": round(_percentile(lat, 50), 2),
        "p95_ms": round(_percentile(lat, 95), 2),
        "p99_ms": round(_percentile(lat, 99), 2),
        "mean_ms": round(statistics.fmean(lat), 2) if lat else float("nan"),
        "max_ms": round(lat[-1], 2) if lat else float("nan"),
        # Time inside Memory.recall as the server reports it; the rest is HTTP, JSON, auth and queueing.
        "engine_p50_ms": round(_percentile(engine, 50), 2) if engine else None,
    }


# --- the benchmark ----------------------------------------------------------------------------------------
def default_model_dir() -> Path:
    """``$MEMENTO_TEST_MODEL_DIR`` or ``models/minilm-int8`` in the repository."""
    env = os.environ.get("MEMENTO_TEST_MODEL_DIR")
    return Path(env) if env else REPO / "models" / "minilm-int8"


def _seed(home: Path, model_dir: Path, n: int, log: Callable[[str], None]) -> Dict[str, Any]:
    from memento_edge.config import Settings
    from memento_edge.memory import Memory

    settings = Settings.load(env={}, home=str(home), model_dir=str(model_dir))
    texts = make_texts(n)
    t0 = time.perf_counter()
    with Memory(settings) as mem:
        batch = 256
        for i in range(0, n, batch):
            mem.remember_many({"text": t, "collection": f"c{(i + j) % 4}", "tags": [f"t{(i + j) % 10}"]}
                              for j, t in enumerate(texts[i:i + batch]))
            if (i // batch) % 10 == 0:
                log(f"  seeded {min(i + batch, n)}/{n}")
        count = mem.count()
    seconds = time.perf_counter() - t0
    db = settings.db_path
    return {"memories": count, "seconds": round(seconds, 1), "per_second": round(n / seconds, 1),
            "db_bytes": db.stat().st_size if db.exists() else None}


def _environment() -> Dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=str(REPO), capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "platform": platform.platform(), "commit": commit,
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}


def run(memories: int = 10_000, seconds: float = 10.0, clients: Sequence[int] = (1, 4, 8),
        model_dir: Optional[Path] = None, workdir: Optional[Path] = None, out: Optional[Path] = None,
        log: Callable[[str], None] = print, hostile_seconds: float = 30.0) -> Dict[str, Any]:
    """Run the benchmark; returns the result dict (and writes JSON + Markdown if ``out`` is given)."""
    md = Path(model_dir) if model_dir else default_model_dir()
    if not (md / "manifest.json").is_file():
        raise SystemExit(f"no model at {md}: build it with `memento-edge model build --out {md}` "
                         "(or set MEMENTO_TEST_MODEL_DIR)")
    own_dir = workdir is None
    home = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="memento-http-bench-"))
    home.mkdir(parents=True, exist_ok=True)
    result: Dict[str, Any] = {
        "benchmark": "http", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "params": {"memories": memories, "seconds_per_phase": seconds, "clients": list(clients),
                   "recall": {"mode": "hybrid", "topk": 5}, "model_dir": str(md)},
        "environment": _environment(), "targets": TARGETS,
    }
    try:
        manifest = json.loads((md / "manifest.json").read_text())
        result["params"]["model_fingerprint"] = manifest.get("fingerprint")
    except (OSError, ValueError):
        pass

    log(f"seeding {memories} memories into {home} ...")
    result["seed"] = _seed(home, md, memories, log)
    log(f"  {result['seed']}")

    server = _Server(home, md)
    server.start()
    assert server.proc is not None
    sampler = _Sampler(server.proc.pid)
    sampler.start()
    try:
        sampler.mark("idle")
        result["server_rss_idle_mb"] = round(read_status_kb(server.proc.pid).get("VmRSS", 0) / 1024, 1)
        # Cold start: the first recall loads the model (lazily, unless warmup is on).
        sampler.mark("first-recall")
        client = _Client(server.port)
        t0 = time.perf_counter()
        status, body = client.call("POST", "/v1/recall", {"query": "warm up the model", "topk": 5})
        result["first_recall_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        if status != 200 or body.get("mode") != "hybrid":
            raise RuntimeError(f"first recall: HTTP {status} {body!r} (the model must load for this bench)")
        for q in make_queries(20, seed=99):  # a few more to settle allocator and caches
            client.call("POST", "/v1/recall", {"query": q, "topk": 5})
        client.close()

        queries = make_queries(4000)
        mcp_queries = make_queries(4000, seed=12)
        next_text = [memories]
        text_lock = threading.Lock()

        def recall_request(n: int, i: int) -> Tuple[str, str, Any]:
            # Each client walks the pool from its own offset: cache hits stay rare (pool > cache size).
            return "POST", "/v1/recall", {"query": queries[(n * 997 + i) % len(queries)], "topk": 5,
                                          "mode": "hybrid"}

        def mcp_request(n: int, i: int) -> Tuple[Any, ...]:
            # REST recall and MCP memory_search alternate on every connection: both sides see the same
            # load, which a shared 2-core machine varies from one phase to the next.
            query = mcp_queries[(n * 997 + i) % len(mcp_queries)]
            if i % 2:
                return "POST", "/v1/recall", {"query": query, "topk": 5, "mode": "hybrid"}, None, "rest"
            return (*mcp_search(query, i), "mcp")

        def remember_request(n: int, i: int) -> Tuple[str, str, Any]:
            with text_lock:
                k = next_text[0]
                next_text[0] += 1
            text = _one_text(random.Random(k), k)  # new, distinct texts: each one is embedded and stored
            return "POST", "/v1/memories", {"text": text, "collection": f"c{k % 4}", "tags": [f"t{k % 10}"]}

        phases: List[Dict[str, Any]] = []
        # The floor: an unauthenticated no-op route through Waitress + Flask, one client.
        sampler.mark("healthz-1")
        ph = _phase(server.port, 1, min(seconds, 3.0), lambda n, i: ("GET", "/healthz", None), 200)
        ph["kind"] = "healthz"
        ph["server_rss_mb_max"] = round(max(
            (s[2] for s in sampler.samples if s[1] == "healthz-1"), default=0) / 1024, 1)
        log(f"healthz (HTTP floor): p50 {ph['p50_ms']} ms, {ph['throughput_rps']} req/s")
        phases.append(ph)
        for c in clients:
            for kind, fn, expect in (("recall", recall_request, 200), ("recall_vs_mcp", mcp_request, 200),
                                     ("remember", remember_request, 201)):
                sampler.mark(f"{kind}-{c}")
                log(f"{kind} with {c} client(s) for {seconds:g} s ...")
                ph = _phase(server.port, c, seconds, fn, expect)
                ph["kind"] = kind
                ph["server_rss_mb_max"] = round(max(
                    (s[2] for s in sampler.samples if s[1] == f"{kind}-{c}"), default=0) / 1024, 1)
                log(f"  p50 {ph['p50_ms']} ms  p95 {ph['p95_ms']} ms  p99 {ph['p99_ms']} ms  "
                    f"{ph['throughput_rps']} req/s  errors {ph['errors']}  rss {ph['server_rss_mb_max']} MB")
                phases.append(ph)
        result["phases"] = phases
        if hostile_seconds > 0:
            result["hostile"] = _hostile(server.port, queries, hostile_seconds, sampler, log)
        client = _Client(server.port)
        try:  # a server still choking on the hostile phase may not answer: report what was measured
            status, stats = client.call("GET", "/v1/stats")
            if status == 200:
                result["server_stats"] = stats
        except (OSError, http.client.HTTPException) as exc:
            result["server_stats_error"] = f"{type(exc).__name__}: {exc}"
        client.close()
        sampler.mark("end")
    finally:
        sampler.stop_event.set()
        sampler.join(5)
        server.stop()
    result["server_rss"] = sampler.summary()
    result["environment"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["checks"] = _checks(result)
    if out is not None:
        write_outputs(result, Path(out))
    if own_dir:
        import shutil

        shutil.rmtree(home, ignore_errors=True)
    return result


def _hostile(port: int, queries: Sequence[str], seconds: float, sampler: "_Sampler",
             log: Callable[[str], None]) -> Dict[str, Any]:
    from .hostile import run_hostile

    sampler.mark("hostile")
    log(f"hostile: slowloris + idle keep-alives + max batches + 4 normal recall clients for {seconds:g} s ...")
    res = run_hostile(port, TOKEN, queries, seconds, _percentile)
    res["server_rss_mb_max"] = round(max((s[2] for s in sampler.samples if s[1] == "hostile"),
                                         default=0) / 1024, 1)
    sampler.mark("after-hostile")
    log(f"  normal clients p50 {res['normal_p50_ms']} ms  p95 {res['normal_p95_ms']} ms  "
        f"errors {res['normal_errors']}  server RSS max {res['server_rss_mb_max']} MB  {res['counts']}")
    return res


def _checks(result: Dict[str, Any]) -> Dict[str, Any]:
    rec4 = [p for p in result.get("phases", []) if p["kind"] == "recall" and p["clients"] == 4]
    checks: Dict[str, Any] = {}
    if rec4:
        v = rec4[0]["p50_ms"]
        checks["recall_p50_ms_at_4_clients"] = {"value": v, "target": TARGETS["recall_p50_ms_at_4_clients"],
                                                "ok": v <= TARGETS["recall_p50_ms_at_4_clients"]}
    rss = result.get("server_rss", {})
    if rss:
        v = max(rss["rss_mb_max"], rss["hwm_mb"])
        checks["server_rss_mb_max"] = {"value": v, "target": TARGETS["server_rss_mb_max"],
                                       "ok": v <= TARGETS["server_rss_mb_max"]}
    hostile = result.get("hostile")
    if hostile:
        for name, key in (("hostile_normal_p95_ms", "normal_p95_ms"),
                          ("hostile_server_rss_mb_max", "server_rss_mb_max")):
            checks[name] = {"value": hostile[key], "target": TARGETS[name], "ok": hostile[key] <= TARGETS[name]}
    checks.update(_mcp_checks(result.get("phases", [])))
    checks["errors"] = {"value": sum(p["errors"] for p in result.get("phases", [])), "target": 0}
    checks["errors"]["ok"] = checks["errors"]["value"] == 0
    return checks


def _mcp_checks(phases: List[Dict[str, Any]]) -> Dict[str, Any]:
    """MCP memory_search vs REST recall: the worst p50 gap of the interleaved phases, and the worst RSS gap
    between an interleaved phase and the REST-only recall phase before it (same client count)."""
    by = {(p["kind"], p["clients"]): p for p in phases}
    pairs = [(by[("recall", c)], by[(k, c)]) for k, c in by if k == "recall_vs_mcp" and ("recall", c) in by]
    if not pairs:
        return {}
    gap = max(round(ab["by_label"]["mcp"]["p50_ms"] - ab["by_label"]["rest"]["p50_ms"], 2) for _, ab in pairs)
    rss = max(round(ab["server_rss_mb_max"] - r["server_rss_mb_max"], 1) for r, ab in pairs)
    return {name: {"value": v, "target": TARGETS[name], "ok": v <= TARGETS[name]}
            for name, v in (("mcp_search_p50_over_recall_ms", gap), ("mcp_rss_over_recall_mb", rss))}


def to_markdown(result: Dict[str, Any]) -> str:
    """The Markdown section for the benchmark report."""
    p, env, seed = result["params"], result["environment"], result.get("seed", {})
    lines = [
        f"## HTTP service ({result['date']})",
        "",
        f"{p['memories']} memories seeded ({seed.get('per_second')} memories/s through `remember_many`, "
        f"db {_mb(seed.get('db_bytes'))}); server = `web.serve` on Waitress (127.0.0.1, default threads), "
        f"real int8 model; recall = hybrid, topk 5, queries not in the embedding cache; "
        f"{p['seconds_per_phase']:g} s per phase; keep-alive `http.client` threads.",
        f"Machine: {env['machine']}, {env['cpus']} CPUs, Python {env['python']}, commit {env.get('commit')}; "
        f"load average {env.get('loadavg_at_start')} at start, {env.get('loadavg_at_end')} at end "
        "(other work on the machine shares the cores).",
        "",
        f"First recall after start (loads the model): {result.get('first_recall_ms')} ms. "
        f"Server RSS idle before the model: {result.get('server_rss_idle_mb')} MB.",
        "",
        "| operation | clients | p50 ms | p95 ms | p99 ms | req/s | errors | engine p50 ms | RSS max MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for ph in result.get("phases", []):
        engine = ph.get("engine_p50_ms")
        lines.append(f"| {ph['kind']} | {ph['clients']} | {ph['p50_ms']} | {ph['p95_ms']} | {ph['p99_ms']} | "
                     f"{ph['throughput_rps']} | {ph['errors']} | {'' if engine is None else engine} | "
                     f"{ph['server_rss_mb_max']} |")
        for label, st in sorted(ph.get("by_label", {}).items()):
            lines.append(f"| - of which {label} | {ph['clients']} | {st['p50_ms']} | {st['p95_ms']} | | | | | |")
    lines += ["", "engine p50 = `took_ms` reported by the server for recall (time inside `Memory.recall`); "
              "the difference to p50 is HTTP, JSON, auth and waiting for a worker thread. recall_vs_mcp "
              "alternates REST `POST /v1/recall` and MCP `tools/call memory_search` (same arguments, "
              "2026-07-28) on every connection, so both see the same load."]
    hostile = result.get("hostile")
    if hostile:
        a = hostile["attack"]
        lines += ["", f"Hostile phase ({hostile['seconds']:g} s): {a['slowloris']} slowloris sockets (1 byte/s), "
                      f"{a['idle_keepalive']} idle keep-alives, {a['batch_writers']} clients sending {a['batch']} "
                      f"batches, each from its own loopback address; {hostile['normal_clients']} normal recall "
                      f"clients: p50 {hostile['normal_p50_ms']} ms, **p95 {hostile['normal_p95_ms']} ms**, "
                      f"p99 {hostile['normal_p99_ms']} ms, {hostile['normal_requests']} requests, "
                      f"{hostile['normal_errors']} errors; server RSS max **{hostile['server_rss_mb_max']} MB**. "
                      f"What the attackers saw: {hostile['counts']}."]
    rss = result.get("server_rss", {})
    lines += ["", f"Server memory over the whole run: VmRSS max {rss.get('rss_mb_max')} MB, "
                  f"VmHWM {rss.get('hwm_mb')} MB ({rss.get('samples')} samples at 100 ms).", ""]
    lines.append("| target | value | limit | met |")
    lines.append("|---|---:|---:|---|")
    for name, c in result.get("checks", {}).items():
        lines.append(f"| {name} | {c['value']} | {c['target']} | {'yes' if c['ok'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def _mb(n: Optional[int]) -> str:
    return f"{n / 1e6:.1f} MB" if n else "?"


def write_outputs(result: Dict[str, Any], out: Path) -> Tuple[Path, Path]:
    """Write ``<out>.json`` and ``<out>.md`` (``out`` may carry either suffix or none)."""
    base = out.with_suffix("") if out.suffix in (".json", ".md") else out
    base.parent.mkdir(parents=True, exist_ok=True)
    jpath, mpath = base.with_name(base.name + ".json"), base.with_name(base.name + ".md")
    jpath.write_text(json.dumps(result, indent=2, default=str) + "\n")
    mpath.write_text(to_markdown(result))
    return jpath, mpath


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI: ``python -m bench.http_bench --memories 10000 --seconds 10 --out bench/results/<date>-http``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--memories", type=int, default=10_000, help="memories seeded before the server starts")
    ap.add_argument("--seconds", type=float, default=10.0, help="seconds per phase (operation x clients)")
    ap.add_argument("--clients", default="1,4,8", help="comma-separated client counts")
    ap.add_argument("--model-dir", type=Path, default=None, help="default models/minilm-int8")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the store here instead of a temp dir")
    ap.add_argument("--hostile-seconds", type=float, default=30.0,
                    help="seconds of the hostile phase (slowloris + idle keep-alives + max batches); 0 = skip")
    ap.add_argument("--out", type=Path, default=None,
                    help="output path without suffix (default bench/results/<date>-http)")
    args = ap.parse_args(argv)
    out = args.out or REPO / "bench" / "results" / f"{_dt.date.today().isoformat()}-http"
    clients = [int(c) for c in args.clients.split(",") if c.strip()]
    result = run(memories=args.memories, seconds=args.seconds, clients=clients, model_dir=args.model_dir,
                 workdir=args.workdir, out=out, hostile_seconds=args.hostile_seconds)
    print(to_markdown(result))
    return 0 if all(c["ok"] for c in result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
