"""The orchestrator's behaviour with the FakeEmbedder (fast): validation, edge cases, filters, CRUD."""
from __future__ import annotations

import io
import json

import pytest

from memento_edge.errors import InvalidInput, NotFound, StoreError
from memento_edge.memory import MAX_TEXT_CHARS, Memory

HOSTILE = [
    "Robert'); DROP TABLE memories;--",
    "<script>alert('xss')</script>",
    "NUL\x00inside",
    'quotes " and \' and `backticks`',
    "fts5 syntax: NEAR(a b) OR * AND ^col:",
]
UNICODE = ["漢字のメモ", "مرحبا بالعالم", "emoji 🎉🧠", "zero\u200bwidth\u200djoiner", "naïve café"]


@pytest.mark.parametrize("text", HOSTILE + UNICODE)
def test_hostile_and_unicode_text_round_trips(fake_memory, text):
    r = fake_memory.remember(text)
    assert fake_memory.get(r.id).text == text
    assert fake_memory.recall(text, mode="vector").hits[0].id == r.id
    assert fake_memory.count() == 1


def test_keyword_search_treats_fts_syntax_as_words(fake_memory):
    fake_memory.remember("NEAR the river")
    fake_memory.remember("plain words")
    res = fake_memory.recall('NEAR(" OR *', mode="keyword")
    assert [h.text for h in res.hits] == ["NEAR the river"]


@pytest.mark.parametrize("kwargs,field", [
    ({"text": ""}, "text"),
    ({"text": "   "}, "text"),
    ({"text": "x" * (MAX_TEXT_CHARS + 1)}, "text"),
    ({"text": "ok", "importance": 1.5}, "importance"),
    ({"text": "ok", "importance": -0.1}, "importance"),
    ({"text": "ok", "importance": float("nan")}, "importance"),
    ({"text": "ok", "tags": [f"t{i}" for i in range(51)]}, "tags"),
    ({"text": "ok", "tags": "not-a-list"}, "tags"),
    ({"text": "ok", "tags": [""]}, "tags"),
    ({"text": "ok", "metadata": ["not", "an", "object"]}, "metadata"),
    ({"text": "lone \ud800 surrogate"}, "text"),
])
def test_invalid_memories_are_refused_naming_the_field(fake_memory, kwargs, field):
    text = kwargs.pop("text")
    with pytest.raises(InvalidInput) as err:
        fake_memory.remember(text, **kwargs)
    assert err.value.field == field
    assert fake_memory.count() == 0


def test_limits_accept_the_boundary(fake_memory):
    fake_memory.remember("x" * MAX_TEXT_CHARS, tags=[f"t{i}" for i in range(50)], importance=1.0)
    fake_memory.remember("y", importance=0.0)
    assert fake_memory.count() == 2


@pytest.mark.parametrize("kwargs,field", [
    ({"query": ""}, "query"),
    ({"query": "q" * 1001}, "query"),
    ({"query": "ok", "topk": 0}, "topk"),
    ({"query": "ok", "topk": 101}, "topk"),
    ({"query": "ok", "topk": True}, "topk"),
    ({"query": "ok", "mode": "magic"}, "mode"),
    ({"query": "ok", "filters": {"colection": "typo"}}, "filters.colection"),
    ({"query": "ok", "filters": {"min_importance": 2}}, "filters.min_importance"),
    ({"query": "ok", "filters": {"since": "yesterday"}}, "filters.since"),
    ({"query": "ok", "filters": {"metadata": {'a"b': 1}}}, 'filters.metadata.a"b'),
    ({"query": "ok", "filters": "collection=x"}, "filters"),
])
def test_invalid_recalls_are_refused_naming_the_field(fake_memory, kwargs, field):
    query = kwargs.pop("query")
    with pytest.raises(InvalidInput) as err:
        fake_memory.recall(query, **kwargs)
    assert err.value.field == field


def test_exact_duplicate_returns_existing_id(fake_memory):
    a = fake_memory.remember("same text", collection="c1")
    b = fake_memory.remember("same text", collection="c1")
    c = fake_memory.remember("same text", collection="c2")
    assert a.created and not b.created and b.id == a.id and b.duplicate_of == a.id
    assert c.created and c.id != a.id


def test_near_duplicate_threshold(settings):
    from memento_edge.embedder import FakeEmbedder

    with Memory(settings.replace(dedupe_threshold=0.9), embedder=FakeEmbedder()) as mem:
        a = mem.remember("the quick brown fox jumps")
        b = mem.remember("The quick brown fox jumps!")  # same words -> same fake vector
        c = mem.remember("something else entirely")
    assert not b.created and b.duplicate_of == a.id
    assert c.created


def test_long_texts_are_written_in_smaller_mini_batches(fake_memory):
    """The governor's pace (the progress callback) runs after every WRITE_BATCH_TOKENS of embedding, so it can
    stop a batch of long texts after 16 of them, not only after 64."""
    seen = []
    fake_memory.remember_many(({"text": f"{n} " + "long " * 400} for n in range(40)),
                              progress=lambda done, total: seen.append((done, total)))
    assert seen == [(16, 40), (32, 40), (40, 40)]
    seen.clear()
    fake_memory.remember_many(({"text": f"short {n}"} for n in range(100)),
                              progress=lambda done, total: seen.append((done, total)))
    assert seen == [(64, 100), (100, 100)]
    assert fake_memory.count() == 140


def test_delete_missing_id_is_not_found(fake_memory):
    with pytest.raises(NotFound):
        fake_memory.delete(12345)
    with pytest.raises(NotFound):
        fake_memory.get(12345)
    with pytest.raises(NotFound):
        fake_memory.update(12345, text="x")


def test_delete_removes_vector_and_words(fake_memory):
    r = fake_memory.remember("unique zebra memory")
    fake_memory.remember("another one")
    fake_memory.delete(r.id)
    assert fake_memory.store.get_vector(r.id) is None
    assert fake_memory.recall("zebra", mode="keyword").hits == []
    assert all(h.id != r.id for h in fake_memory.recall("unique zebra memory", mode="vector").hits)
    assert fake_memory.check()["ok"]


def test_ids_are_never_reused(fake_memory):
    a = fake_memory.remember("first")
    fake_memory.delete(a.id)
    b = fake_memory.remember("second")
    assert b.id > a.id


def test_update_reembeds_and_replaces_tags(fake_memory):
    r = fake_memory.remember("old words here", tags=["a"])
    rec = fake_memory.update(r.id, text="completely different sentence", tags=["b", "c"], importance=0.9,
                             metadata={"k": "v"})
    assert rec.text == "completely different sentence" and rec.tags == ["b", "c"] and rec.importance == 0.9
    assert fake_memory.recall("completely different sentence", mode="vector").hits[0].id == r.id
    assert fake_memory.recall("old", mode="keyword").hits == []
    with pytest.raises(InvalidInput):
        fake_memory.update(r.id)


def test_empty_store(fake_memory):
    for mode in ("hybrid", "vector", "keyword"):
        assert fake_memory.recall("anything", mode=mode).hits == []
    assert fake_memory.recent().items == []
    assert fake_memory.stats()["memories"] == 0
    assert fake_memory.check()["ok"]


def test_nested_directories_are_created(tmp_path):
    from memento_edge.config import Settings
    from memento_edge.embedder import FakeEmbedder

    db = tmp_path / "a" / "b" / "c" / "m.db"
    with Memory(Settings.load(env={"MEMENTO_DB": str(db)}), embedder=FakeEmbedder()) as mem:
        mem.remember("hello")
    assert db.exists()


@pytest.mark.parametrize("content", [b"this is not a database at all" * 100, b"\x00" * 4096])
def test_corrupt_db_file_gives_clear_error_and_is_untouched(tmp_path, content):
    from memento_edge.config import Settings
    from memento_edge.embedder import FakeEmbedder

    db = tmp_path / "bad.db"
    db.write_bytes(content)
    with pytest.raises(StoreError) as err:
        Memory(Settings.load(env={"MEMENTO_DB": str(db)}), embedder=FakeEmbedder())
    assert "untouched" in str(err.value)
    assert db.read_bytes() == content
    assert not (tmp_path / "bad.db-wal").exists()


def test_foreign_sqlite_database_is_refused(tmp_path):
    import sqlite3

    from memento_edge.config import Settings
    from memento_edge.embedder import FakeEmbedder

    db = tmp_path / "other.db"
    con = sqlite3.connect(db)
    con.execute("create table users(id)")
    con.commit()
    con.close()
    before = db.read_bytes()
    with pytest.raises(StoreError):
        Memory(Settings.load(env={"MEMENTO_DB": str(db)}), embedder=FakeEmbedder())
    assert db.read_bytes() == before


def _seed_filtered(mem):
    # 300 "noise" memories very similar to the query, and a few matching the filter that are less similar:
    # a search that takes k first and filters afterwards (the seed's bug) comes back short.
    mem.remember_many([{"text": f"apple banana cherry {i}", "collection": "noise", "importance": 0.1}
                       for i in range(300)])
    ids = [mem.remember(f"apple note number {i}", collection="target", tags=["x", f"t{i % 2}"],
                        source="s1" if i < 4 else "s2", importance=i / 10, metadata={"n": i, "even": i % 2 == 0}).id
           for i in range(8)]
    return ids


@pytest.mark.parametrize("mode", ["vector", "keyword", "hybrid"])
def test_filters_return_a_full_topk(fake_memory, mode):
    ids = _seed_filtered(fake_memory)
    res = fake_memory.recall("apple banana cherry", topk=5, mode=mode, filters={"collection": "target"})
    assert len(res.hits) == 5
    assert {h.id for h in res.hits} <= set(ids)


@pytest.mark.parametrize("flt,expected", [
    ({"collection": "target"}, set(range(8))),
    ({"tags_any": ["t0"]}, {0, 2, 4, 6}),
    ({"tags_all": ["x", "t1"]}, {1, 3, 5, 7}),
    ({"source": "s1"}, {0, 1, 2, 3}),
    ({"min_importance": 0.5}, {5, 6, 7}),
    ({"metadata": {"n": 3}}, {3}),
    ({"metadata": {"even": True}}, {0, 2, 4, 6}),
    ({"collection": "target", "tags_any": ["t1"], "min_importance": 0.3}, {3, 5, 7}),
])
def test_each_filter_selects_exactly_its_matches(fake_memory, flt, expected):
    ids = _seed_filtered(fake_memory)
    for mode in ("vector", "keyword", "hybrid"):
        res = fake_memory.recall("apple note", topk=20, mode=mode, filters=flt)
        assert {h.id for h in res.hits} == {ids[i] for i in expected}, mode
    assert fake_memory.count(flt) == len(expected)


def test_since_until_filters(fake_memory):
    old = fake_memory.remember_many([{"text": "old memory", "created_at": "2020-01-01T00:00:00Z"}])[0].id
    new = fake_memory.remember("new memory").id
    assert [h.id for h in fake_memory.recall("memory", filters={"until": "2021-01-01"}).hits] == [old]
    assert [h.id for h in fake_memory.recall("memory", filters={"since": "2021-01-01T00:00:00Z"}).hits] == [new]


def test_recent_paginates_newest_first(fake_memory):
    ids = [fake_memory.remember(f"m{i}").id for i in range(7)]
    page1 = fake_memory.recent(limit=3)
    page2 = fake_memory.recent(limit=3, cursor=page1.next_cursor)
    page3 = fake_memory.recent(limit=3, cursor=page2.next_cursor)
    got = [r.id for p in (page1, page2, page3) for r in p.items]
    assert got == ids[::-1] and page3.next_cursor is None
    with pytest.raises(InvalidInput):
        fake_memory.recent(cursor="garbage")


def test_export_import_round_trip(fake_memory, settings, tmp_path):
    from memento_edge.embedder import FakeEmbedder

    fake_memory.remember("alpha", tags=["a"], metadata={"k": 1}, importance=0.7, source="src")
    fake_memory.remember("beta \x00 NUL", collection="c")
    buf = io.StringIO()
    assert fake_memory.export_jsonl(buf) == 2
    lines = buf.getvalue().splitlines()
    other = settings.replace(db=str(tmp_path / "other.db"))
    seen = []
    with Memory(other, embedder=FakeEmbedder()) as mem2:
        res = mem2.import_jsonl(lines + ["{not json", '{"text": ""}', "[1]"], progress=lambda d, t: seen.append(d))
        assert res.imported == 2 and res.error_count == 3
        assert [e[0] for e in res.errors] == [3, 4, 5]
        again = mem2.import_jsonl(lines)
        assert again.duplicates == 2 and again.imported == 0
        exported = [json.loads(x) for x in mem2.iter_export()]
    assert seen
    orig = [json.loads(x) for x in lines]
    for a, b in zip(orig, exported):
        for key in ("text", "collection", "tags", "source", "importance", "metadata", "created_at"):
            assert a[key] == b[key]


def test_backup_restore_verified(fake_memory, settings, tmp_path):
    fake_memory.remember("kept in backup")
    dest = fake_memory.backup(tmp_path / "bk" / "b.db")
    fake_memory.remember("written after backup")
    fake_memory.close()
    Memory.restore(dest, settings)
    from memento_edge.embedder import FakeEmbedder

    with Memory(settings, embedder=FakeEmbedder()) as mem:
        assert [r.text for r in mem.recent().items] == ["kept in backup"]
        assert mem.check()["ok"]
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"garbage" * 100)
    with pytest.raises(StoreError):
        Memory.restore(bad, settings)


def test_keyword_recall_works_without_model(settings):
    """A missing model degrades recall to keyword mode (and says so); writes fail clearly."""
    from memento_edge.embedder import FakeEmbedder
    from memento_edge.errors import ModelUnavailable

    with Memory(settings, embedder=FakeEmbedder()) as mem:
        mem.remember("grocery list for the weekend")

    missing = settings.replace(model_dir=str(settings.home_path / "no-model-here"))
    with Memory(missing) as mem:
        res = mem.recall("grocery weekend")
        assert res.mode == "keyword" and "memento-edge model build" in res.note
        assert [h.text for h in res.hits] == ["grocery list for the weekend"]
        assert mem.stats()["model_state"] == "missing"
        with pytest.raises(ModelUnavailable):
            mem.remember("new one")


def test_model_fingerprint_mismatch_needs_reindex(settings):
    from memento_edge.embedder import FakeEmbedder
    from memento_edge.errors import ModelMismatch

    class OtherModel(FakeEmbedder):
        @property
        def fingerprint(self):
            return "another-model"

    with Memory(settings, embedder=FakeEmbedder()) as mem:
        mem.remember("apples and pears")
    with Memory(settings, embedder=OtherModel()) as mem:
        with pytest.raises(ModelMismatch):
            mem.remember("x")
        res = mem.recall("apples")
        assert res.mode == "keyword" and "reindex" in res.note
        assert mem.reindex() == 1
        assert mem.recall("apples", mode="vector").mode == "vector"
        mem.remember("now allowed")


def test_recall_many(fake_memory):
    fake_memory.remember("one fish")
    out = fake_memory.recall_many([{"query": "fish"}, {"query": "fish", "mode": "keyword", "topk": 1}])
    assert [len(r.hits) for r in out] == [1, 1]
    with pytest.raises(InvalidInput):
        fake_memory.recall_many([{"query": "x", "bogus": 1}])


@pytest.mark.parametrize("call,field", [
    (lambda m: m.remember_many([{"text": "x", "created_at": 1e300}]), "created_at"),
    (lambda m: m.remember_many([{"text": "x", "created_at": -5}]), "created_at"),
    (lambda m: m.recall("x", filters={"since": 1e300}), "filters.since"),
    (lambda m: m.recent(cursor="9" * 30), "cursor"),
    (lambda m: m.recall("x", filters={"metadata": {"n": 10**30}}), "filters.metadata.n"),
])
def test_out_of_range_numbers_are_invalid_input_not_crashes(fake_memory, call, field):
    """Found by schemathesis: values SQLite or datetime cannot hold must be refused up front."""
    with pytest.raises(InvalidInput) as err:
        call(fake_memory)
    assert err.value.field == field


def test_fusion_normalises_each_side_and_keeps_score_gaps():
    from memento_edge.memory import _fuse

    vec = [(1, 0.90), (2, 0.89), (3, 0.30)]
    kw = [(3, 12.0), (2, 11.0), (9, 1.0)]
    fused = dict(_fuse(vec, kw))
    # 2 is near the top of both lists; 1 only of the vector one; 9 is weak on one side only.
    assert max(fused, key=fused.get) == 2
    assert fused[9] == 0.0 and set(fused) == {1, 2, 3, 9}
    assert all(0.0 <= v <= 1.0 for v in fused.values())
    assert _fuse([], []) == []
