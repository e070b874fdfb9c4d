"""Concurrency and crash safety of the engine (the seed crashed off the main thread and lost writes)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from memento_edge.memory import Memory


def _hammer(mem: Memory, writers: int = 4, readers: int = 4, per_writer: int = 40):
    errors: list = []
    written: dict = {}
    lock = threading.Lock()
    stop = threading.Event()

    def write(w: int) -> None:
        try:
            for i in range(per_writer):
                r = mem.remember(f"writer {w} note {i} about topic {i % 7}", tags=[f"w{w}"])
                with lock:
                    written[r.id] = f"writer {w} note {i} about topic {i % 7}"
        except Exception as exc:  # noqa: BLE001 - the test counts every error
            errors.append(repr(exc))

    def read(r: int) -> None:
        try:
            while not stop.is_set():
                for mode in ("hybrid", "vector", "keyword"):
                    mem.recall(f"note about topic {r}", topk=5, mode=mode, filters={"tags_any": [f"w{r}"]})
                mem.stats()
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc))

    ws = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    rs = [threading.Thread(target=read, args=(r,)) for r in range(readers)]
    for t in ws + rs:
        t.start()
    for t in ws:
        t.join(timeout=300)
    stop.set()
    for t in rs:
        t.join(timeout=60)
    return errors, written


def test_four_writers_four_readers_fake_model(fake_memory):
    errors, written = _hammer(fake_memory)
    assert errors == []
    assert len(written) == 4 * 40
    for mid, text in written.items():
        assert fake_memory.get(mid).text == text
        assert fake_memory.store.get_vector(mid) is not None
    assert fake_memory.check()["ok"]


@pytest.mark.real_model
def test_four_writers_four_readers_real_model(real_memory):
    errors, written = _hammer(real_memory, per_writer=15)
    assert errors == []
    assert len(written) == 60
    for mid, text in written.items():
        assert real_memory.get(mid).text == text
        hits = real_memory.recall(text, topk=3, mode="vector").hits
        assert mid in [h.id for h in hits]
    assert real_memory.check()["ok"]


CHILD = textwrap.dedent("""
    import sys
    from memento_edge.config import Settings
    from memento_edge.embedder import FakeEmbedder
    from memento_edge.memory import Memory
    mem = Memory(Settings.load(env={"MEMENTO_DB": sys.argv[1]}), embedder=FakeEmbedder())
    i = 0
    while True:
        r = mem.remember(f"crash test memory {i} " + "x" * (i % 50), tags=["crash"])
        # Only ids printed after remember() returned are "acknowledged".
        sys.stdout.write(f"{r.id}\\n")
        sys.stdout.flush()
        i += 1
""")


@pytest.mark.parametrize("kill_after", [5, 200])
def test_sigkill_during_writes_loses_no_acknowledged_memory(tmp_path, kill_after):
    db = tmp_path / "crash.db"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(db)], stdout=subprocess.PIPE, text=True)
    acked = []
    deadline = time.monotonic() + 120
    try:
        while len(acked) < kill_after and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            acked.append(int(line))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert len(acked) >= kill_after, "child stopped writing early"
    from memento_edge.config import Settings
    from memento_edge.embedder import FakeEmbedder

    with Memory(Settings.load(env={"MEMENTO_DB": str(db)}), embedder=FakeEmbedder()) as mem:
        check = mem.check()
        assert check["ok"], check
        for mid in acked:
            assert mem.get(mid).tags == ["crash"]
        assert mem.store._writer.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
