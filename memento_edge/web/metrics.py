"""Prometheus metrics: request counters and latency histograms, plus the service's gauges.

Rendered by hand in the text exposition format 0.0.4: a few dozen lines instead of a dependency, and no
global registry (each app has its own :class:`Metrics`).
"""
from __future__ import annotations

import logging
import math
import threading
import time
from typing import TYPE_CHECKING, Any, Dict, List, Tuple

from .. import __version__
from ..governor import read_rss_bytes

if TYPE_CHECKING:
    from .state import AppState

log = logging.getLogger("memento_edge.web")

# One metric family: (name, type, help, [(labels, value), ...]).
Family = Tuple[str, str, str, List[Tuple[Dict[str, str], float]]]

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))


def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class Metrics:
    """Request counters and latency histograms, rendered in the Prometheus text format (v0.0.4).

    Label values are route *rules* (``/v1/memories/<int:id>``), normalised methods and status codes,
    so the number of series is bounded however hostile the traffic.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (route, method, status) -> [bucket counts..., sum, count]
        self._series: Dict[Tuple[str, str, str], List[float]] = {}
        self.started = time.time()

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        """Record one finished request."""
        method = method if method in _METHODS else "OTHER"
        key = (route, method, str(status))
        with self._lock:
            row = self._series.get(key)
            if row is None:
                row = self._series[key] = [0.0] * (len(_BUCKETS) + 2)
            for i, bound in enumerate(_BUCKETS):
                if seconds <= bound:
                    row[i] += 1
            row[-2] += seconds
            row[-1] += 1

    def total_requests(self) -> int:
        """Requests finished so far (the stop line reports it)."""
        with self._lock:
            return int(sum(row[-1] for row in self._series.values()))

    def render(self, extra: List[Family]) -> str:
        """Exposition text: the HTTP series plus ``extra`` families ``(name, type, help, samples)``."""
        out: List[str] = []
        with self._lock:
            series = sorted((k, list(v)) for k, v in self._series.items())
        out.append("# HELP memento_http_requests_total HTTP requests served, by route, method and status.")
        out.append("# TYPE memento_http_requests_total counter")
        for (route, method, status), row in series:
            out.append(f'memento_http_requests_total{{route="{_label(route)}",method="{method}",'
                       f'status="{status}"}} {_fmt(int(row[-1]))}')
        out.append("# HELP memento_http_request_duration_seconds Time to produce the response headers.")
        out.append("# TYPE memento_http_request_duration_seconds histogram")
        for (route, method, status), row in series:
            labels = f'route="{_label(route)}",method="{method}",status="{status}"'
            for i, bound in enumerate(_BUCKETS):
                out.append(f'memento_http_request_duration_seconds_bucket{{{labels},le="{bound}"}} '
                           f'{_fmt(int(row[i]))}')
            out.append(f'memento_http_request_duration_seconds_bucket{{{labels},le="+Inf"}} '
                       f'{_fmt(int(row[-1]))}')
            out.append(f"memento_http_request_duration_seconds_sum{{{labels}}} {_fmt(row[-2])}")
            out.append(f"memento_http_request_duration_seconds_count{{{labels}}} {_fmt(int(row[-1]))}")
        for name, kind, help_text, samples in extra:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            for labels_d, value in samples:
                labels = ",".join(f'{k}="{_label(v)}"' for k, v in labels_d.items())
                out.append(f"{name}{{{labels}}} {_fmt(value)}" if labels else f"{name} {_fmt(value)}")
        return "\n".join(out) + "\n"



def service_families(st: "AppState") -> List[Family]:
    """The gauges and counters of the process, governor, rate limiter, database and model."""
    fams: List[Family] = []
    gov = st.governor.stats()
    rss = gov["rss_bytes"] if gov["rss_bytes"] is not None else read_rss_bytes()
    if rss is not None:
        fams.append(("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.",
                     [({}, rss)]))
    fams.append(("memento_rss_limit_bytes", "gauge", "Memory governor ceiling (0 = off).",
                 [({}, gov["rss_limit_bytes"])]))
    fams.append(("memento_governor_state", "gauge", "Memory governor state (1 for the current one).",
                 [({"state": s}, 1 if gov["state"] == s else 0) for s in ("ok", "soft", "hard")]))
    fams.append(("memento_shed_requests_total", "counter", "Requests refused under memory pressure.",
                 [({}, gov["shed_requests"])]))
    fams.append(("memento_rate_limited_total", "counter", "Requests refused by the rate limiter.",
                 [({}, st.limiter.limited)]))
    fams.append(("memento_build_info", "gauge", "Version of memento-edge.", [({"version": __version__}, 1)]))
    try:
        count = st.memory.count()
        fams.append(("memento_memories", "gauge", "Memories stored.", [({}, count)]))
    except Exception:
        log.warning("metrics: cannot count memories", exc_info=True)
    clock = st.memory.clock.state()
    fams.append(("memento_clock_trusted", "gauge", "1 when the wall clock is trusted (synchronised or an RTC).",
                 [({"source": clock["source"]}, 1 if clock["trusted"] else 0)]))
    fams.append(("memento_clock_corrected_total", "counter",
                 "Memories re-dated after the clock became trusted in the same boot.",
                 [({}, st.memory.clock_corrections)]))
    try:
        fams.extend(_backlog_families(st.memory.backlog_state()))
    except Exception:
        log.warning("metrics: cannot read the embedding backlog", exc_info=True)
    emb = st.embedder
    if emb is not None:
        fams.extend(_embedder_families(emb))
    return fams


def _backlog_families(b: Dict[str, Any]) -> List[Family]:
    """Background embedding: what is owed, how old, how fast it drains (see memento_edge/backlog.py)."""
    return [
        ("memento_embed_backlog", "gauge", "Memories stored but not yet embedded.", [({}, b["pending"])]),
        ("memento_embed_backlog_failed", "gauge", "Backlog entries skipped after repeated failures.",
         [({}, b["failed"])]),
        ("memento_embed_backlog_oldest_seconds", "gauge", "Age of the oldest backlog entry (0 when empty).",
         [({}, b["oldest_age_s"] or 0.0)]),
        ("memento_embed_backlog_drain_per_minute", "gauge", "Backlog entries embedded per minute lately.",
         [({}, b["drain_per_min"])]),
        ("memento_background_embeds_total", "counter", "Vectors written by this process's backlog worker.",
         [({}, b["worker"]["embedded"])]),
    ]


def _embedder_families(emb: Any) -> List[Family]:
    fams: List[Family] = []
    try:
        es = emb.stats() or {}
    except Exception:
        es = {}
    backend = str(es.get("backend") or getattr(emb, "backend", "unknown"))
    fams.append(("memento_model_loaded", "gauge", "1 if the embedding model is loaded.",
                 [({"backend": backend}, 1 if es.get("loaded", getattr(emb, "loaded", False)) else 0)]))
    cache = es.get("cache") or {}
    for key, name, kind, help_text in (
            ("hits", "memento_embed_cache_hits_total", "counter", "Embedding cache hits."),
            ("misses", "memento_embed_cache_misses_total", "counter", "Embedding cache misses."),
            ("entries", "memento_embed_cache_entries", "gauge", "Embedding cache entries."),
            ("bytes", "memento_embed_cache_bytes", "gauge", "Embedding cache size in bytes.")):
        if isinstance(cache.get(key), (int, float)):
            fams.append((name, kind, help_text, [({}, cache[key])]))
    count_v = es.get("embed_count")
    if isinstance(count_v, (int, float)):
        fams.append(("memento_embeds_total", "counter", "Texts embedded by the model.", [({}, count_v)]))
    last_ms = es.get("last_embed_ms")
    if isinstance(last_ms, (int, float)):
        fams.append(("memento_embed_last_seconds", "gauge", "Duration of the latest inference.",
                     [({}, last_ms / 1000.0)]))
    return fams
