"""Background embedding (backlog.py): writes answer before the model runs; the worker pays the debt."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Iterator, List, Sequence

import numpy as np
import pytest

from memento_edge.config import Settings
from memento_edge.embedder import FakeEmbedder
from memento_edge.errors import ModelUnavailable, NotFound
from memento_edge.memory import Memory

REPO = Path(__file__).resolve().parent.parent


class RecordingEmbedder(FakeEmbedder):
    """FakeEmbedder that records the texts it embeds and can fail on chosen ones."""

    def __init__(self, fail_on: Sequence[str] = ()) -> None:
        super().__init__()
        self.seen: List[str] = []
        self.fail_on = set(fail_on)

    def embed_batch(self, texts: Sequence[str]) -> np.ndarray:
        for t in texts:
            if t in self.fail_on:
                raise ValueError(f"cannot embed {t!r}")
        self.seen.extend(texts)
        self.cache.clear()  # every call really "runs the model", so the record is complete
        return super().embed_batch(texts)


def _bg(settings: Settings, embedder=None, **changes) -> Memory:
    return Memory(settings.replace(embed_mode="background", **changes), embedder=embedder or RecordingEmbedder())


@pytest.fixture
def bg(settings) -> Iterator[Memory]:
    with _bg(settings) as mem:
        yield mem


def _ids(result) -> List[int]:
    return [h.id for h in result.hits]


def test_remember_answers_pending_and_keyword_finds_it_at_once(bg) -> None:
    r = bg.remember("the boiler pressure gauge reads two bar")
    assert r.created and r.embedding == "pending"
    assert bg.embedder.seen == []  # the write did not touch the model
    assert _ids(bg.recall("boiler pressure", mode="keyword")) == [r.id]
    assert _ids(bg.recall("boiler pressure", mode="vector")) == []
    assert bg.backlog_state()["pending"] == 1


def test_vector_and_hybrid_find_it_once_embedded(bg) -> None:
    r = bg.remember("the boiler pressure gauge reads two bar")
    assert bg.embed_pending() == 1
    assert _ids(bg.recall("boiler pressure gauge", mode="vector")) == [r.id]
    hit = bg.recall("boiler pressure gauge", mode="hybrid").hits[0]
    assert hit.id == r.id and hit.vector_rank == 1
    state = bg.backlog_state()
    assert state["pending"] == 0 and state["eta_s"] == 0.0 and state["drain_per_min"] > 0
    assert bg.check()["ok"]


def test_backlog_is_embedded_in_write_order_in_small_batches(bg) -> None:
    texts = [f"note number {i} about topic {i}" for i in range(11)]
    bg.remember_many([{"text": t} for t in texts])
    assert bg.embed_pending(limit=4) == 4
    assert bg.embedder.seen == texts[:4]
    while bg.embed_pending(limit=4):
        pass
    assert bg.embedder.seen == texts


def test_backlog_survives_a_restart(settings) -> None:
    with _bg(settings) as mem:
        ids = [mem.remember(f"restart note {i}").id for i in range(3)]
    with _bg(settings) as mem:
        assert mem.backlog_state()["pending"] == 3
        assert mem.embed_pending() == 3
        assert all(mem.store.get_vector(i) is not None for i in ids)


def test_exact_duplicate_of_a_pending_memory_is_found_at_write_time(bg) -> None:
    first = bg.remember("water the tomatoes")
    again = bg.remember("water the tomatoes")
    assert (again.id, again.created, again.duplicate_of, again.embedding) == (first.id, False, first.id, "pending")
    assert bg.backlog_state()["pending"] == 1
    bg.embed_pending()
    assert bg.remember("water the tomatoes").embedding == "done"


def test_near_duplicate_is_merged_at_embed_time(settings) -> None:
    with _bg(settings, dedupe_threshold=0.95) as mem:
        kept = mem.remember("The cat sat on the mat.")
        mem.embed_pending()
        dup = mem.remember("the cat sat on the mat")  # other text, same words: the fake's cosine is 1.0
        assert dup.created and dup.embedding == "pending"
        assert set(_ids(mem.recall("cat mat", mode="keyword"))) == {kept.id, dup.id}
        assert mem.embed_pending() == 1
        with pytest.raises(NotFound, match=f"merged into memory {kept.id}"):
            mem.get(dup.id)
        assert _ids(mem.recall("cat mat", mode="keyword")) == [kept.id]
        assert mem.check()["ok"]


def test_near_duplicates_within_one_batch_merge_into_the_earlier(settings) -> None:
    with _bg(settings, dedupe_threshold=0.95) as mem:
        a = mem.remember("Feed the fish at noon")
        b = mem.remember("feed the fish at noon!")
        c = mem.remember("an unrelated memory")
        assert mem.embed_pending() == 3
        assert mem.store.merged_into(b.id) == a.id
        assert {m.id for m in mem.recent().items} == {a.id, c.id}


def test_update_of_pending_text_requeues_and_discards_the_stale_embedding(bg) -> None:
    first = bg.remember("draft text one")
    other = bg.remember("second memory")
    updated = False

    def pause() -> None:  # runs before each text: update `first` while its old text is in flight
        nonlocal updated
        if bg.embedder.seen == ["draft text one"] and not updated:
            updated = True
            bg.update(first.id, text="final text one")

    assert bg.embed_pending(pause=pause) == 1  # `other`; the old text's vector was thrown away
    assert bg.store.get_vector(first.id) is None
    assert bg.store.pending_ids([first.id, other.id]) == {first.id}
    assert _ids(bg.recall("final", mode="keyword")) == [first.id]
    assert bg.embed_pending() == 1
    assert bg.embedder.seen == ["draft text one", "second memory", "final text one"]
    assert np.allclose(bg.store.get_vector(first.id), FakeEmbedder.vector("final text one"))


def test_update_of_embedded_text_drops_the_vector_until_reembedded(bg) -> None:
    r = bg.remember("old words here")
    bg.embed_pending()
    bg.update(r.id, text="new phrasing entirely")
    assert bg.store.get_vector(r.id) is None
    assert _ids(bg.recall("old words here", mode="vector")) == []
    bg.update(r.id, tags=["x"])  # other fields leave the queue alone
    assert bg.backlog_state()["pending"] == 1
    bg.embed_pending()
    assert _ids(bg.recall("new phrasing entirely", mode="vector")) == [r.id]


def test_inline_text_update_takes_a_pending_memory_off_the_backlog(settings) -> None:
    with _bg(settings) as mem:
        r = mem.remember("queued while in background mode")
    with Memory(settings.replace(embed_mode="inline"), embedder=RecordingEmbedder()) as mem:
        mem.update(r.id, text="embedded inline now")
        assert mem.backlog_state()["pending"] == 0
        assert _ids(mem.recall("embedded inline now", mode="vector")) == [r.id]


def test_delete_of_a_pending_memory_drops_its_debt(bg) -> None:
    r = bg.remember("to be deleted")
    bg.delete(r.id)
    assert bg.backlog_state()["pending"] == 0
    assert bg.embed_pending() == 0


def test_a_text_that_keeps_failing_is_skipped_not_retried_forever(settings) -> None:
    with _bg(settings, embedder=RecordingEmbedder(fail_on=["poison"])) as mem:
        mem.remember("poison")
        ok = mem.remember("fine text")
        for _ in range(3):
            mem.embed_pending()
        state = mem.backlog_state()
        assert (state["pending"], state["failed"]) == (1, 1)
        assert mem.store.get_vector(ok.id) is not None
        assert mem.embed_pending() == 0


def test_model_missing_leaves_the_backlog_untouched(settings) -> None:
    with _bg(settings, embedder=FakeEmbedder(fail_with=ModelUnavailable("no model"))) as mem:
        mem.remember("waits for the model")
        with pytest.raises(ModelUnavailable):
            mem.embed_pending()
        state = mem.backlog_state()
        assert (state["pending"], state["failed"]) == (1, 0)


def test_worker_thread_drains_the_backlog(bg) -> None:
    worker = bg.start_embed_worker()
    ids = [bg.remember(f"worker note {i}").id for i in range(5)]
    done = threading.Event()

    def watch() -> None:
        while bg.backlog_state()["pending"]:
            worker.wake()
            threading.Event().wait(0.02)
        done.set()

    threading.Thread(target=watch, daemon=True).start()
    assert done.wait(30)
    assert all(bg.store.get_vector(i) is not None for i in ids)
    assert bg.backlog_state()["worker"]["embedded"] == 5


def test_worker_waits_while_a_query_holds_the_model(bg) -> None:
    bg.remember("parked until the query is done")
    worker = bg.start_embed_worker()
    with bg.query_first.foreground():
        worker.wake()
        threading.Event().wait(0.3)
        assert bg.embedder.seen == []
    assert _drained(bg, 30)


def _drained(bg, timeout: float) -> bool:
    """True once the backlog has no pending memories, polled from a side thread, within ``timeout`` s."""
    done = threading.Event()

    def watch() -> None:
        while bg.backlog_state()["pending"]:
            threading.Event().wait(0.02)
        done.set()

    threading.Thread(target=watch, daemon=True).start()
    return done.wait(timeout)


def test_worker_waits_while_memory_is_critically_high(bg) -> None:
    allowed = threading.Event()
    bg.remember("embedded once the governor allows it")
    worker = bg.start_embed_worker(may_embed=allowed.is_set)
    worker.wake()
    threading.Event().wait(0.3)
    assert bg.embedder.seen == [] and worker.describe()["state"] == "waiting"
    assert "memory is critically high" in worker.describe()["last_error"]
    allowed.set()
    assert _drained(bg, 30)


def test_embed_mode_auto_is_background_only_on_armv6(monkeypatch) -> None:
    import platform

    monkeypatch.setattr(platform, "machine", lambda: "armv6l")
    assert Settings(embed_mode="auto").embed_background
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert not Settings(embed_mode="auto").embed_background
    assert Settings(embed_mode="background").embed_background


_CHILD = textwrap.dedent("""
    import sys, time
    from memento_edge.config import Settings
    from memento_edge.embedder import FakeEmbedder
    from memento_edge.memory import Memory

    class Slow(FakeEmbedder):
        def embed_batch(self, texts):
            time.sleep(0.05)
            return super().embed_batch(texts)

    mem = Memory(Settings.load(db=sys.argv[1], embed_mode="background"), embedder=Slow())
    mem.start_embed_worker()
    for i in range(int(sys.argv[2])):
        r = mem.remember(f"memory number {i} written before the kill")
        print(r.id, flush=True)  # acknowledged
    time.sleep(600)
""")


def test_kill_9_mid_backlog_loses_nothing(tmp_path) -> None:
    db = tmp_path / "kill.db"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(db), "40"], stdout=subprocess.PIPE, text=True,
                             env=env)
    assert child.stdout is not None
    acked = [int(child.stdout.readline()) for _ in range(40)]
    # Wait until the worker is part-way through: some vectors written, some still owed.
    settings = Settings.load(db=str(db), embed_mode="background")
    with Memory(settings, embedder=FakeEmbedder()) as probe:
        for _ in range(2000):
            if probe.backlog_state()["pending"] < 40:
                break
            threading.Event().wait(0.01)
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        state = probe.backlog_state()
        assert 0 < state["pending"] < 40
        assert {m.id for m in probe.recent(limit=100).items} == set(acked)
        while probe.embed_pending():
            pass
        assert all(probe.store.get_vector(i) is not None for i in acked)
        assert probe.check()["ok"]


def test_cli_shows_pending_backlog_and_drains_it(monkeypatch) -> None:
    import json

    from click.testing import CliRunner

    from memento_edge import embedder
    from memento_edge.cli import main

    monkeypatch.setattr(embedder, "make_embedder", lambda settings, *a, **k: FakeEmbedder())
    monkeypatch.setenv("MEMENTO_EMBED_MODE", "background")
    runner = CliRunner()
    r = runner.invoke(main, ["--no-json", "remember", "a note the CLI leaves for the worker"])
    assert r.exit_code == 0 and "(embedding pending)" in r.output, r.output
    state = json.loads(runner.invoke(main, ["--json", "backlog"]).output)
    assert (state["mode"], state["pending"]) == ("background", 1)
    assert "1 pending" in runner.invoke(main, ["--no-json", "stats"]).output
    state = json.loads(runner.invoke(main, ["--json", "backlog", "--drain"]).stdout)
    assert state["pending"] == 0
    hits = json.loads(runner.invoke(main, ["--json", "recall", "note CLI worker", "-m", "vector"]).output)["hits"]
    assert len(hits) == 1


def test_http_answers_pending_and_readyz_metrics_stats_show_the_backlog(tmp_path) -> None:
    from webfixtures import make_env

    env = make_env(tmp_path, embed_mode="background")
    try:
        resp = env.client.post("/v1/memories", json={"text": "the router admin password is on the fridge"})
        assert resp.status_code == 201 and resp.get_json()["embedding"] == "pending"
        batch = env.client.post("/v1/memories", json={"items": [{"text": "one more"}, {"text": "and another"}]})
        assert [i["embedding"] for i in batch.get_json()["items"]] == ["pending", "pending"]
        hits = env.client.post("/v1/recall", json={"query": "router password", "mode": "keyword"}).get_json()
        assert [h["id"] for h in hits["hits"]] == [resp.get_json()["id"]]
        ready = env.client.get("/readyz").get_json()
        assert ready["ready"] and ready["backlog"]["pending"] == 3 and ready["backlog"]["mode"] == "background"
        assert "memento_embed_backlog 3" in env.client.get("/metrics").get_data(as_text=True)
        assert env.client.get("/v1/stats").get_json()["backlog"]["pending"] == 3
        env.memory.embed_pending()
        assert env.client.get("/readyz").get_json()["backlog"]["pending"] == 0
        metrics = env.client.get("/metrics").get_data(as_text=True)
        assert "memento_embed_backlog 0" in metrics and "memento_embed_backlog_drain_per_minute 3" in metrics
    finally:
        env.close()


def test_records_and_hits_carry_the_embedding_state_on_every_face(tmp_path) -> None:
    from webfixtures import make_env

    env = make_env(tmp_path, embed_mode="background")
    try:
        mid = env.client.post("/v1/memories", json={"text": "the ladder is in the garage"}).get_json()["id"]
        assert env.client.get(f"/v1/memories/{mid}").get_json()["embedding"] == "pending"
        assert env.client.get("/v1/memories").get_json()["items"][0]["embedding"] == "pending"
        hit = env.client.post("/v1/recall", json={"query": "ladder garage", "mode": "keyword"}).get_json()["hits"][0]
        assert hit["embedding"] == "pending"
        env.memory.embed_pending()
        assert env.client.get(f"/v1/memories/{mid}").get_json()["embedding"] == "done"
        hit = env.client.post("/v1/recall", json={"query": "ladder garage", "mode": "hybrid"}).get_json()["hits"][0]
        assert hit["embedding"] == "done" and hit["vector_rank"] == 1
    finally:
        env.close()


def test_export_leaves_the_embedding_state_out_and_import_queues_anew(settings, tmp_path) -> None:
    import io
    import json

    with _bg(settings) as mem:
        mem.remember("the fuse box is behind the coats")
        line = next(iter(mem.iter_export()))
        assert "embedding" not in json.loads(line)
    with _bg(settings.replace(db=str(tmp_path / "copy.db"))) as copy:
        # An export line that does carry the state (hand-made, or from another tool) imports the same way.
        result = copy.import_jsonl(io.StringIO(json.dumps(dict(json.loads(line), embedding="done")) + "\n"))
        assert (result.imported, result.error_count) == (1, 0)
        assert copy.recent().items[0].embedding == "pending" and copy.backlog_state()["pending"] == 1


def test_background_writes_are_not_shed_under_memory_pressure(tmp_path) -> None:
    from webfixtures import make_env

    from memento_edge.governor import Governor
    from memento_edge.web.state import EXT

    for mode, status in (("inline", 503), ("background", 201)):
        env = make_env(tmp_path, embed_mode=mode)
        try:  # RSS twice the limit: the governor is in its hard state
            env.app.extensions[EXT].governor = Governor(100, lambda: None, rss_reader=lambda: 200 << 20)
            resp = env.client.post("/v1/memories", json={"text": "written while memory is short"})
            assert resp.status_code == status, (mode, resp.get_json())
        finally:
            env.close()
