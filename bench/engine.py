"""Engine measurements: embedding, store, stress, RSS / database size, onnxruntime ablation, cold start.

Every section runs in its own worker process (``python -m bench.engine SECTION --spec ... --result
FILE``) because RSS is per process and because a crash or hang in one section must not take the whole
run down. A *spec* says which side is measured:

- ``project``  - memento-edge as shipped: int8 model, the embedder's tuned onnxruntime session, the LRU
  cache, hybrid recall (also vector and keyword modes).
- ``baseline`` - "seed-style": the fp32 graph in ``<model_dir>/fp32`` run by an onnxruntime session
  with *default* SessionOptions, no embedding cache, vector-only recall, on the same store.

``fake: true`` swaps both sides for :class:`memento_edge.embedder.FakeEmbedder` (smoke tests only:
nothing measured with it means anything).

Large stores are filled through the public API (``Memory.remember_many``, batches of 1,000) with
an embedder wrapper, :class:`PooledVectors`, that embeds a pool of distinct texts once with the real
model and then hands each further distinct text a pool vector picked by a hash of the text plus a small
Gaussian jitter, re-normalised. Queries are always embedded for real.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "minilm-int8"
FP32_SUBDIR = "fp32"
NOT_MEASURABLE = "not measurable on this platform"

Spec = Dict[str, Any]


# ------------------------------------------------------------------------------------------------
# small statistics / process helpers
# ------------------------------------------------------------------------------------------------
def percentile(values: Sequence[float], pct: float) -> float:
    """Linear-interpolated percentile (``pct`` in 0..100) of a non-empty sequence."""
    data = sorted(values)
    if not data:
        return float("nan")
    pos = (len(data) - 1) * pct / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def summarize(ms: Sequence[float]) -> Dict[str, float]:
    """n / median / p95 / mean / min / max of a list of milliseconds."""
    if not ms:
        return {"n": 0}
    return {
        "n": len(ms),
        "median": statistics.median(ms),
        "p95": percentile(ms, 95),
        "mean": statistics.fmean(ms),
        "min": min(ms),
        "max": max(ms),
    }


def now_ms() -> float:
    """Monotonic clock in milliseconds."""
    return time.perf_counter_ns() / 1e6


def proc_status() -> Dict[str, float]:
    """VmRSS and VmHWM of this process in MB (``/proc/self/status``; ru_maxrss where /proc is missing)."""
    out: Dict[str, float] = {}
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[key.lower().replace("vm", "") + "_mb"] = int(value.split()[0]) / 1024.0
    except OSError:
        import resource

        out["hwm_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return out


class RssSampler:
    """Samples VmRSS every ``interval`` seconds in a thread; ``peak_mb`` is the largest sample."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, proc_status().get("rss_mb", 0.0))
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.peak_mb = max(self.peak_mb, proc_status().get("rss_mb", 0.0))


def module_available(name: str) -> bool:
    """True when ``name`` can be imported (checked without importing it)."""
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def baseline_unavailable_reason(spec: Spec) -> Optional[str]:
    """Why the seed-style baseline cannot run here, or None when it can."""
    if spec.get("fake"):
        return None
    missing = [m for m in ("onnxruntime", "tokenizers") if not module_available(m)]
    if missing:
        return f"{NOT_MEASURABLE}: {', '.join(missing)} not installed (armv6 fallback backend)"
    fp32 = Path(spec["model_dir"]) / FP32_SUBDIR / "model.onnx"
    if not fp32.exists():
        return (f"baseline fp32 graph missing: {fp32} (build the model with the fp32 graph kept, "
                "`memento-edge model build --keep-fp32`)")
    return None


# ------------------------------------------------------------------------------------------------
# deterministic synthetic texts (distinct, ~100 characters)
# ------------------------------------------------------------------------------------------------
_NAMES = ("Alice Bruno Chen Dana Elif Farid Greta Hiro Ines Jonas Kofi Lena Marco Nadia Omar Priya Quentin "
          "Rosa Sven Tara Umar Vera Wen Ximena Yusuf Zoe Amara Bilal Carmen Dmitri Esme Felix Gwen Hamid Ida "
          "Jasper Keiko Luca Maya Nils").split()
_VERBS = ("repaired|painted|borrowed|returned|photographed|cleaned|sold|bought|found|lost|moved|measured|"
          "sketched|wrapped|packed|unpacked|delivered|ordered|tested|weighed|labelled|hid|shared|restored|"
          "described|carried|replaced|inspected|polished|catalogued|rented|donated|assembled|sorted|traded|"
          "noticed|fixed|stored|collected|mended").split("|")
_ADJS = ("rusty|bright|tiny|heavy|antique|broken|green|wooden|silver|noisy|fragile|striped|folded|dusty|"
         "shiny|crooked|spare|faded|sturdy|velvet|plastic|copper|woollen|cracked|glass|leather|painted|"
         "oversized|vintage|battered|foldable|spotless|waterproof|enamel|bamboo|marble|linen|ceramic|"
         "electric|hand-made").split("|")
_NOUNS = ("bicycle|lantern|teapot|kayak|violin|telescope|notebook|umbrella|suitcase|typewriter|ladder|"
          "compass|guitar|kettle|clock|camera|drone|backpack|microscope|sewing machine|radio|stroller|"
          "toolbox|skateboard|tent|fishing rod|chessboard|bookshelf|lamp|mirror|hammock|barometer|"
          "accordion|birdhouse|wheelbarrow|easel|helmet|globe|record player|canoe|printer|piano stool|"
          "sled|rug|jacket|scarf|vase|bench|aquarium|keyboard|projector|drum|saddle|trophy|map|"
          "basket|cabinet|quilt|kite|pendulum").split("|")
_PLACES = ("harbour market|old library|train station|community garden|bakery|repair shop|school gym|"
           "river bank|town hall|flea market|museum|bus depot|farm shop|lighthouse|art studio|bike path|"
           "night market|post office|ferry terminal|village fair|hardware store|youth club|football pitch|"
           "book café|music school|allotment|ski lodge|beach hut|car park|clinic|warehouse|workshop|"
           "campsite|observatory|chapel|gallery|swimming pool|bridge|theatre|laundrette").split("|")
_TIMES = ("on Monday morning|on Tuesday evening|last Wednesday|on Thursday night|early on Friday|"
          "on Saturday afternoon|late on Sunday|yesterday|two days ago|last weekend|at dawn|at noon|"
          "after lunch|before dinner|in the rain|during the storm|at midnight|over the holidays|"
          "last spring|in early autumn|this summer|in January|in March|in July|in October|in December|"
          "after work|before school|on her birthday|on his day off").split("|")
_REASONS = ("the rain finally stopped|a neighbour asked for help|the old one had worn out|it was on sale|"
            "the club needed it|a cousin was visiting|the insurance required it|it was a gift|"
            "the deadline moved|the shop was closing|the weather turned|a friend recommended it|"
            "the lease ended|the festival was coming|the kids wanted it|the landlord agreed|"
            "the parts arrived|the budget allowed it|the recipe called for it|the trip was cancelled|"
            "the bus was late|the power went out|the garden flooded|the team won|the price dropped|"
            "the manual was found|the paint dried|the key turned up|the roof leaked|the loan came through"
            ).split("|")

_RADICES = (len(_NAMES), len(_VERBS), len(_ADJS), len(_NOUNS), len(_PLACES), len(_TIMES), len(_REASONS))
_SPACE = 1
for _r in _RADICES:
    _SPACE *= _r
_STRIDE = 1_000_003  # prime, coprime with _SPACE (whose factors are 2, 3, 5): i -> i*stride is a bijection


def _digits(i: int, radices: Sequence[int], stride: int, space: int) -> List[int]:
    x = (i * stride + 7) % space
    out = []
    for r in radices:
        out.append(x % r)
        x //= r
    return out


def gen_text(i: int) -> str:
    """The i-th distinct synthetic memory (~100 characters, varied vocabulary for FTS5)."""
    n, v, a, o, p, t, r = _digits(i, _RADICES, _STRIDE, _SPACE)
    return (f"{_NAMES[n]} {_VERBS[v]} the {_ADJS[a]} {_NOUNS[o]} at the {_PLACES[p]} {_TIMES[t]} "
            f"because {_REASONS[r]}.")


_Q_RADICES = (len(_NAMES), len(_ADJS), len(_NOUNS), len(_PLACES))
_Q_SPACE = len(_NAMES) * len(_ADJS) * len(_NOUNS) * len(_PLACES)


def gen_query(i: int) -> str:
    """The i-th distinct short recall query (~10 tokens)."""
    n, a, o, p = _digits(i, _Q_RADICES, 7919, _Q_SPACE)
    return f"what did {_NAMES[n]} do with the {_ADJS[a]} {_NOUNS[o]} at the {_PLACES[p]}?"


def gen_short(i: int) -> str:
    """The i-th distinct short text of about 12 tokens."""
    n, v, a, o, _p, t, _r = _digits(i + 5_000_000, _RADICES, _STRIDE, _SPACE)
    return f"{_NAMES[n]} {_VERBS[v]} the {_ADJS[a]} {_NOUNS[o]} {_TIMES[t]}."


def gen_long(i: int, sentences: int = 8) -> str:
    """The i-th distinct long text of about 200 tokens (``sentences`` synthetic sentences)."""
    return " ".join(gen_text(10_000_000 + i * sentences + k) for k in range(sentences))


def gen_mixed_batch(i: int, size: int = 20) -> List[str]:
    """A batch of ``size`` distinct texts of mixed lengths: 40 % short, 40 % one sentence, 20 % long."""
    out = []
    for k in range(size):
        j = i * size + k
        if k % 5 in (0, 1):
            out.append(gen_short(20_000_000 + j))
        elif k % 5 in (2, 3):
            out.append(gen_text(30_000_000 + j))
        else:
            out.append(gen_long(40_000_000 + j, sentences=8))
    return out


# ------------------------------------------------------------------------------------------------
# embedders
# ------------------------------------------------------------------------------------------------
class PooledVectors:
    """Embedder wrapper for filling big stores fast: pool vectors + jitter while ``filling`` is True.

    Outside fill mode every call goes to the real embedder, so queries are embedded for real.
    """

    def __init__(self, inner: Any, pool: np.ndarray, jitter: float = 0.01) -> None:
        self.inner = inner
        self.pool = pool
        self.jitter = jitter
        self.filling = False

    def __getattr__(self, name: str) -> Any:  # dim, backend, fingerprint, loaded, load, stats, ...
        return getattr(self.inner, name)

    def _vectors(self, texts: Sequence[str]) -> np.ndarray:
        out = np.empty((len(texts), self.pool.shape[1]), dtype=np.float32)
        for row, text in enumerate(texts):
            h = zlib.crc32(text.encode("utf-8"))
            rng = np.random.default_rng(h)
            v = self.pool[h % len(self.pool)] + rng.normal(0.0, self.jitter, self.pool.shape[1])
            out[row] = v / np.linalg.norm(v)
        return out

    def embed_batch(self, texts: Sequence[str]) -> np.ndarray:
        """Pool vectors while filling, real embeddings otherwise."""
        return self._vectors(texts) if self.filling else self.inner.embed_batch(texts)

    def embed(self, text: str) -> np.ndarray:
        """Pool vector while filling, the real (cached) embedding otherwise."""
        return self._vectors([text])[0] if self.filling else self.inner.embed(text)


def settings_for(spec: Spec, home: Path, db_name: str = "memento.db", **overrides: Any) -> Any:
    """Settings for a bench store in ``home`` (environment ignored: the bench measures defaults)."""
    from memento_edge.config import Settings

    # spec["settings"]: profile-level overrides (the emulated profile lifts request_timeout, because a
    # 20-text batch on the armv6 numpy fallback under qemu takes longer than the service's 30 s guard).
    # embed_mode inline unless asked: rows measure the embedding they name (armv6's auto default is
    # background; its acknowledgement time has a row of its own, see section_store).
    merged = {"embed_mode": "inline", **(spec.get("settings") or {}), **overrides}
    # MEMENTO_CONFIG="": no config file either, so a host /etc/memento-edge/config.yaml cannot skew results.
    return Settings.load(env={"MEMENTO_CONFIG": ""}, home=str(home), db=str(home / db_name),
                         model_dir=spec["model_dir"], **merged)


def embedder_options(spec: Spec) -> Any:
    """The :class:`EmbedderOptions` of a side: tuned (project), seed-style on the fp32 graph (baseline).

    ``spec["options"]`` (ablation) is ``{"profile": "tuned"|"default", field: value, ...}``.
    """
    from memento_edge.embedder import EmbedderOptions

    if spec["side"] == "baseline":
        # fp32 graph, plain InferenceSession defaults, padded batches; "fast" verification because the
        # seed verified nothing (deep sha256 of the int8 files would only slow the baseline's start).
        return EmbedderOptions.seed_style(model_file=f"{FP32_SUBDIR}/model.onnx", verify="fast")
    changes = dict(spec.get("options") or {})
    profile = changes.pop("profile", "tuned")
    return EmbedderOptions.named(profile, **changes)


def make_side_embedder(spec: Spec, home: Path) -> Any:
    """The embedder of a side (see the module docstring); the baseline gets a zero-size cache."""
    if spec.get("fake"):
        from memento_edge.embedder import FakeEmbedder, LRUCache

        emb = FakeEmbedder()
        if spec["side"] == "baseline":
            emb.cache = LRUCache(0, 0)
        return emb
    if spec["side"] == "baseline":
        reason = baseline_unavailable_reason(spec)
        if reason:
            raise RuntimeError(reason)
    from memento_edge import embedder as emb_mod

    settings = settings_for(spec, home)
    if spec["side"] == "baseline":
        return emb_mod.OnnxEmbedder(settings, embedder_options(spec), cache=emb_mod.LRUCache(0, 0))
    if spec.get("options"):
        return emb_mod.make_embedder(settings, embedder_options(spec), backend="onnxruntime")
    return emb_mod.make_embedder(settings)


def recall_mode(spec: Spec, wanted: str) -> str:
    """The baseline only knows vector recall."""
    return "vector" if spec["side"] == "baseline" else wanted


def side_modes(spec: Spec) -> List[str]:
    """Recall modes measured for a side."""
    return ["vector"] if spec["side"] == "baseline" else ["hybrid", "vector", "keyword"]


def open_memory(settings: Any, embedder: Any) -> Any:
    """A :class:`memento_edge.memory.Memory` on ``settings`` with ``embedder`` injected."""
    from memento_edge.memory import Memory

    return Memory(settings, embedder=embedder)


def fill(mem: Any, start: int, stop: int, batch: int = 1000, collection: str = "bench",
         text_fn: Callable[[int], str] = gen_text) -> None:
    """Insert memories ``text_fn(start..stop-1)`` through ``remember_many`` in batches."""
    for lo in range(start, stop, batch):
        items = [{"text": text_fn(i), "collection": collection} for i in range(lo, min(stop, lo + batch))]
        mem.remember_many(items)


def db_files_bytes(db_path: Path) -> int:
    """Bytes of the database file plus its -wal and -shm companions."""
    total = 0
    for suffix in ("", "-wal", "-shm"):
        p = Path(str(db_path) + suffix)
        if p.exists():
            total += p.stat().st_size
    return total


def checkpoint(db_path: Path) -> None:
    """``PRAGMA wal_checkpoint(TRUNCATE)`` from a plain connection (no extension needed for that)."""
    con = sqlite3.connect(str(db_path))
    try:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    finally:
        con.close()


# ------------------------------------------------------------------------------------------------
# sections (each returns a JSON-able dict; params come from the profile, see bench.run.PROFILES)
# ------------------------------------------------------------------------------------------------
def section_embedding(spec: Spec, params: Dict[str, Any], work: Path) -> Dict[str, Any]:
    """Uncached short / long embeds, warm cache hit, batch of 20 mixed lengths."""
    reps = int(params.get("embed_reps", 50))
    batch_reps = int(params.get("batch_reps", 10))
    emb = make_side_embedder(spec, work)
    t0 = now_ms()
    emb.load()
    load_ms = now_ms() - t0
    res: Dict[str, Any] = {"backend": getattr(emb, "backend", "?"), "load_ms": load_ms}
    for k in range(int(params.get("warmup", 3))):  # warm-up: first runs allocate arenas / caches
        emb.embed_batch([gen_short(900_000 + k)])
        emb.embed_batch([gen_long(900_000 + k)])
        emb.embed_batch(gen_mixed_batch(900_000 + k))
    res["tokens"] = token_counts(spec, [gen_short(i) for i in range(20)], [gen_long(i) for i in range(5)],
                                 gen_mixed_batch(0))

    def timed(fn: Callable[[int], Any], n: int) -> List[float]:
        out = []
        for i in range(n):
            t = now_ms()
            fn(i)
            out.append(now_ms() - t)
        return out

    res["uncached_short"] = summarize(timed(lambda i: emb.embed(gen_short(i)), reps))
    long_reps = int(params.get("long_reps", max(5, reps // 2)))
    res["uncached_long"] = summarize(timed(lambda i: emb.embed(gen_long(i)), long_reps))
    hot = gen_short(999_999)
    emb.embed(hot)
    res["cache_hit"] = summarize(timed(lambda i: emb.embed(hot), reps))
    res["has_cache"] = spec["side"] != "baseline"
    per_item = [ms / 20.0 for ms in timed(lambda i: emb.embed_batch(gen_mixed_batch(i)), batch_reps)]
    res["batch20_ms_per_item"] = summarize(per_item)
    try:
        res["embedder_stats"] = _jsonable(emb.stats())
    except Exception as exc:  # stats are informative only
        res["embedder_stats"] = {"error": repr(exc)}
    return res


def token_counts(spec: Spec, short: List[str], long: List[str], mixed: List[str]) -> Dict[str, Any]:
    """Mean token counts of the generated texts (with the model's tokenizer when available)."""
    path = Path(spec["model_dir"]) / "tokenizer.json"
    if spec.get("fake") or not path.exists() or not module_available("tokenizers"):
        return {"note": "tokenizer not available; counts are whitespace words",
                "short": statistics.fmean(len(t.split()) for t in short),
                "long": statistics.fmean(len(t.split()) for t in long)}
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.enable_truncation(256)

    def mean(texts: List[str]) -> float:
        return statistics.fmean(len(e.ids) for e in tok.encode_batch(texts))

    return {"short": mean(short), "long": mean(long), "mixed_batch": mean(mixed)}


def section_store(spec: Spec, params: Dict[str, Any], work: Path) -> Dict[str, Any]:
    """Remember latency (durable) and recall latency per mode at growing store sizes."""
    sizes = sorted(int(s) for s in params["sizes"])
    queries = int(params.get("recall_queries", 50))
    remember_n = int(params.get("remember_reps", 50))
    pool_n = int(params.get("pool", 1000))
    emb = make_side_embedder(spec, work)
    emb.load()
    res: Dict[str, Any] = {"sizes": sizes, "modes": side_modes(spec)}

    # --- remember: one durable transaction per call on a small store ----------------------------
    mem = open_memory(settings_for(spec, work, "remember.db"), emb)
    try:
        for i in range(int(params.get("remember_warmup", 10))):
            mem.remember(gen_text(50_000_000 + i), collection="bench")
        ms = []
        for i in range(remember_n):
            t = now_ms()
            mem.remember(gen_text(51_000_000 + i), collection="bench")
            ms.append(now_ms() - t)
        res["remember"] = summarize(ms)
    finally:
        mem.close()
    res["remember_background"] = _remember_background(spec, params, work, emb)

    # --- recall at sizes ----------------------------------------------------------------------
    t = now_ms()
    pool_texts = [gen_text(i) for i in range(min(pool_n, sizes[-1]))]
    pool = np.vstack([emb.embed_batch(pool_texts[k:k + 64]) for k in range(0, len(pool_texts), 64)])
    res["fill"] = {
        "method": (f"Memory.remember_many in batches of 1000 distinct synthetic ~100-char texts; vectors: "
                   f"{len(pool_texts)} texts embedded for real by this side's model, every further text gets "
                   f"the pool vector picked by crc32(text) + N(0, 0.01) jitter, re-normalised; queries are "
                   f"embedded for real"),
        "pool_embed_s": (now_ms() - t) / 1000.0,
        "seconds": {},
        "db_bytes": {},
    }
    pooled = PooledVectors(emb, pool)
    settings = settings_for(spec, work, "recall.db")
    mem = open_memory(settings, pooled)
    recall: Dict[str, Any] = {}
    count = 0
    qbase = 0
    try:
        for size in sizes:
            t = now_ms()
            pooled.filling = True
            try:
                fill(mem, count, size)
            finally:
                pooled.filling = False
            res["fill"]["seconds"][str(size)] = (now_ms() - t) / 1000.0
            count = size
            res["fill"]["db_bytes"][str(size)] = db_files_bytes(settings.db_path)
            per_mode: Dict[str, Any] = {}
            for mode in side_modes(spec):
                for w in range(int(params.get("warmup", 3))):
                    mem.recall(gen_query(8_000_000 + qbase + w), topk=5, mode=mode)
                qs = [gen_query(qbase + j) for j in range(queries)]
                qbase += queries + 3
                first, second, hits = [], [], []
                for q in qs:  # first pass: the query text is new -> the embedding is computed
                    t = now_ms()
                    r = mem.recall(q, topk=5, mode=mode)
                    first.append(now_ms() - t)
                    hits.append(len(r.hits))
                for q in qs:  # second pass: the project's LRU cache now holds the query vectors
                    t = now_ms()
                    mem.recall(q, topk=5, mode=mode)
                    second.append(now_ms() - t)
                per_mode[mode] = {"uncached": summarize(first), "cached": summarize(second),
                                  "mean_hits": statistics.fmean(hits),
                                  "effective_mode": getattr(r, "mode", mode),
                                  "note": getattr(r, "note", None)}
            recall[str(size)] = per_mode
        res["recall"] = recall
        res["final_count"] = mem.count()
    finally:
        mem.close()
    return res


def _remember_background(spec: Spec, params: Dict[str, Any], work: Path, emb: Any) -> Dict[str, Any]:
    """Acknowledgement time of ``remember`` with embed_mode background (no worker: only the durable
    write of text, tags and keyword index is timed; the backlog left behind is counted)."""
    mem = open_memory(settings_for(spec, work, "remember-bg.db", embed_mode="background"), emb)
    try:
        for i in range(int(params.get("remember_warmup", 10))):
            mem.remember(gen_text(52_000_000 + i), collection="bench")
        ms = []
        for i in range(int(params.get("remember_reps", 50))):
            t = now_ms()
            mem.remember(gen_text(53_000_000 + i), collection="bench")
            ms.append(now_ms() - t)
        return {**summarize(ms), "backlog": mem.backlog_state()["pending"]}
    finally:
        mem.close()


def _run_threads(targets: List[Callable[[], None]], timeout: float) -> Dict[str, Any]:
    """Start all targets together; count exceptions per type and threads still running at ``timeout``."""
    errors: Dict[str, int] = {}
    lock = threading.Lock()
    barrier = threading.Barrier(len(targets))

    def wrap(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            barrier.wait()
            try:
                fn()
            except Exception as exc:  # counted, not raised: the row reports error counts
                with lock:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
        return run

    threads = [threading.Thread(target=wrap(fn), daemon=True) for fn in targets]
    t = now_ms()
    for th in threads:
        th.start()
    deadline = time.monotonic() + timeout
    for th in threads:
        th.join(max(0.0, deadline - time.monotonic()))
    return {"seconds": (now_ms() - t) / 1000.0, "errors": sum(errors.values()), "error_types": errors,
            "hung_threads": sum(th.is_alive() for th in threads)}


def section_stress(spec: Spec, params: Dict[str, Any], work: Path) -> Dict[str, Any]:
    """Sequential inserts, concurrent writers, mixed writers/readers, create/delete cycles."""
    emb = make_side_embedder(spec, work)
    emb.load()
    res: Dict[str, Any] = {}
    base = 60_000_000
    for n in params.get("stress_inserts", [100, 500, 1000]):
        mem = open_memory(settings_for(spec, work, f"insert{n}.db"), emb)
        failed = 0
        t = now_ms()
        for i in range(n):
            try:
                mem.remember(gen_text(base + i), collection="bench")
            except Exception:  # counted: the row reports failures instead of stopping the run
                failed += 1
        secs = (now_ms() - t) / 1000.0
        res[f"insert_{n}"] = {"seconds": secs, "errors": failed, "count": mem.count()}
        mem.close()
        base += n

    per = int(params.get("concurrent_each", 25))
    mem = open_memory(settings_for(spec, work, "concurrent.db"), emb)
    ids: List[int] = []

    def writer(w: int, start: int) -> Callable[[], None]:
        def run() -> None:
            for i in range(per):
                ids.append(mem.remember(gen_text(start + w * per + i), collection="bench").id)
        return run

    out = _run_threads([writer(w, base) for w in range(4)], timeout=600)
    base += 4 * per
    out["count"] = mem.count()
    out["expected"] = 4 * per
    res["concurrent_4x"] = out
    mem.close()

    mem = open_memory(settings_for(spec, work, "mixed.db"), emb)
    mixed_fill = int(params.get("mixed_fill", 100))
    fill(mem, base, base + mixed_fill, batch=100)
    base += mixed_fill
    mode = recall_mode(spec, "hybrid")

    def reader(r: int) -> Callable[[], None]:
        def run() -> None:
            for i in range(per):
                mem.recall(gen_query(70_000_000 + r * per + i), topk=5, mode=mode)
        return run

    out = _run_threads([writer(w, base) for w in range(2)] + [reader(r) for r in range(3)], timeout=600)
    base += 2 * per
    out["count"] = mem.count()
    out["expected"] = mixed_fill + 2 * per
    res["mixed_2w3r"] = out
    mem.close()

    cycles = int(params.get("cycles", 100))
    mem = open_memory(settings_for(spec, work, "cycles.db"), emb)
    from memento_edge.errors import NotFound

    errors: Dict[str, int] = {}
    before = mem.count()
    t = now_ms()
    for c in range(cycles):
        try:
            # Every other cycle re-creates the text deleted just before: a delete must not leave a
            # dedupe record (hash, FTS row or vector) behind that blocks or shadows the new memory.
            text = gen_text(base + (c // 2))
            r = mem.remember(text, collection="bench")
            if not r.created:
                raise AssertionError("re-created text reported as duplicate")
            if mem.get(r.id).text != text:
                raise AssertionError("get returned another text")
            mem.delete(r.id)
            try:
                mem.get(r.id)
                raise AssertionError("deleted memory still readable")
            except NotFound:
                pass
        except Exception as exc:
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
    res["create_delete"] = {"cycles": cycles, "seconds": (now_ms() - t) / 1000.0,
                            "errors": sum(errors.values()), "error_types": errors,
                            "count_consistent": mem.count() == before}
    mem.close()
    return res


def section_rss(spec: Spec, params: Dict[str, Any], work: Path) -> Dict[str, Any]:
    """RSS after import / model load / 1,000 mixed ops / during and after an N-memory import; DB bytes."""
    stages: Dict[str, Any] = {"at_start": proc_status()}
    # What a service imports before its first request; both sides import the same modules here
    # (the embedder imports onnxruntime and tokenizers lazily, at model load).
    import memento_edge.embedder  # noqa: F401
    import memento_edge.memory  # noqa: F401
    gc.collect()
    stages["after_import"] = proc_status()
    emb = make_side_embedder(spec, work)
    emb.load()
    gc.collect()
    stages["after_model_load"] = proc_status()
    emb.embed(gen_short(1))
    stages["after_first_embed"] = proc_status()

    ops = int(params.get("rss_ops", 1000))
    mem = open_memory(settings_for(spec, work, "ops.db"), emb)
    mode = recall_mode(spec, "hybrid")
    live: List[int] = []
    counts = {"remember": 0, "recall": 0, "delete": 0}
    t = now_ms()
    for i in range(ops):
        k = i % 10
        if k < 6 or not live:
            live.append(mem.remember(gen_text(80_000_000 + i), collection="bench").id)
            counts["remember"] += 1
        elif k < 9:
            mem.recall(gen_query(81_000_000 + i), topk=5, mode=mode)
            counts["recall"] += 1
        else:
            mem.delete(live.pop(0))
            counts["delete"] += 1
    ops_s = (now_ms() - t) / 1000.0
    mem.close()
    gc.collect()
    stages["after_mixed_ops"] = proc_status()

    n = int(params.get("import_n", 10_000))
    settings = settings_for(spec, work, "import.db")
    mem = open_memory(settings, emb)
    t = now_ms()
    with RssSampler() as sampler:
        fill(mem, 90_000_000, 90_000_000 + n, batch=int(params.get("import_batch", 1000)))
    import_s = (now_ms() - t) / 1000.0
    stages["import_peak"] = {"rss_mb": sampler.peak_mb, "hwm_mb": proc_status().get("hwm_mb")}
    stages["after_import_n"] = proc_status()
    count = mem.count()
    mem.close()
    checkpoint(settings.db_path)
    size = db_files_bytes(settings.db_path)
    return {
        "stages": stages,
        "mixed_ops": {"n": ops, "counts": counts, "seconds": ops_s},
        "import": {"n": n, "seconds": import_s, "method": "Memory.remember_many, real embeddings, batches of "
                   f"{params.get('import_batch', 1000)}"},
        "db": {"memories": count, "bytes": size, "bytes_per_memory": size / max(count, 1),
               "mean_text_chars": statistics.fmean(len(gen_text(90_000_000 + i)) for i in range(200)),
               "note": "after Memory.close() and PRAGMA wal_checkpoint(TRUNCATE); file + -wal + -shm"},
    }


def section_ablation(spec: Spec, params: Dict[str, Any], work: Path) -> Dict[str, Any]:
    """One session-option variant of the project embedder: RSS and latency (spec['options'])."""
    reps = int(params.get("ablation_reps", 30))
    before = proc_status()
    emb = make_side_embedder(spec, work)
    t = now_ms()
    emb.load()
    load_ms = now_ms() - t
    after_load = proc_status()
    for k in range(int(params.get("warmup", 3))):
        emb.embed_batch([gen_short(700_000 + k)])
        emb.embed_batch(gen_mixed_batch(700_000 + k))

    def timed(fn: Callable[[int], Any], n: int) -> Dict[str, float]:
        ms = []
        for i in range(n):
            t0 = now_ms()
            fn(i)
            ms.append(now_ms() - t0)
        return summarize(ms)

    short = timed(lambda i: emb.embed_batch([gen_short(i)]), reps)
    long = timed(lambda i: emb.embed_batch([gen_long(i)]), max(2, reps // 2))
    batch = timed(lambda i: emb.embed_batch(gen_mixed_batch(i)), max(2, reps // 5))
    return {"options": spec.get("options") or {}, "load_ms": load_ms, "rss_before_load": before,
            "rss_after_load": after_load, "rss_after": proc_status(), "short": short, "long": long,
            "batch20_ms_per_item": {k: v / 20.0 if k != "n" else v for k, v in batch.items()}}


def section_quality(spec: Spec, params: Dict[str, Any], work: Path) -> Dict[str, Any]:
    """LoCoMo evidence recall (see :mod:`bench.quality`)."""
    from . import quality

    return quality.evaluate_side(spec, params, work)


SECTIONS: Dict[str, Callable[[Spec, Dict[str, Any], Path], Dict[str, Any]]] = {
    "embedding": section_embedding,
    "store": section_store,
    "stress": section_stress,
    "rss": section_rss,
    "ablation": section_ablation,
    "quality": section_quality,
}


def _jsonable(obj: Any) -> Any:
    """``obj`` with numpy scalars / paths / dataclasses turned into plain JSON values."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


# ------------------------------------------------------------------------------------------------
# worker processes
# ------------------------------------------------------------------------------------------------
def child_env() -> Dict[str, str]:
    """Environment for bench children: the repository on sys.path, MEMENTO_* variables removed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMENTO_")}
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_worker(section: str, spec: Spec, params: Dict[str, Any], timeout: float,
               log: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Run one section in a fresh interpreter; its dict, or {"error": ...} on crash or timeout."""
    with tempfile.TemporaryDirectory(prefix="memento-bench-") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "bench.engine", section, "--spec", json.dumps(spec),
               "--params", json.dumps(params), "--result", str(result), "--work", tmp]
        t = now_ms()
        try:
            proc = subprocess.run(cmd, cwd=str(REPO_ROOT), env=child_env(), capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            return {"error": f"timed out after {timeout:.0f} s", "stderr": _tail(exc.stderr)}
        wall = (now_ms() - t) / 1000.0
        if result.exists():
            data = json.loads(result.read_text(encoding="utf-8"))
            data.setdefault("wall_s", wall)
            return data
        return {"error": f"worker exited with {proc.returncode} and no result", "stderr": _tail(proc.stderr),
                "wall_s": wall}


def _tail(text: Any, n: int = 3000) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return (text or "")[-n:]


def worker_main(argv: Optional[List[str]] = None) -> int:
    """Entry point of a worker process: run one section, write its JSON result."""
    ap = argparse.ArgumentParser(prog="python -m bench.engine")
    ap.add_argument("section", choices=sorted(SECTIONS))
    ap.add_argument("--spec", required=True)
    ap.add_argument("--params", default="{}")
    ap.add_argument("--result", required=True)
    ap.add_argument("--work", required=True)
    args = ap.parse_args(argv)
    spec = json.loads(args.spec)
    params = json.loads(args.params)
    work = Path(args.work)
    t = now_ms()
    try:
        data = SECTIONS[args.section](spec, params, work)
    except Exception as exc:
        data = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
    data["section_s"] = (now_ms() - t) / 1000.0
    data["final_rss"] = proc_status()
    Path(args.result).write_text(json.dumps(_jsonable(data), indent=1), encoding="utf-8")
    return 0


# ------------------------------------------------------------------------------------------------
# cold start: new process -> first embedding, timed by the parent from spawn
# ------------------------------------------------------------------------------------------------
_COLD_CHILD = """
import sys, time, json
t0 = time.perf_counter()
from memento_edge.config import Settings
from memento_edge import embedder as E
t1 = time.perf_counter()
spec = json.loads(sys.argv[1])
settings = Settings.load(env={}, home=spec["home"], model_dir=spec["model_dir"])
if spec.get("fake"):
    emb = E.FakeEmbedder()
elif spec["side"] == "baseline":
    opts = E.EmbedderOptions.seed_style(model_file="fp32/model.onnx", verify="fast")
    emb = E.OnnxEmbedder(settings, opts, cache=E.LRUCache(0, 0))
else:
    emb = E.make_embedder(settings)
v = emb.embed("The quick brown fox jumps over the lazy dog near the river bank.")
t2 = time.perf_counter()
sys.stdout.write(json.dumps({"dim": int(v.shape[0]), "import_ms": (t1 - t0) * 1e3,
                             "load_and_embed_ms": (t2 - t1) * 1e3,
                             "backend": getattr(emb, "backend", "?")}) + "\\n")
sys.stdout.flush()
"""


def measure_cold_start(spec: Spec, runs: int, timeout: float = 300.0) -> Dict[str, Any]:
    """Median wall time from ``Popen`` to the first vector printed by a fresh interpreter."""
    if spec["side"] == "baseline":
        reason = baseline_unavailable_reason(spec)
        if reason:
            return {"skipped": reason}
    code = _COLD_CHILD
    walls: List[float] = []
    details: List[Any] = []
    with tempfile.TemporaryDirectory(prefix="memento-cold-") as home:
        arg = json.dumps({**spec, "home": home})
        for _ in range(runs):
            t = now_ms()
            proc = subprocess.Popen([sys.executable, "-c", code, arg], cwd=str(REPO_ROOT), env=child_env(),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                line = proc.stdout.readline() if proc.stdout else ""
                wall = now_ms() - t
                _, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                return {"error": "cold start child timed out"}
            if not line.strip():
                return {"error": f"cold start child failed ({proc.returncode})", "stderr": _tail(err)}
            walls.append(wall)
            details.append(json.loads(line))
    return {"runs_ms": walls, "median_ms": statistics.median(walls), "children": details}


def platform_info() -> Dict[str, Any]:
    """Machine description for the report: CPU model, cores, Python, library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: Dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "numpy": np.__version__,
    }
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            info["mem_total_mb"] = int(fh.readline().split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    for mod in ("onnxruntime", "sqlite_vec", "tokenizers"):
        if module_available(mod):
            try:
                m = __import__(mod)
                info[mod] = getattr(m, "__version__", "installed")
            except Exception as exc:  # a broken wheel is worth reporting, not crashing on
                info[mod] = f"import failed: {exc}"
        else:
            info[mod] = "not installed"
    try:
        import memento_edge

        info["memento_edge"] = memento_edge.__version__
    except Exception:
        pass
    return info


if __name__ == "__main__":
    sys.exit(worker_main())
