"""The "hostile" phase of the HTTP benchmark (issue #14): normal clients under attack.

For ``seconds``, at the same time:

* 30 slowloris sockets (from 127.0.0.2) trickle request headers at 1 byte/s, reconnecting when cut off;
* 40 idle keep-alive sockets (from 127.0.0.3) send one request each, then sit idle, reconnecting when closed;
* 4 clients (from 127.0.0.4) send batch writes back to back, alternating the issue's 1,000 memories x 8,000
  characters (8 MB: over max_body_bytes, refused before it is read) and the largest batch every limit
  admits, 250 x 8,000 characters (2 MB, ~64,000 tokens: the whole work_token_budget, really embedded);
* 4 normal clients (from 127.0.0.1) recall (hybrid, top 5), each request with a 10 s timeout.

Reported: the normal clients' p50/p95/p99 and errors, what happened to the batches (status counts), how
many attacker sockets the server cut, and the server's peak RSS during the phase (from the sampler).
Attackers use other loopback addresses because a real attacker is another host: the per-address cap
(``connections_per_client``) is part of what is measured.
"""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections import Counter
from typing import Any, Callable, Dict, List, Sequence

SLOWLORIS, IDLE, BATCHERS, NORMAL = 30, 40, 4, 4
BATCH_ITEMS, BATCH_CHARS = (1000, 250), 8000
NORMAL_TIMEOUT_S = 10.0


def _connect(port: int, source: str, timeout: float = 5.0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1", port))
    return sock


class _Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Counter = Counter()

    def add(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] += n


def _slowloris(port: int, stop: threading.Event, c: _Counters) -> None:
    header = b"POST /v1/memories HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 10_000
    while not stop.is_set():
        try:
            sock = _connect(port, "127.0.0.2")
        except OSError:
            c.add("slowloris_connect_refused")
            stop.wait(1.0)
            continue
        try:
            for byte in header:
                if stop.wait(1.0):
                    break
                sock.send(bytes([byte]))
        except OSError:
            c.add("slowloris_cut")
        finally:
            sock.close()


def _idle(port: int, stop: threading.Event, c: _Counters) -> None:
    while not stop.is_set():
        try:
            sock = _connect(port, "127.0.0.3")
            sock.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            sock.settimeout(1.0)
            while not stop.is_set():
                try:
                    if not sock.recv(4096):
                        c.add("idle_closed")
                        break
                except socket.timeout:
                    continue
        except OSError:
            c.add("idle_refused")
            stop.wait(1.0)
        finally:
            try:
                sock.close()
            except (OSError, UnboundLocalError):
                pass


def _batcher(port: int, token: str, n: int, stop: threading.Event, c: _Counters, took: List[float]) -> None:
    filler = ("lorem ipsum dolor sit amet " * 400)[:BATCH_CHARS - 40]
    k = 0
    while not stop.is_set():
        k += 1
        items = BATCH_ITEMS[k % len(BATCH_ITEMS)]
        body = json.dumps({"items": [{"text": f"batch {n}.{k}.{i} {filler}"} for i in range(items)]})
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600, source_address=("127.0.0.4", 0))
        t0 = time.perf_counter()
        try:
            conn.request("POST", "/v1/memories", body=body.encode(),
                         headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
            status = conn.getresponse().status
            c.add(f"batch{items}_http_{status}")
        except (OSError, http.client.HTTPException) as exc:
            c.add(f"batch_{type(exc).__name__}")
            stop.wait(1.0)
        finally:
            took.append(time.perf_counter() - t0)
            conn.close()


def _normal(port: int, token: str, queries: Sequence[str], n: int, stop: threading.Event,
            lat: List[float], errors: List[str]) -> None:
    conn = None
    i = 0
    while not stop.is_set():
        i += 1
        body = json.dumps({"query": queries[(n * 997 + i) % len(queries)], "topk": 5, "mode": "hybrid"})
        t0 = time.perf_counter()
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=NORMAL_TIMEOUT_S)
            conn.request("POST", "/v1/recall", body=body.encode(),
                         headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                errors.append(f"HTTP {resp.status}")
                continue
            lat.append((time.perf_counter() - t0) * 1000.0)
        except (OSError, http.client.HTTPException) as exc:
            errors.append(type(exc).__name__)
            if conn is not None:
                conn.close()
            conn = None


def run_hostile(port: int, token: str, queries: Sequence[str], seconds: float,
                percentile: Callable[[Sequence[float], float], float]) -> Dict[str, Any]:
    """Run the phase; returns the normal clients' latency and what the attackers saw."""
    stop = threading.Event()
    c = _Counters()
    lat: List[float] = []
    errors: List[str] = []
    batch_took: List[float] = []
    threads = [threading.Thread(target=_slowloris, args=(port, stop, c), daemon=True) for _ in range(SLOWLORIS)]
    threads += [threading.Thread(target=_idle, args=(port, stop, c), daemon=True) for _ in range(IDLE)]
    threads += [threading.Thread(target=_batcher, args=(port, token, n, stop, c, batch_took), daemon=True)
                for n in range(BATCHERS)]
    for t in threads:
        t.start()
    time.sleep(2.0)  # let the attack build up before measuring
    normal = [threading.Thread(target=_normal, args=(port, token, queries, n, stop, lat, errors), daemon=True)
              for n in range(NORMAL)]
    for t in normal:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in normal + threads:
        t.join(30)
    ordered = sorted(lat)
    return {
        "seconds": seconds, "attack": {"slowloris": SLOWLORIS, "idle_keepalive": IDLE, "batch_writers": BATCHERS,
                                       "batch": " / ".join(f"{n} x {BATCH_CHARS}" for n in BATCH_ITEMS)
                                       + " characters"},
        "normal_clients": NORMAL, "normal_requests": len(ordered), "normal_errors": len(errors),
        "normal_error_examples": sorted(set(errors))[:5],
        "normal_p50_ms": round(percentile(ordered, 50), 1), "normal_p95_ms": round(percentile(ordered, 95), 1),
        "normal_p99_ms": round(percentile(ordered, 99), 1),
        "batch_seconds_max": round(max(batch_took), 2) if batch_took else None,
        "counts": dict(sorted(c.counts.items())),
    }
