"""Fault and abuse regressions of issue #14: each test reproduces one failure found at 904f9dd.

Every refusal is a domain error (a 4xx/503/507 JSON error on the web, one line on the CLI), never a 500
or a traceback.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import threading
import time
import unicodedata
from pathlib import Path
from typing import Any, Dict

import pytest
from click.testing import CliRunner

from memento_edge.cli import main as cli_main
from memento_edge import store as store_restore
from memento_edge.config import Settings
from memento_edge.disk import DatabaseLock
from memento_edge.embedder import FakeEmbedder
from memento_edge.errors import InvalidInput, StoreError
from memento_edge.memory import MAX_METADATA_DEPTH, Memory
from webfixtures import WebEnv, make_env


@pytest.fixture(autouse=True)
def _fake_model_for_the_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    """CLI commands embed with the FakeEmbedder (these tests are about faults, not the model)."""
    from memento_edge import embedder

    monkeypatch.setattr(embedder, "make_embedder", lambda settings, *a, **k: FakeEmbedder())


def _nested(depth: int) -> Dict[str, Any]:
    """A metadata object nested ``depth`` levels deep: {"a": {"a": ... {} }}."""
    obj: Dict[str, Any] = {}
    for _ in range(depth - 1):
        obj = {"a": obj}
    return obj


def _cli(home: Path, *args: str, input: Any = None) -> Any:
    return CliRunner().invoke(cli_main, ["--home", str(home), "--json", *args], input=input,
                              catch_exceptions=False)


# --- 1. poison pill ---------------------------------------------------------------------------------
def test_deep_metadata_refused_by_the_engine_naming_the_field(fake_memory: Memory) -> None:
    fake_memory.remember("shallow enough", metadata=_nested(MAX_METADATA_DEPTH))
    with pytest.raises(InvalidInput) as err:
        fake_memory.remember("too deep", metadata=_nested(MAX_METADATA_DEPTH + 1))
    assert err.value.field == "metadata"
    with pytest.raises(InvalidInput) as err:
        fake_memory.remember_many([{"text": "a"}, {"text": "b", "metadata": {"x": [_nested(500)]}}])
    assert err.value.field == "items[1].metadata"
    mid = fake_memory.remember("to update").id
    with pytest.raises(InvalidInput):
        fake_memory.update(mid, metadata=_nested(500))


def test_deep_metadata_refused_on_the_web_with_422(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    try:
        r = env.client.post("/v1/memories", json={"text": "poison", "metadata": _nested(500)})
        assert r.status_code == 422, r.get_data(as_text=True)
        assert r.get_json()["error"]["field"] == "metadata"
        assert env.client.get("/v1/memories").status_code == 200
    finally:
        env.close()


def _store_poison(mem: Memory, depth: int = 500) -> int:
    """A row written before the depth check existed (straight into the store, bypassing validation)."""
    mid = mem.remember("old poison pill").id
    raw = '{"a": ' * (depth - 1) + "{}" + "}" * (depth - 1)  # json.dumps itself would recurse too deep
    with mem.store.writer() as conn:
        conn.execute("UPDATE memories SET metadata = ? WHERE id = ?", (raw, mid))
    return mid


@pytest.mark.parametrize("depth", [500, 5000])
def test_existing_deep_row_is_readable_everywhere(tmp_path: Path, depth: int) -> None:
    env = make_env(tmp_path)
    try:
        mid = _store_poison(env.memory, depth)
        env.memory.remember("a normal memory about poison")
        for path in (f"/v1/memories/{mid}", "/v1/memories", "/v1/export", "/v1/recall?q=poison+pill"):
            r = env.client.get(path)
            assert r.status_code == 200, (path, r.status_code, r.get_data(as_text=True)[:300])
        exported = [json.loads(line) for line in env.client.get("/v1/export").get_data(as_text=True).splitlines()]
        assert {e["text"] for e in exported} == {"old poison pill", "a normal memory about poison"}
        # The stored metadata is shown as its JSON text, so every face can encode it.
        md = env.memory.get(mid).metadata
        assert list(md) == ["_unparsed_metadata"] and md["_unparsed_metadata"].startswith('{"a": {"a"')
    finally:
        env.close()
    home = Path(env.settings.home or "")
    got = _cli(home, "get", str(mid))
    assert got.exit_code == 0 and json.loads(got.output)["id"] == mid
    dump = _cli(home, "export")
    assert dump.exit_code == 0 and len([ln for ln in dump.output.splitlines() if ln.startswith("{")]) == 2


# --- 10. Unicode normalisation ----------------------------------------------------------------------
def test_nfc_and_nfd_are_one_tag_one_text_one_collection(fake_memory: Memory) -> None:
    nfc, nfd = "café", unicodedata.normalize("NFD", "café")
    assert nfc != nfd
    first = fake_memory.remember(f"met at the {nfc}", tags=[nfc, nfd], collection=nfd)
    rec = fake_memory.get(first.id)
    assert rec.tags == [nfc] and rec.collection == nfc and rec.text == f"met at the {nfc}"
    again = fake_memory.remember(f"met at the {nfd}", collection=nfc)
    assert again.id == first.id and not again.created
    assert fake_memory.count({"tags_any": [nfd], "collection": nfd}) == 1
    assert fake_memory.recall(nfd, mode="keyword", filters={"tags_all": [nfd]}).hits[0].id == first.id


@pytest.mark.parametrize("tag", ["ad\u202emin", "ad\u2066min", "ad\u200bmin", "\u200dadmin", "ad\ufeffmin",
                                 "ad\u200fmin"])
def test_bidi_and_zero_width_tags_refused(fake_memory: Memory, tag: str) -> None:
    with pytest.raises(InvalidInput) as err:
        fake_memory.remember("x", tags=["ok", tag])
    assert err.value.field == "tags"
    with pytest.raises(InvalidInput) as err:
        fake_memory.remember("x", collection=tag)
    assert err.value.field == "collection"


# --- 9. CLI import and export of bad data ------------------------------------------------------------
def test_import_skips_a_line_nested_100k_deep(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    deep = '{"text": "deep", "metadata": ' + '{"a": ' * 100_000 + "1" + "}" * 100_000 + "}"
    src.write_text(f'{{"text": "first"}}\n{deep}\n{{"text": "third"}}\n', encoding="utf-8")
    res = CliRunner().invoke(cli_main, ["--home", str(tmp_path / "h"), "--json", "import", str(src)])
    assert res.exit_code == 1 and "Traceback" not in res.output
    report = json.loads(res.stdout)
    assert report["imported"] == 2 and report["error_count"] == 1
    assert report["errors"][0]["line"] == 2 and "nested" in report["errors"][0]["message"]


def _store_invalid_utf8(mem: Memory) -> int:
    """A row whose text is not UTF-8 (written by another tool, or a flipped bit on the card)."""
    mid = mem.remember("will be damaged").id
    with mem.store.writer() as conn:
        conn.execute("UPDATE memories SET source = CAST(X'6361666580ff' AS TEXT) WHERE id = ?", (mid,))
    return mid


def test_export_salvages_rows_with_invalid_utf8(tmp_path: Path) -> None:
    home = tmp_path / "h"
    with Memory(Settings.load(env={"MEMENTO_HOME": str(home)}), embedder=FakeEmbedder()) as mem:
        mem.remember("good one")
        bad = _store_invalid_utf8(mem)
        mem.remember("good two")
        assert mem.get(bad).source == "cafe\ufffd\ufffd"
        problems = mem.check()["problems"]
        assert any(f"memory {bad}" in p and "UTF-8" in p for p in problems)
    res = _cli(home, "export")
    assert res.exit_code == 0, res.output
    lines = [json.loads(ln) for ln in res.stdout.splitlines()]
    assert [ln["id"] for ln in lines] == [1, bad, 3]
    assert "not valid UTF-8" in res.stderr


# --- 6. corrupt databases ---------------------------------------------------------------------------
def _settings(home: Path, **kw: Any) -> Settings:
    return Settings.load(env={"MEMENTO_HOME": str(home)}, **kw)


def test_zero_byte_database_refused_naming_the_file_and_the_restore(tmp_path: Path) -> None:
    home = tmp_path / "h"
    home.mkdir()
    (home / "memento.db").write_bytes(b"")
    with pytest.raises(StoreError) as err:
        Memory(_settings(home), embedder=FakeEmbedder())
    assert str(home / "memento.db") in err.value.message and "memento-edge restore" in err.value.message
    assert (home / "memento.db").stat().st_size == 0  # left untouched
    res = _cli(home, "stats")
    assert res.exit_code == 1 and "Traceback" not in res.output and "0 bytes" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def _fill(home: Path, n: int = 300) -> Path:
    with Memory(_settings(home), embedder=FakeEmbedder()) as mem:
        mem.remember_many([{"text": f"memory number {i} " + "lorem ipsum " * 20} for i in range(n)])
    return home / "memento.db"


def test_random_bytes_mid_file_refused_at_open(tmp_path: Path) -> None:
    db = _fill(tmp_path / "h")
    size = db.stat().st_size
    with open(db, "r+b") as fh:  # clobber a few pages in the middle (past the schema on page 1)
        fh.seek(size // 2 - 4096)
        fh.write(bytes(range(256)) * 48)
    with pytest.raises(StoreError) as err:
        Memory(_settings(tmp_path / "h"), embedder=FakeEmbedder())
    assert str(db) in err.value.message and "damaged" in err.value.message
    assert "memento-edge restore" in err.value.message


@pytest.mark.parametrize("backend, damage", [
    ("numpy", "UPDATE memory_vectors SET embedding = zeroblob(10) WHERE id = 2"),
    ("sqlite-vec", "UPDATE memory_vec_vector_chunks00 SET vectors = zeroblob(10)"),
])
def test_wrong_length_vector_found_by_check_and_recall_degrades(tmp_path: Path, backend: str,
                                                                damage: str) -> None:
    env = make_env(tmp_path, vector_backend=backend)
    try:
        for t in ("alpha apples", "beta bananas", "gamma grapes"):
            env.memory.remember(t)
        with env.memory.store.writer() as conn:
            conn.execute(damage)
        assert not env.memory.check()["ok"]
        assert any("vector" in p for p in env.memory.check()["problems"])
        for mode in ("hybrid", "vector", "keyword"):
            r = env.client.post("/v1/recall", json={"query": "beta bananas", "mode": mode})
            assert r.status_code == 200, (mode, r.get_data(as_text=True))
            assert r.get_json()["hits"], mode
        env.memory.reindex()
        assert env.memory.check()["ok"], env.memory.check()
        assert env.memory.recall("beta bananas", mode="vector").hits[0].text == "beta bananas"
    finally:
        env.close()


# --- 8. config validation ---------------------------------------------------------------------------
@pytest.mark.parametrize("yaml_bytes, field", [
    (b"port: 8077\nlog_level: \xff\xfe\n", "config"),
    (b"cache_mb: .inf\n", "cache_mb"),
    (b"cache_mb: .nan\n", "cache_mb"),
    (b"threads: 0\n", "threads"),
    (b"connection_limit: 0\n", "connection_limit"),
    (b"max_body_bytes: -1\n", "max_body_bytes"),
    (b"port: 84848\n", "port"),
    (b"request_timeout: 0\n", "request_timeout"),
    (b"port: [1, 2\n", "config"),
])
def test_bad_config_values_are_one_line_errors(tmp_path: Path, yaml_bytes: bytes, field: str) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_bytes(yaml_bytes)
    with pytest.raises(InvalidInput) as err:
        Settings.load(config_file=str(cfg))
    assert err.value.field == field
    res = CliRunner().invoke(cli_main, ["--config", str(cfg), "config"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert len(res.stderr.strip().splitlines()) == 1 and (str(cfg) in res.stderr or field in res.stderr)


def test_out_of_range_port_in_the_environment_is_refused() -> None:
    with pytest.raises(InvalidInput) as err:
        Settings.load(env={"MEMENTO_PORT": "84848", "MEMENTO_CONFIG": ""})
    assert err.value.field == "port" and "environment" in err.value.message
    res = CliRunner().invoke(cli_main, ["serve", "--port", "84848"])
    assert res.exit_code == 1 and "'port'" in res.stderr and "Traceback" not in res.output


# --- 5. sick storage: honest readiness, start read-only -------------------------------------------------
class _FakeStatvfs:
    def __init__(self, real: Any, *, read_only: bool = False, free_blocks: Any = None) -> None:
        self.f_frsize, self.f_blocks = real.f_frsize, real.f_blocks
        self.f_bavail = real.f_bavail if free_blocks is None else free_blocks
        self.f_flag = real.f_flag | (os.ST_RDONLY if read_only else 0)


@pytest.mark.parametrize("fault, words", [({"read_only": True}, "read-only"), ({"free_blocks": 3}, "disk is full")])
def test_readyz_tells_the_truth_about_a_sick_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   fault: Dict[str, Any], words: str) -> None:
    env = make_env(tmp_path)
    try:
        ok = env.client.get("/readyz")
        assert ok.status_code == 200 and ok.get_json()["db"]["writable"] is True
        real = os.statvfs
        monkeypatch.setattr(os, "statvfs", lambda p: _FakeStatvfs(real(p), **fault))
        health = env.memory.health()
        assert health["db_readable"] and not health["db_writable"] and words in health["error"]
        r = env.client.get("/readyz")
        assert r.status_code == 503
        assert r.get_json()["db"]["writable"] is False and words in r.get_json()["db"]["error"]
    finally:
        env.close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """A 4 MB tmpfs (a real full or read-only file system); needs the right to mount (root in CI)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here; test_readyz_tells_the_truth_about_a_sick_disk covers readiness")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill_disk(mnt: Path) -> None:
    with open(mnt / "filler", "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError:
            pass


def _seed(home: Path) -> None:
    with Memory(_settings(home), embedder=FakeEmbedder()) as mem:
        mem.remember("the spare key is under the blue flower pot", tags=["home"])
        mem.remember("the wifi password is on the fridge")


@pytest.fixture
def sick_home(small_disk: Path, sickness: str) -> Path:
    """A seeded home on ``small_disk``, then the disk made sick: ``sickness`` is "full" or "read-only"
    (the test's parameter)."""
    home = small_disk / "home"
    _seed(home)
    if sickness == "full":
        _fill_disk(small_disk)
    else:
        subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    return home


@pytest.mark.parametrize("sickness", ["full", "read-only"])
def test_starts_read_only_on_a_sick_disk_and_says_so(small_disk: Path, sick_home: Path, sickness: str) -> None:
    home = sick_home
    env = WebEnv(home)
    try:
        assert env.memory.store.read_only == ("the disk is full" if sickness == "full" else
                                              "the file system is read-only")
        hits = env.client.post("/v1/recall", json={"query": "spare key", "mode": "keyword"}).get_json()["hits"]
        assert hits[0]["text"].startswith("the spare key")
        assert env.client.post("/v1/recall", json={"query": "spare key"}).status_code == 200
        assert env.client.get("/v1/memories/1").status_code == 200
        assert env.client.get("/v1/export").status_code == 200
        ready = env.client.get("/readyz")
        assert ready.status_code == 503 and ready.get_json()["db"]["writable"] is False
        w = env.client.post("/v1/memories", json={"text": "a new memory"})
        assert w.status_code == (507 if sickness == "full" else 503), w.get_data(as_text=True)
        assert "read-only" in w.get_json()["error"]["message"]
        with pytest.raises(StoreError) as err:
            env.memory.backup(small_disk / "backups" / "b.db")
        assert str(small_disk / "backups" / "b.db") in err.value.message
        assert not list(small_disk.glob("backups/*.partial"))
    finally:
        env.close()
    res = _cli(home, "remember", "from the command line")
    assert res.exit_code == 1 and "read-only" in res.stderr and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("sickness, status", [("full", 507), ("read-only", 503)])
def test_web_backup_on_a_sick_disk_is_a_json_error(sick_home: Path, sickness: str, status: int) -> None:
    """The backups directory does not exist yet: creating it on a read-only disk answered 500."""
    home = sick_home
    env = WebEnv(home)
    try:
        r = env.client.post("/v1/backup", json={})
        assert r.status_code == status, r.get_data(as_text=True)
        error = r.get_json()["error"]
        assert "cannot write the backup" in error["message"] and str(home / "backups") in error["message"]
        assert not (home / "backups").exists() or not list((home / "backups").iterdir())
    finally:
        env.close()


# --- 7. restore while the database is open ----------------------------------------------------------
def test_restore_refuses_while_a_service_holds_the_database(tmp_path: Path) -> None:
    home = tmp_path / "h"
    settings = _settings(home)
    with Memory(settings, embedder=FakeEmbedder()) as service:
        service.remember("before the backup")
        backup = service.backup(tmp_path / "b.db")
        with pytest.raises(StoreError) as err:
            Memory.restore(backup, settings)
        assert "another memento-edge process" in err.value.message and str(os.getpid()) in err.value.message
        res = _cli(home, "restore", "--yes", str(backup))
        assert res.exit_code == 1 and "stop the service" in res.stderr
        ack = service.remember("acknowledged while the restore was refused")
    with Memory(settings, embedder=FakeEmbedder()) as mem:
        assert mem.get(ack.id).text == "acknowledged while the restore was refused"


def test_a_store_opened_during_a_restore_waits_and_writes_into_the_restored_file(tmp_path: Path) -> None:
    home = tmp_path / "h"
    settings = _settings(home)
    with Memory(settings, embedder=FakeEmbedder()) as mem:
        mem.remember("in the backup")
        backup = mem.backup(tmp_path / "b.db")
        mem.remember("lost by the restore, as asked")
    restoring = DatabaseLock(settings.db_path)
    restoring.acquire_exclusive()  # a restore in progress
    opened: Dict[str, Any] = {}

    def service() -> None:
        with Memory(settings, embedder=FakeEmbedder()) as m:
            opened["id"] = m.remember("acknowledged after the restore").id

    t = threading.Thread(target=service)
    t.start()
    time.sleep(0.3)
    assert "id" not in opened  # waiting for the restore
    store_restore._restore_unlocked(Path(backup), settings.db_path)
    restoring.release()
    t.join(10)
    with Memory(settings, embedder=FakeEmbedder()) as mem:
        texts = [r.text for r in mem.recent().items]
    assert texts == ["acknowledged after the restore", "in the backup"]


# --- 11. backups --------------------------------------------------------------------------------------
def test_partials_of_killed_backups_are_removed_by_the_next_backup(fake_memory: Memory, tmp_path: Path) -> None:
    bdir = tmp_path / "backups"
    bdir.mkdir()
    stale = bdir / "memento-killed.db.partial"
    stale.write_bytes(b"SQLite format 3\x00" + b"\0" * 5000)
    old = time.time() - 3600
    os.utime(stale, (old, old))
    fresh = bdir / "memento-running.db.partial"  # a backup still being written by another process
    fresh.write_bytes(b"")
    unrelated = bdir / "notes.txt.partial"
    unrelated.write_bytes(b"not ours")
    os.utime(unrelated, (old, old))
    fake_memory.remember("x")
    fake_memory.backup(bdir / "memento-new.db")
    assert not stale.exists() and fresh.exists() and unrelated.exists()
    assert (bdir / "memento-new.db").exists()



def test_appliance_backup_script_keeps_the_newest_n(tmp_path: Path) -> None:
    import jinja2

    role = Path(__file__).resolve().parent.parent / "ansible" / "roles" / "memento_edge"
    bdir, venv = tmp_path / "backups", tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    bdir.mkdir()
    fake = venv / "bin" / "memento-edge"  # records the backup it was asked for, like the real command
    fake.write_text('#!/bin/sh\nfor last; do :; done\necho backup > "$last"\n')
    fake.chmod(0o755)
    for day in range(1, 10):
        (bdir / f"memento-2026010{day}T033000Z.db").write_text("old")
    (bdir / ".memento-20260101T033000Z.db.partial.partial").write_text("killed")
    text = jinja2.Template((role / "templates" / "memento-edge-backup.sh.j2").read_text()).render(
        ansible_managed="test", memento_edge_backup_dir=str(bdir), memento_edge_backup_keep=3,
        memento_edge_venv=str(venv), memento_edge_config_file="/dev/null")
    script = tmp_path / "backup.sh"
    script.write_text(text)
    subprocess.run(["sh", str(script)], check=True)
    left = sorted(p.name for p in bdir.iterdir())
    assert len(left) == 3 and left[:2] == ["memento-20260108T033000Z.db", "memento-20260109T033000Z.db"]
    assert left[2] > "memento-2026" and (bdir / left[2]).read_text() == "backup\n"


# --- 2. cross-site writes -----------------------------------------------------------------------------
STATE_CHANGING = [("POST", "/v1/memories", {"text": "injected"}), ("POST", "/v1/import", None),
                  ("PATCH", "/v1/memories/1", {"text": "changed"}), ("DELETE", "/v1/memories/1", None),
                  ("POST", "/v1/recall", {"query": "x"}), ("POST", "/v1/backup", {})]


@pytest.mark.parametrize("headers", [
    {"Origin": "http://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "same-site", "Origin": "http://localhost:3000"},
    {"Origin": "http://localhost.evil.example"},
])
def test_cross_site_writes_are_refused(tmp_path: Path, headers: Dict[str, str]) -> None:
    env = make_env(tmp_path)
    try:
        env.memory.remember("kept")
        for method, path, body in STATE_CHANGING:
            kwargs: Dict[str, Any] = {"headers": headers}
            if body is not None:
                kwargs["json"] = body
            elif path == "/v1/import":
                kwargs.update(data=b'{"text": "injected"}\n', content_type="application/x-ndjson")
            r = env.client.open(path, method=method, **kwargs)
            assert r.status_code == 403 and r.get_json()["error"]["code"] == "cross_site", (method, path)
        assert [m.text for m in env.memory.recent().items] == ["kept"]
        assert env.client.get("/v1/memories", headers=headers).status_code == 200  # reads are not state-changing
    finally:
        env.close()


def test_the_own_page_and_non_browser_clients_may_write(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    try:
        own = {"Origin": "http://localhost", "Sec-Fetch-Site": "same-origin"}
        assert env.client.post("/v1/memories", json={"text": "from the page"}, headers=own).status_code == 201
        assert env.client.post("/v1/memories", json={"text": "from curl"}).status_code == 201
        typed = {"Sec-Fetch-Site": "none"}
        assert env.client.post("/v1/memories", json={"text": "typed"}, headers=typed).status_code == 201
    finally:
        env.close()


def test_text_plain_import_is_refused(tmp_path: Path) -> None:
    """text/plain is what a cross-site form or fetch can send without a preflight."""
    env = make_env(tmp_path)
    try:
        r = env.client.post("/v1/import", data=b'{"text": "injected"}\n', content_type="text/plain")
        assert r.status_code == 415 and env.memory.count() == 0
    finally:
        env.close()


# --- 3. connection exhaustion -------------------------------------------------------------------------
def _connect(port: int, source: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))  # another client address: Linux routes all of 127/8 to loopback
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    return sock


def _closed_by_server(sock: socket.socket, wait: float = 8.0) -> bool:
    sock.settimeout(wait)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


@pytest.fixture
def guarded(tmp_path: Path) -> Any:
    """The service on a real socket (in-process), with small limits so the test stays quick."""
    from memento_edge.web.server import create_guarded_server

    env = make_env(tmp_path)
    server = create_guarded_server(env.app, host="127.0.0.1", port=0, threads=2, connection_limit=48,
                                   channel_timeout=30, header_timeout=1.0, connections_per_client=10)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    yield server
    server.task_dispatcher.shutdown()
    server.close()
    thread.join(10)
    env.close()


def test_slowloris_and_idle_keepalives_leave_room_for_others(guarded: Any) -> None:
    import http.client

    port = int(guarded.effective_port)
    slow = [_connect(port, "127.0.0.2") for _ in range(30)]
    for sock in slow:
        sock.send(b"POST /v1/memories HTTP/1.1\r\nHost: localhost\r\n")  # and never the rest
    idle = []
    for _ in range(40):
        sock = _connect(port, "127.0.0.3")
        try:
            sock.send(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            idle.append(sock)
        except OSError:
            sock.close()
    for _ in range(3):  # everyone else is still answered
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200
        conn.close()
    # Each attacker address holds at most connections_per_client sockets: the rest were closed at once.
    assert sum(not _closed_by_server(s, 0.5) for s in slow) <= 10
    # And the slow ones are cut off once their headers are late.
    assert all(_closed_by_server(s) for s in slow)
    for sock in slow + idle:
        sock.close()


def test_queue_depth_warning_is_rate_limited() -> None:
    from memento_edge.web.server import QueueDepthFilter

    flt = QueueDepthFilter(every=60)
    records = [logging.LogRecord("waitress.queue", logging.WARNING, __file__, 1, "Task queue depth is %d", (n,),
                                 None) for n in range(500)]
    assert sum(flt.filter(r) for r in records) == 1


# --- 4. unbounded work per request ----------------------------------------------------------------------
def test_a_batch_over_the_token_budget_is_refused_before_any_embedding(tmp_path: Path) -> None:
    env = make_env(tmp_path, work_token_budget=1000)
    try:
        items = [{"text": f"{n} " + "long words " * 200} for n in range(10)]  # ~10 x 256 tokens
        r = env.client.post("/v1/memories", json={"items": items})
        assert r.status_code == 422 and r.get_json()["error"]["field"] == "items"
        assert "split" in r.get_json()["error"]["message"]
        assert env.memory.count() == 0
        assert env.client.post("/v1/memories", json={"items": items[:3]}).status_code == 201
    finally:
        env.close()


def test_writes_that_do_not_fit_beside_running_work_are_shed_and_recall_still_answers(tmp_path: Path) -> None:
    env = make_env(tmp_path, work_token_budget=1000)
    try:
        env.memory.remember("recall keeps working while writes are shed")
        with env.memory.work.take(900, wait=0):  # a long batch is embedding
            r = env.client.post("/v1/memories", json={"items": [{"text": "x " * 400}]})
            assert r.status_code == 503 and "Retry-After" in r.headers
            big = json.dumps({"items": [{"text": f"{n} " + "y" * 1000} for n in range(100)]})  # > 64 KB
            r = env.client.post("/v1/memories", data=big, content_type="application/json")
            assert r.status_code == 503  # shed before its body was parsed
            assert env.client.post("/v1/memories", json={"text": "a short one fits"}).status_code == 201
            hits = env.client.post("/v1/recall", json={"query": "recall keeps working"}).get_json()["hits"]
            assert hits
        assert env.client.post("/v1/memories", json={"items": [{"text": "x " * 400}]}).status_code == 201
    finally:
        env.close()


def test_a_large_write_lets_a_recall_query_embed_before_its_next_text(fake_memory: Memory,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Query first: a batch embeds text by text and, before each text, waits while a recall query embeds,
    so a query waits for at most the one text of a large batch in flight."""
    from memento_edge import memory as memory_mod

    monkeypatch.setattr(memory_mod, "QUERY_YIELD_S", 600.0)  # only the query's end releases the write
    order: list = []
    query_in, write_waiting = threading.Event(), threading.Event()
    real_embed, real_wait = fake_memory.embedder.embed_batch, fake_memory.query_first.wait_for_queries

    def query() -> None:
        with fake_memory.query_first.foreground(query=True):
            query_in.set()
            write_waiting.wait(60)
            order.append("query")

    def embed_batch(texts: Any) -> Any:
        order.extend(texts)
        if texts == ["text 0"]:  # a query arrives while the write's first text is embedding
            threading.Thread(target=query, daemon=True).start()
            query_in.wait(60)
        return real_embed(texts)

    def wait_for_queries(timeout: float) -> None:
        if order:
            write_waiting.set()
        real_wait(timeout)

    monkeypatch.setattr(fake_memory.embedder, "embed_batch", embed_batch)
    monkeypatch.setattr(fake_memory.query_first, "wait_for_queries", wait_for_queries)
    fake_memory.remember_many([{"text": f"text {n}"} for n in range(3)])
    assert order == ["text 0", "query", "text 1", "text 2"]


def test_background_writes_are_shed_once_the_backlog_owes_too_much(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Background writes skip the work budget (they never run the model): without a bound, four clients
    sending maximum batches grew the backlog until the disk was full."""
    from memento_edge import service

    monkeypatch.setattr(service, "BACKLOG_MAX_PENDING", 3)
    env = make_env(tmp_path, embed_mode="background")  # no worker runs here: the backlog only grows
    try:
        r = env.client.post("/v1/memories", json={"items": [{"text": f"owed {n}"} for n in range(3)]})
        assert r.status_code == 201
        r = env.client.post("/v1/memories", json={"text": "one too many"})
        assert r.status_code == 503 and "Retry-After" in r.headers, r.get_data(as_text=True)
        assert "wait for their embedding" in r.get_json()["error"]["message"] and env.memory.count() == 3
        env.memory.embed_pending(10)  # the worker catches up
        assert env.client.post("/v1/memories", json={"text": "one too many"}).status_code == 201
    finally:
        env.close()


def test_the_governor_stops_a_long_batch_when_memory_runs_out(tmp_path: Path) -> None:
    env = make_env(tmp_path, rss_limit_mb=100)
    try:
        governor = env.app.extensions["memento"].governor
        governor.interval = 0  # fine at admission; critical once the first mini-batch is stored
        governor._read_rss = lambda: (99 << 20) if env.memory.store.count() else (50 << 20)
        r = env.client.post("/v1/memories", json={"items": [{"text": f"memory {n}"} for n in range(200)]})
        assert r.status_code == 503 and "stopped after 64 of 200" in r.get_json()["error"]["message"]
        assert env.memory.count() == 64  # what was stored stays stored; a retry recognises it
    finally:
        env.close()


def test_one_large_write_body_at_a_time(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    try:
        big = json.dumps({"items": [{"text": f"{n} " + "z" * 1000} for n in range(100)]})  # > 64 KB
        slot = env.app.extensions["memento"].large_writes
        with slot:  # another large write is being parsed and embedded
            r = env.client.post("/v1/memories", data=big, content_type="application/json")
            assert r.status_code == 503 and env.memory.count() == 0
            assert env.client.post("/v1/memories", json={"text": "small writes still go"}).status_code == 201
        assert env.client.post("/v1/memories", data=big, content_type="application/json").status_code == 201
    finally:
        env.close()
