"""The embedder: LRU cache, batching plan, load/unload/timeout machinery, FakeEmbedder.

Most tests drive :class:`OnnxEmbedder` with a tiny in-test fake session and tokenizer (no model
needed); the ``real_model`` ones at the bottom run the same paths on the built int8 model.
"""
from __future__ import annotations

import hashlib
import inspect
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest

from memento_edge.config import Settings
from memento_edge.embedder import (
    DIM,
    Embedder,
    EmbedderOptions,
    FakeEmbedder,
    LRUCache,
    OnnxEmbedder,
    make_embedder,
    plan_batches,
)
from memento_edge.errors import EmbedTimeout, ModelUnavailable

REPO = Path(__file__).resolve().parents[1]


# --- LRU cache ------------------------------------------------------------------------------------

def _vec(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def test_lru_evicts_least_recently_used_by_entries() -> None:
    c = LRUCache(max_entries=3, max_bytes=10**9)
    for i in range(3):
        c.put(f"t{i}", _vec(i))
    assert c.get("t0") is not None          # t0 becomes most recent; t1 is now the oldest
    c.put("t3", _vec(3))
    assert len(c) == 3
    assert "t1" not in c and "t0" in c and "t3" in c
    assert c.stats()["evictions"] == 1


def test_lru_evicts_by_bytes() -> None:
    per_entry = DIM * 4 + 256
    c = LRUCache(max_entries=1000, max_bytes=per_entry * 4)
    for i in range(10):
        c.put(f"t{i}", _vec(i))
    assert len(c) == 4
    assert c.bytes <= c.max_bytes
    assert [f"t{i}" in c for i in range(10)] == [False] * 6 + [True] * 4


def test_lru_counts_hits_and_misses() -> None:
    c = LRUCache(10, 10**6)
    assert c.get("a") is None
    c.put("a", _vec(1))
    assert c.get("a") is not None
    s = c.stats()
    assert (s["hits"], s["misses"], s["hit_rate"]) == (1, 1, 0.5)


def test_lru_returns_copies_callers_cannot_corrupt() -> None:
    c = LRUCache(10, 10**6)
    original = _vec(7)
    c.put("a", original)
    original[:] = 0                          # the caller's array is not the cached one
    got = c.get("a")
    assert got is not None and np.linalg.norm(got) > 0.99
    got[:] = 0                               # nor is the returned one
    again = c.get("a")
    assert again is not None and np.linalg.norm(again) > 0.99


def test_lru_shrink_drops_the_oldest_fraction() -> None:
    c = LRUCache(100, 10**7)
    for i in range(10):
        c.put(f"t{i}", _vec(i))
    assert c.shrink(0.5) == 5
    assert [f"t{i}" in c for i in range(10)] == [False] * 5 + [True] * 5
    c.shrink(1.0)
    assert len(c) == 0 and c.bytes == 0


def test_lru_is_thread_safe() -> None:
    c = LRUCache(50, 10**6)
    errors: List[BaseException] = []

    def work(k: int) -> None:
        try:
            for i in range(500):
                c.put(f"{k}-{i % 80}", _vec(i % 80))
                c.get(f"{(k + 1) % 4}-{i % 80}")
                if i % 100 == 0:
                    c.shrink(0.3)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(c) <= 50
    assert c.bytes == len(c) * (DIM * 4 + 256)


# --- batching plan --------------------------------------------------------------------------------

def test_plan_batches_respects_the_token_budget() -> None:
    lengths = [256] * 32 + [5, 300, 17, 64, 64, 3, 128] * 5
    batches = plan_batches(lengths, 2048)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        longest = max(lengths[i] for i in b)
        assert len(b) == 1 or len(b) * longest <= 2048
    assert max(len(b) for b in batches if max(lengths[i] for i in b) == 256) == 8   # never 32 x 256


def test_plan_batches_budget_zero_runs_each_text_alone() -> None:
    assert all(len(b) == 1 for b in plan_batches([3, 9, 1, 4], 0))


# --- OnnxEmbedder with an in-test fake runtime ----------------------------------------------------

class FakeTokenizer:
    """Whitespace 'tokenizer': [CLS] + one id per word + [SEP], truncated at max_tokens."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens

    class _Enc:
        def __init__(self, ids: List[int]) -> None:
            self.ids = ids

    def encode(self, text: str) -> "FakeTokenizer._Enc":
        words = [1000 + int.from_bytes(hashlib.blake2b(w.encode(), digest_size=2).digest(), "little")
                 for w in text.split()]
        return self._Enc(([101] + words)[: self.max_tokens - 1] + [102])


class FakeSession:
    """Mean of per-token pseudo-vectors over the attention mask, L2-normalised: like the real graph,
    padding must not matter. ``gate`` (an Event) makes run() block until set; run() also honours
    RunOptions.terminate the way onnxruntime does."""

    def __init__(self, gate: Optional[threading.Event] = None) -> None:
        self.gate = gate
        self.active = 0
        self.max_active = 0
        self.calls: List[Tuple[int, int]] = []
        self._lock = threading.Lock()
        self.closed = False

    @staticmethod
    def token_vec(tok: int) -> np.ndarray:
        return np.random.default_rng(tok).standard_normal(DIM)

    def run(self, outputs: Sequence[str], feed: Dict[str, np.ndarray],
            run_options: Any = None) -> List[np.ndarray]:
        assert not self.closed, "run on an unloaded session"
        ids, mask = feed["input_ids"], feed["attention_mask"]
        assert ids.dtype == np.int64 and mask.dtype == np.int64 and ids.shape == mask.shape
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.calls.append(ids.shape)
        try:
            while self.gate is not None and not self.gate.wait(0.01):
                if run_options is not None and run_options.terminate:
                    raise RuntimeError("Exiting due to terminate flag being set to true.")
            out = np.zeros((ids.shape[0], DIM))
            for r in range(ids.shape[0]):
                toks = [int(t) for t, m in zip(ids[r], mask[r]) if m]
                out[r] = np.mean([self.token_vec(t) for t in toks], axis=0)
            out /= np.linalg.norm(out, axis=1, keepdims=True)
            return [out.astype(np.float32)]
        finally:
            with self._lock:
                self.active -= 1


class FakeRuntimeEmbedder(OnnxEmbedder):
    """OnnxEmbedder whose runtime is the fakes above (everything else is the real code)."""

    def __init__(self, settings: Settings, options: Optional[EmbedderOptions] = None,
                 gate: Optional[threading.Event] = None, load_delay: float = 0.0) -> None:
        super().__init__(settings, options)
        self.gate = gate
        self.load_delay = load_delay
        self.sessions: List[FakeSession] = []

    def _create_runtime(self) -> Tuple[Any, Any]:
        if self.load_delay:
            time.sleep(self.load_delay)
        s = FakeSession(self.gate)
        self.sessions.append(s)
        return s, FakeTokenizer(self.settings.max_tokens)

    def _drop_locked(self, reason: str) -> None:
        if self._session is not None:
            self._session.closed = True      # any later run on it would fail the test
        super()._drop_locked(reason)

    @property
    def fingerprint(self) -> str:
        return "fake-runtime"


def _settings(**kw: Any) -> Settings:
    return Settings(model_dir="/nonexistent", **kw)


def _expected(text: str, max_tokens: int = 256) -> np.ndarray:
    ids = FakeTokenizer(max_tokens).encode(text).ids
    v = np.mean([FakeSession.token_vec(t) for t in ids], axis=0)
    return (v / np.linalg.norm(v)).astype(np.float32)


def test_lazy_load_and_idempotent_load() -> None:
    e = FakeRuntimeEmbedder(_settings())
    assert not e.loaded
    e.load()
    e.load()
    assert e.loaded and len(e.sessions) == 1
    e.embed("hello world")
    assert len(e.sessions) == 1 and e.stats()["load_count"] == 1


def test_concurrent_first_calls_load_once() -> None:
    e = FakeRuntimeEmbedder(_settings(), load_delay=0.2)
    threads = [threading.Thread(target=e.embed, args=(f"text {i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(e.sessions) == 1


@pytest.mark.parametrize("batching", ["per_text", "padded"])
def test_mixed_lengths_batch_equals_one_by_one_and_keeps_order(batching: str) -> None:
    texts = ["a", "b c d e f g h", "x " * 400, "", "one two", "b c d e f g h", "z " * 100]
    e = FakeRuntimeEmbedder(_settings(cache_entries=0, batch_token_budget=600),
                            EmbedderOptions.tuned(batching=batching))
    got = e.embed_batch(texts)
    assert got.shape == (len(texts), DIM) and got.dtype == np.float32
    for row, text in zip(got, texts):
        np.testing.assert_allclose(row, _expected(text), atol=1e-6)
    shapes = e.sessions[0].calls
    assert all(n * s <= 600 or n == 1 for n, s in shapes)
    if batching == "per_text":
        assert all(n == 1 for n, _s in shapes)
    else:
        assert any(n > 1 for n, _s in shapes)
    assert max(s for _n, s in shapes) == 256                          # truncated at max_tokens


def test_cache_hits_skip_inference_and_duplicates_run_once() -> None:
    e = FakeRuntimeEmbedder(_settings())
    e.embed_batch(["same", "same", "other"])
    assert e.embed_count == 2
    first = e.embed("same")
    assert e.embed_count == 2
    stats = e.stats()["cache"]
    assert stats["hits"] >= 1 and stats["entries"] == 2
    first[:] = 0                                                       # caller scribbles on its copy
    assert np.linalg.norm(e.embed("same")) > 0.99


def test_shrink_cache() -> None:
    e = FakeRuntimeEmbedder(_settings())
    e.embed_batch([f"t{i}" for i in range(10)])
    e.shrink_cache(0.5)
    assert e.stats()["cache"]["entries"] == 5


def test_unload_then_embed_reloads() -> None:
    e = FakeRuntimeEmbedder(_settings(cache_entries=0))
    e.embed("hello")
    e.unload()
    assert not e.loaded and e.sessions[0].closed
    np.testing.assert_allclose(e.embed("hello"), _expected("hello"), atol=1e-6)
    assert e.loaded and len(e.sessions) == 2
    s = e.stats()
    assert (s["load_count"], s["unload_count"]) == (2, 1)


def test_unload_waits_for_a_run_in_flight() -> None:
    gate = threading.Event()
    e = FakeRuntimeEmbedder(_settings(cache_entries=0), gate=gate)
    e.load()
    result: Dict[str, Any] = {}
    runner = threading.Thread(target=lambda: result.update(v=e.embed("in flight")))
    runner.start()
    while not e.sessions[0].active:
        time.sleep(0.005)
    unloader = threading.Thread(target=e.unload)
    unloader.start()
    unloader.join(0.3)
    assert unloader.is_alive() and e.loaded          # still waiting for the run
    gate.set()
    runner.join(5)
    unloader.join(5)
    assert not unloader.is_alive() and not e.loaded
    np.testing.assert_allclose(result["v"], _expected("in flight"), atol=1e-6)


def test_many_threads_embed_while_another_unloads_and_loads() -> None:
    e = FakeRuntimeEmbedder(_settings(cache_entries=0))
    errors: List[BaseException] = []
    stop = threading.Event()

    def embedder(k: int) -> None:
        try:
            for i in range(40):
                text = f"thread {k} text {i % 7} " + "w " * (i % 13)
                np.testing.assert_allclose(e.embed(text), _expected(text), atol=1e-6)
        except BaseException as exc:
            errors.append(exc)

    def churn() -> None:
        while not stop.is_set():
            e.unload()
            e.load()

    churner = threading.Thread(target=churn)
    churner.start()
    workers = [threading.Thread(target=embedder, args=(k,)) for k in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    churner.join()
    assert not errors, errors[:3]
    assert len(e.sessions) > 1                        # unloads really happened meanwhile


def test_run_timeout_raises_embed_timeout_in_a_worker_thread() -> None:
    gate = threading.Event()                          # never set: the run would hang forever
    e = FakeRuntimeEmbedder(_settings(request_timeout=0.2, cache_entries=0), gate=gate)
    e.load()
    caught: List[BaseException] = []

    def work() -> None:
        try:
            e.embed("stuck")
        except BaseException as exc:
            caught.append(exc)

    t = threading.Thread(target=work)
    t.start()
    t.join(10)
    assert not t.is_alive()
    assert len(caught) == 1 and isinstance(caught[0], EmbedTimeout)
    assert e.stats()["timeouts"] == 1
    gate.set()
    np.testing.assert_allclose(e.embed("fine now"), _expected("fine now"), atol=1e-6)


def test_waiting_for_a_busy_model_times_out() -> None:
    gate = threading.Event()
    e = FakeRuntimeEmbedder(_settings(request_timeout=0.3, cache_entries=0),
                            EmbedderOptions.tuned(max_concurrent_runs=1), gate=gate)
    e.load()
    holder = threading.Thread(target=lambda: pytest.raises(EmbedTimeout, e.embed, "holds the slot"))
    holder.start()
    while not e.sessions[0].active:
        time.sleep(0.005)
    caught: List[BaseException] = []

    def waiter() -> None:
        try:
            e.embed("waits")
        except BaseException as exc:
            caught.append(exc)

    w = threading.Thread(target=waiter)
    w.start()
    w.join(10)
    holder.join(10)
    assert caught and isinstance(caught[0], EmbedTimeout)
    assert e.sessions[0].max_active == 1


def test_idle_unload_and_reload() -> None:
    e = FakeRuntimeEmbedder(_settings(idle_unload_minutes=0.002, cache_entries=0))   # 0.12 s
    e.embed("hello")
    deadline = time.monotonic() + 10
    while e.loaded and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not e.loaded
    np.testing.assert_allclose(e.embed("hello"), _expected("hello"), atol=1e-6)
    assert len(e.sessions) == 2


def test_warmup_loads_in_the_background() -> None:
    e = FakeRuntimeEmbedder(_settings())
    e.start_warmup().join(10)
    assert e.loaded and e.stats()["embed_count"] == 1


def test_load_failure_is_model_unavailable_and_retried() -> None:
    class Flaky(FakeRuntimeEmbedder):
        fail = True

        def _create_runtime(self) -> Tuple[Any, Any]:
            if self.fail:
                raise OSError("disk on fire")
            return super()._create_runtime()

    e = Flaky(_settings())
    with pytest.raises(ModelUnavailable, match="disk on fire"):
        e.embed("x")
    assert e.stats()["last_error"]
    e.fail = False
    assert e.embed("x").shape == (DIM,)


def test_stats_keys() -> None:
    e = FakeRuntimeEmbedder(_settings())
    e.embed("x")
    s = e.stats()
    for key in ("loaded", "backend", "fingerprint", "cache", "embed_count", "load_ms", "last_embed_ms"):
        assert key in s
    assert set(s["cache"]) >= {"entries", "bytes", "hits", "misses", "hit_rate"}
    assert s["backend"] == "onnxruntime" and s["loaded"] is True


def test_options_profiles() -> None:
    assert EmbedderOptions().profile == "tuned"
    seed = EmbedderOptions.named("default")
    assert seed.plain_session and seed.cpu_mem_arena
    with pytest.raises(ValueError):
        EmbedderOptions(graph_optimization="turbo")
    e = OnnxEmbedder(_settings(), seed_style=True)
    assert e.options.profile == "default"


def test_missing_model_dir_says_how_to_build(tmp_path: Path) -> None:
    e = OnnxEmbedder(Settings(model_dir=str(tmp_path / "absent")))
    with pytest.raises(ModelUnavailable, match="memento-edge model build"):
        _ = e.fingerprint
    with pytest.raises(ModelUnavailable, match="memento-edge model build"):
        e.embed("hello")
    assert e.stats()["fingerprint"] is None


def test_make_embedder_picks_onnxruntime() -> None:
    e = make_embedder(_settings())
    assert isinstance(e, OnnxEmbedder)
    # Protocol members, looked up statically (isinstance() on Python < 3.12 would evaluate the
    # fingerprint property, which raises ModelUnavailable for this missing model dir).
    for name in ("dim", "backend", "fingerprint", "loaded", "embed_batch", "embed", "load", "unload",
                 "stats", "shrink_cache"):
        inspect.getattr_static(e, name)


def test_make_embedder_without_any_backend_is_model_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)            # import fails
    monkeypatch.setitem(sys.modules, "memento_edge.fallback", None)
    with pytest.raises(ModelUnavailable, match="no embedding backend"):
        make_embedder(_settings())


# --- FakeEmbedder ---------------------------------------------------------------------------------

def test_fake_embedder_is_deterministic_normalised_and_word_based() -> None:
    f = FakeEmbedder()
    assert isinstance(f, Embedder) and f.fingerprint == "fake-test-embedder" and f.backend == "fake"
    a = f.embed("the cat sat on the mat")
    np.testing.assert_array_equal(a, FakeEmbedder().embed("the cat sat on the mat"))
    assert a.shape == (DIM,) and abs(float(np.linalg.norm(a)) - 1) < 1e-5
    similar = f.embed("a cat on a mat")
    unrelated = f.embed("quarterly revenue projections")
    assert float(a @ similar) > 0.3 and abs(float(a @ unrelated)) < 0.2
    batch = f.embed_batch(["x", "", "y z"])
    assert batch.shape == (3, DIM) and np.allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    f.unload()
    assert not f.loaded
    f.embed("again")
    assert f.loaded


def test_fake_embedder_can_fail() -> None:
    f = FakeEmbedder(fail_with=ModelUnavailable("no model"))
    with pytest.raises(ModelUnavailable):
        f.embed("x")


# --- the same paths on the real model -------------------------------------------------------------

def _real_model_dir() -> Path:
    path = Path(os.environ.get("MEMENTO_TEST_MODEL_DIR") or REPO / "models" / "minilm-int8")
    if not (path / "manifest.json").is_file():
        pytest.fail(f"real model directory {path} missing: run `scripts/build-model` (or set "
                    "MEMENTO_TEST_MODEL_DIR)", pytrace=False)
    return path


@pytest.mark.real_model
def test_real_unload_then_embed_reloads() -> None:
    e = OnnxEmbedder(Settings(model_dir=str(_real_model_dir()), cache_entries=0))
    before = e.embed("The cat sits on the mat.")
    assert e.loaded
    e.unload()
    assert not e.loaded
    after = e.embed("The cat sits on the mat.")
    assert e.loaded and float(before @ after) > 0.9999
    assert e.stats()["load_count"] == 2


@pytest.mark.real_model
def test_real_concurrent_embeds_with_unload_load_churn() -> None:
    model_dir = _real_model_dir()
    texts = [f"Memory number {i}: " + "the quick brown fox " * (i % 9) for i in range(12)]
    reference = OnnxEmbedder(Settings(model_dir=str(model_dir), cache_entries=0)).embed_batch(texts)
    e = OnnxEmbedder(Settings(model_dir=str(model_dir), cache_entries=0))
    errors: List[BaseException] = []
    stop = threading.Event()

    def work(k: int) -> None:
        try:
            for i in range(12):
                j = (k + i) % len(texts)
                assert float(e.embed(texts[j]) @ reference[j]) > 0.9999
        except BaseException as exc:
            errors.append(exc)

    def churn() -> None:
        while not stop.is_set():
            e.unload()
            e.load()
            time.sleep(0.02)

    churner = threading.Thread(target=churn)
    workers = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    churner.start()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    churner.join()
    assert not errors, errors[:3]
    assert e.stats()["unload_count"] >= 1


@pytest.mark.real_model
def test_real_timeout_in_a_worker_thread_then_recovers() -> None:
    e = OnnxEmbedder(Settings(model_dir=str(_real_model_dir()), cache_entries=0, request_timeout=0.0005))
    e.load()
    caught: List[BaseException] = []

    def work() -> None:
        try:
            e.embed_batch(["a long text about memories " * 60])
        except BaseException as exc:
            caught.append(exc)

    t = threading.Thread(target=work)
    t.start()
    t.join(30)
    assert len(caught) == 1 and isinstance(caught[0], EmbedTimeout), caught
    e.settings = e.settings.replace(request_timeout=30.0)
    assert e.embed("still works").shape == (DIM,)


@pytest.mark.real_model
def test_real_fingerprint_without_loading() -> None:
    e = OnnxEmbedder(Settings(model_dir=str(_real_model_dir())))
    fp = e.fingerprint
    assert len(fp) == 64 and not e.loaded


# --- Watchdog (the one timeout thread that replaced a threading.Timer per run) ------------------------------
def test_watchdog_fires_only_undisarmed_deadlines_in_order() -> None:
    from memento_edge.embedder import Watchdog

    wd = Watchdog()
    fired: List[str] = []
    done = threading.Event()
    wd.arm(0.15, lambda: (fired.append("late"), done.set()))
    cancelled = wd.arm(0.05, lambda: fired.append("cancelled"))
    wd.arm(0.08, lambda: fired.append("early"))   # earlier than the sleeper's head: it must re-plan
    wd.disarm(cancelled)
    assert done.wait(5)
    assert fired == ["early", "late"]
    wd.stop()


def test_watchdog_starts_one_thread_and_survives_a_failing_callback() -> None:
    from memento_edge.embedder import Watchdog

    wd = Watchdog(name="wd-under-test")
    ok = threading.Event()

    def boom() -> None:
        raise RuntimeError("callback failure")

    handles = [wd.arm(30, lambda: None) for _ in range(100)]
    assert [t.name for t in threading.enumerate()].count("wd-under-test") == 1
    for h in handles:
        wd.disarm(h)
    wd.arm(0.01, boom)
    wd.arm(0.05, ok.set)
    assert ok.wait(5), "the watchdog died with the failing callback"
    wd.stop()
    assert "wd-under-test" not in [t.name for t in threading.enumerate()]
