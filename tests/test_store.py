"""Store internals: migrations, the two vector backends, the keyword query builder."""
from __future__ import annotations

import contextlib
import sqlite3

import numpy as np
import pytest

from memento_edge import migrations
from memento_edge.store import READER_CACHE_KIB, Store, fts_query, query_terms


def _unit(rng, n, dim=384):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_migrations_apply_in_order_and_can_stop_before(tmp_path):
    con = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    ran = migrations.migrate(con, stop_before="m002_idempotency")
    assert ran == ["m001_initial"]
    assert migrations.applied(con) == ["m001_initial"]
    # every later step, in registration order (stays true as steps are appended)
    assert migrations.migrate(con) == [name for name, _ in migrations.MIGRATIONS[1:]]
    assert migrations.migrate(con) == []
    assert migrations.applied(con)[-1] == migrations.latest()


def test_failed_migration_rolls_back(tmp_path, monkeypatch):
    con = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    migrations.migrate(con, stop_before="m002_idempotency")

    def broken(conn):
        conn.execute("CREATE TABLE half_done (x)")
        raise RuntimeError("boom")

    monkeypatch.setattr(migrations, "MIGRATIONS", [*migrations.MIGRATIONS[:1], ("m002_idempotency", broken)])
    with pytest.raises(RuntimeError):
        migrations.migrate(con)
    assert migrations.applied(con) == ["m001_initial"]
    assert not con.execute("SELECT 1 FROM sqlite_master WHERE name='half_done'").fetchone()


def _fill(store, vecs, texts=None):
    with store.writer() as conn:
        for i, v in enumerate(vecs):
            store.insert(conn, {"text": texts[i] if texts else f"memory {i}", "collection": f"c{i % 3}",
                                "tags": [], "metadata": {}}, v)


def test_numpy_backend_matches_sqlite_vec_on_1k(tmp_path):
    """The armv6 numpy index returns the same ids, in the same order, as sqlite-vec."""
    rng = np.random.default_rng(7)
    vecs = _unit(rng, 1000)
    a = Store(tmp_path / "vec.db", vector_backend="sqlite-vec")
    b = Store(tmp_path / "np.db", vector_backend="numpy")
    _fill(a, vecs)
    _fill(b, vecs)
    assert (a.vector_backend, b.vector_backend) == ("sqlite-vec", "numpy")
    for q in _unit(rng, 25):
        for flt in (None, {"collection": "c1"}):
            ra = a.vector_search(q, 10, flt)
            rb = b.vector_search(q, 10, flt)
            assert [i for i, _ in ra] == [i for i, _ in rb]
            assert np.allclose([s for _, s in ra], [s for _, s in rb], atol=1e-5)
    a.close()
    b.close()


def test_backend_is_fixed_at_creation(tmp_path):
    Store(tmp_path / "x.db", vector_backend="numpy").close()
    s = Store(tmp_path / "x.db", vector_backend="sqlite-vec")
    assert s.vector_backend == "numpy"
    s.close()


def test_filtered_knn_widens_until_full(tmp_path):
    """Filter matching 1% of a store: the widening KNN (not the exact path) must still fill top-k."""
    rng = np.random.default_rng(3)
    vecs = _unit(rng, 3000)
    s = Store(tmp_path / "w.db", vector_backend="sqlite-vec")
    with s.writer() as conn:
        for i, v in enumerate(vecs):
            s.insert(conn, {"text": f"m{i}", "collection": "rare" if i % 100 == 0 else "common",
                            "tags": [], "metadata": {}}, v)
    q = vecs[1]
    got = s.vector_search(q, 10, {"collection": "rare"})
    rare = np.array([i for i in range(3000) if i % 100 == 0])
    expected = rare[np.argsort(-(vecs[rare] @ q))][:10] + 1
    assert [i for i, _ in got] == list(expected)
    s.close()


@pytest.mark.parametrize("text,expected", [
    ("buy food", '"buy" OR "food"'),
    ("what did you do", '"what" OR "did" OR "you" OR "do"'),
    ("When did Caroline go to the LGBTQ support group?", '"caroline" OR "go" OR "lgbtq" OR "support" OR "group"'),
    ('NEAR(" * ^:', '"near"'),
    ("!!!", None),
])
def test_fts_query_is_quoted_and_drops_stopwords(text, expected):
    assert fts_query(text) == expected


@pytest.mark.parametrize("text,expected", [
    # contraction tails are not terms: "s" would match every possessive in the store
    ("what's the internet code for visitors", '"internet" OR "code" OR "visitors"'),
    ("Tom's birthday", '"tom" OR "birthday"'),
    ("we're away, I'll call; you'd say I'm late, they've gone", '"away" OR "call" OR "say" OR "late" OR "gone"'),
    ("the dishwasher won't drain", '"dishwasher" OR "drain"'),  # a negated auxiliary goes with its tail
    ("where\u2019s the spare key", '"spare" OR "key"'),  # typographic apostrophe
    ("what s the t code", '"code"'),  # stray fragments left by another tokenizer
    ("don't", None),
    # identifiers stay whole (searched as phrases), numbers and names are kept
    ("what's at 192.168.1.40", '"192 168 1 40"'),
    ("what is AX-88213?", '"ax 88213"'),
    ("k8s-worker-3 out of disk", '"k8s worker 3" OR "disk"'),
    ("standup at 10:15 with Omar", '"standup" OR "10 15" OR "omar"'),
    ("what runs on 8443", '"runs" OR "8443"'),
    ("O'Brien's car", '"o brien" OR "car"'),
    ("milk,eggs", '"milk" OR "eggs"'),  # words joined by a comma are still two words
    ("Rent rent RENT", '"rent"'),
])
def test_keyword_query_drops_contraction_fragments_keeps_identifiers(text, expected):
    assert fts_query(text) == expected


def test_query_terms_keep_the_users_spelling_for_display():
    terms = query_terms("Ping 192.168.1.40 for Tom's NAS")
    assert [t.text for t in terms] == ["ping", "192.168.1.40", "tom", "nas"]
    assert terms[1].tokens == ("192", "168", "1", "40")


def _apples(tmp_path):
    s = Store(tmp_path / "m.db")
    _fill(s, _unit(np.random.default_rng(2), 4), ["red apple pie", "green apple", "red car", "blue sky"])
    return s


def test_term_matches_counts_the_store_and_marks_only_the_given_ids(tmp_path):
    s = _apples(tmp_path)
    n, df, matched = s.term_matches(query_terms("red apple"), [1, 2, 4])
    assert (n, df, matched) == (4, [2, 2], {1: [0, 1], 2: [1]})  # id 3 matches "red" but was not asked for
    assert s.term_matches(query_terms("red apple"), []) == (4, [2, 2], {})
    s.close()


def _spy_on_statements(store, monkeypatch):
    """The set of SQL texts the store's readers execute from now on."""
    seen = set()
    real_reader = store.reader

    class Spy:
        def __init__(self, conn):
            self.conn = conn

        def execute(self, sql, *args):
            seen.add(sql)
            return self.conn.execute(sql, *args)

    @contextlib.contextmanager
    def spying_reader():
        with real_reader() as conn:
            yield Spy(conn)

    monkeypatch.setattr(store, "reader", spying_reader)
    return seen


@pytest.mark.parametrize("call, statements", [
    (lambda s, ids: s.term_matches(query_terms("red apple"), ids), 2),  # the store count, the per-term pass
    (lambda s, ids: s.session_neighbours(ids), 1),
])
def test_recall_lookups_prepare_the_same_statements_whatever_the_ids(tmp_path, monkeypatch, call, statements):
    """Candidate ids are bound, not written into the SQL: a new statement per recall filled every pooled
    reader's statement cache (128 each), megabytes of SQLite heap that stayed."""
    s = _apples(tmp_path)
    seen = _spy_on_statements(s, monkeypatch)
    for ids in ([1], [1, 2], [4, 3, 2, 1], list(range(1, 200))):
        call(s, ids)
    assert len(seen) == statements
    s.close()


def test_identifier_phrase_matches_only_that_identifier(tmp_path):
    s = Store(tmp_path / "m.db")
    texts = ["backup server at 192.168.1.40", "1 cup of rice, 40 minutes", "printer at 192.168.1.41"]
    _fill(s, _unit(np.random.default_rng(1), 3), texts)
    assert [i for i, _ in s.keyword_search("what is at 192.168.1.40?", 10)] == [1]
    s.close()


def _exact_topk(vecs, q, k, allowed=None):
    idx = np.arange(len(vecs)) if allowed is None else np.asarray(allowed)
    s = vecs[idx] @ q
    order = np.lexsort((idx, -s))[:k]
    return [int(idx[i]) + 1 for i in order]


def test_int8_cache_search_is_exact_after_rerank(tmp_path):
    rng = np.random.default_rng(11)
    vecs = _unit(rng, 2000)
    s = Store(tmp_path / "c.db", vector_backend="sqlite-vec")
    _fill(s, vecs)
    c1 = [i for i in range(2000) if i % 3 == 1]
    for q in _unit(rng, 20):
        assert [i for i, _ in s.vector_search(q, 10)] == _exact_topk(vecs, q, 10)
        assert [i for i, _ in s.vector_search(q, 10, {"collection": "c1"})] == _exact_topk(vecs, q, 10, c1)
    assert s._vcache is not None and s._vcache.n == 2000
    s.close()


def test_int8_cache_follows_own_writes_and_other_processes(tmp_path):
    rng = np.random.default_rng(5)
    vecs = _unit(rng, 50)
    a = Store(tmp_path / "g.db", vector_backend="sqlite-vec")
    _fill(a, vecs[:40])
    q = vecs[45]
    a.vector_search(q, 5)  # builds the cache
    gen_before = a._vcache.generation
    # Another "process" (a second Store on the same file) adds the exact query vector.
    b = Store(tmp_path / "g.db")
    with b.writer() as conn:
        new_id = b.insert(conn, {"text": "from b", "collection": "x", "tags": [], "metadata": {}}, vecs[45])
    b.close()
    assert a.vector_search(q, 1)[0][0] == new_id
    assert a._vcache.generation != gen_before
    # Own writes are applied incrementally (no rebuild) and deletes disappear at once.
    gen = a._vcache.generation
    with a.writer() as conn:
        own = a.insert(conn, {"text": "own", "collection": "x", "tags": [], "metadata": {}}, vecs[46])
    assert a._vcache.generation == gen + 1
    assert a.vector_search(vecs[46], 1)[0][0] == own
    a.delete(own)
    assert all(i != own for i, _ in a.vector_search(vecs[46], 5))
    a.close()


def test_failed_transaction_leaves_cache_consistent(tmp_path):
    rng = np.random.default_rng(9)
    vecs = _unit(rng, 10)
    s = Store(tmp_path / "r.db", vector_backend="sqlite-vec")
    _fill(s, vecs[:5])
    s.vector_search(vecs[0], 1)
    with pytest.raises(RuntimeError):
        with s.writer() as conn:
            s.insert(conn, {"text": "rolled back", "collection": "x", "tags": [], "metadata": {}}, vecs[7])
            raise RuntimeError("abort")
    hits = s.vector_search(vecs[7], 10)
    assert len(hits) == 5 and s._vcache.n == 5
    s.close()


def test_pooled_readers_use_a_small_page_cache_and_the_writer_keeps_1_mb(tmp_path):
    """Each pooled reader holds at most READER_CACHE_KIB of pages (RSS per connection), the writer 1 MB."""
    store = Store(tmp_path / "m.db", dim=4)
    try:
        with store.reader() as first, store.reader() as second:
            for conn in (first, second):
                assert conn.execute("PRAGMA cache_size").fetchone()[0] == -READER_CACHE_KIB
        with store.reader() as again:  # a connection back from the pool keeps its setting
            assert again.execute("PRAGMA cache_size").fetchone()[0] == -READER_CACHE_KIB
        with store.writer() as conn:
            assert conn.execute("PRAGMA cache_size").fetchone()[0] == -1000
    finally:
        store.close()
