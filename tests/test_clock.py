"""Clock guard: memories stored while the wall clock is untrusted are flagged and re-dated exactly once
it is trusted again in the same boot; rows from a boot that ended before sync stay flagged."""
from __future__ import annotations

import io
import json
import sqlite3
from dataclasses import dataclass
from typing import Any, Dict

import pytest

from memento_edge import clock as clock_mod
from memento_edge import migrations
from memento_edge.clock import ClockReading, SystemClock
from memento_edge.config import Settings
from memento_edge.embedder import FakeEmbedder
from memento_edge.errors import InvalidInput
from memento_edge.memory import Memory

T_WRONG = 1_700_000_000.0      # what the board believes after a power cut (saved by timesyncd days ago)
OFFSET = 3 * 86400 + 1234.5    # how far behind it is
BOOT_NS = 40_000_000_000       # 40 s after boot


@dataclass
class FakeClock:
    """An injected clock: wall time, trust and CLOCK_BOOTTIME move together like the real ones."""

    wall: float = T_WRONG
    trusted: bool = False
    boot_id: str = "boot-a"
    boot_ns: int = BOOT_NS

    def read(self) -> ClockReading:
        return ClockReading(self.wall, self.trusted, self.boot_id, self.boot_ns)

    def state(self) -> Dict[str, Any]:
        return {"trusted": self.trusted, "source": "test", "mode": "auto"}

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.boot_ns += int(seconds * 1e9)

    def sync(self, offset: float) -> None:
        """NTP answers: the wall clock steps by ``offset``; the boot clock does not move."""
        self.wall += offset
        self.trusted = True


def _memory(settings: Settings, clk: FakeClock) -> Memory:
    return Memory(settings, embedder=FakeEmbedder(), clock=clk)


def _created(mem: Memory, mid: int) -> float:
    return float(mem.store.get(mid)["created_at"])


def test_sync_in_the_same_boot_corrects_by_exactly_the_offset(settings):
    clk = FakeClock()
    with _memory(settings, clk) as mem:
        a = mem.remember("stored right after the power cut").id
        clk.advance(10.0)
        b = mem.remember("stored ten seconds later").id
        assert mem.get(a).clock_trusted is False and mem.get(b).clock_trusted is False
        assert mem.stats()["clock"]["untrusted_memories"] == 2
        before = {a: _created(mem, a), b: _created(mem, b)}
        updated_before = float(mem.store.get(a)["updated_at"])

        clk.advance(5.0)
        clk.sync(OFFSET)
        hits = mem.recall("stored", mode="keyword").hits  # any read re-dates first
        assert {h.id for h in hits} == {a, b} and all(h.clock_trusted for h in hits)
        for mid in (a, b):
            assert _created(mem, mid) == pytest.approx(before[mid] + OFFSET, abs=1e-6)
        assert float(mem.store.get(a)["updated_at"]) == pytest.approx(updated_before + OFFSET, abs=1e-6)
        state = mem.stats()["clock"]
        assert state["untrusted_memories"] == 0 and state["corrected"] == 2 and state["trusted"] is True


def test_rows_of_a_boot_that_ended_before_sync_stay_flagged(settings):
    clk = FakeClock()
    with _memory(settings, clk) as mem:
        old = mem.remember("written before the reboot").id
    # power cut, reboot: a new boot id, the boot clock restarts, then NTP answers
    clk2 = FakeClock(wall=T_WRONG + OFFSET + 600, trusted=True, boot_id="boot-b", boot_ns=5_000_000_000)
    with _memory(settings, clk2) as mem:
        fresh = mem.remember("written after sync").id
        assert mem.get(old).clock_trusted is False
        assert _created(mem, old) == pytest.approx(T_WRONG)  # never guessed
        assert mem.get(fresh).clock_trusted is True
        assert mem.stats()["clock"]["untrusted_memories"] == 1


def test_time_filters_include_untrusted_rows_by_default_and_can_exclude_them(settings):
    clk = FakeClock()
    with _memory(settings, clk) as mem:
        flagged = mem.remember("groceries list while offline").id
        # another boot: the flagged row can no longer be corrected
        mem.clock = FakeClock(wall=T_WRONG + 100, trusted=True, boot_id="boot-b")
        good = mem.remember("groceries list after sync").id
        since = {"since": T_WRONG - 10}
        both = {h.id for h in mem.recall("groceries", mode="keyword", filters=since).hits}
        assert both == {flagged, good}
        only = mem.recall("groceries", mode="keyword", filters={**since, "untrusted_time": "exclude"}).hits
        assert [h.id for h in only] == [good]
        assert mem.count({"untrusted_time": "exclude"}) == 1
        with pytest.raises(InvalidInput) as err:
            mem.recall("groceries", filters={"untrusted_time": "maybe"})
        assert err.value.field == "filters.untrusted_time"


def test_ids_and_recent_order_never_follow_the_wall_clock(settings):
    clk = FakeClock(trusted=True)
    with _memory(settings, clk) as mem:
        first = mem.remember("first").id
        clk.wall -= 86400  # the clock steps back a day
        second = mem.remember("second").id
        assert second > first
        assert [r.id for r in mem.recent().items] == [second, first]


def test_export_import_keeps_the_flag(settings, tmp_path):
    clk = FakeClock()
    with _memory(settings, clk) as mem:
        mem.remember("unverified time")
        buf = io.StringIO()
        mem.export_jsonl(buf)
    assert json.loads(buf.getvalue())["clock_trusted"] is False
    other = settings.replace(db=str(tmp_path / "other.db"))
    with _memory(other, FakeClock(trusted=True, boot_id="boot-a")) as mem:
        mem.import_jsonl(buf.getvalue().splitlines())
        (rec,) = mem.recent().items
        # imported rows carry no boot reference, so even a trusted clock in "the same" boot id can't date them
        assert rec.clock_trusted is False


def test_migration_marks_existing_rows_trusted(tmp_path):
    path = tmp_path / "old.db"
    con = sqlite3.connect(path, isolation_level=None)
    migrations.migrate(con, stop_before="m003_clock_guard")
    con.execute("INSERT INTO memories (text, created_at, updated_at, content_hash) VALUES ('x', 1, 1, 'h')")
    migrations.migrate(con)
    assert con.execute("SELECT clock_trusted, clock_boot_id FROM memories").fetchall() == [(1, None)]


def test_system_clock_follows_timesyncd(tmp_path):
    flag = tmp_path / "timesync" / "synchronized"
    flag.parent.mkdir()
    clk = SystemClock("auto", timesync_flag=flag)
    assert clk.state() == {"trusted": False, "source": "systemd-timesyncd", "mode": "auto"}
    assert clk.read().trusted is False
    flag.touch()
    assert clk.read().trusted is True


def test_system_clock_without_timesyncd_asks_the_kernel_or_assumes(tmp_path, monkeypatch):
    clk = SystemClock("auto", timesync_flag=tmp_path / "absent" / "synchronized")
    monkeypatch.setattr(clock_mod, "_kernel_synchronised", lambda: None)
    assert clk.state()["source"] == "assumed" and clk.read().trusted is True
    monkeypatch.setattr(clock_mod, "_kernel_synchronised", lambda: True)
    assert clk.state()["source"] == "kernel"


def test_system_clock_modes_and_reading(tmp_path):
    flag = tmp_path / "timesync" / "synchronized"
    flag.parent.mkdir()
    assert SystemClock("trusted", timesync_flag=flag).read().trusted is True
    assert SystemClock("untrusted", timesync_flag=flag).read().trusted is False
    reading = SystemClock("trusted").read()
    assert reading.boot_ns is None or reading.boot_ns > 0
    with pytest.raises(ValueError):
        SystemClock("sometimes")


def test_clock_setting_is_validated():
    assert Settings.load(env={"MEMENTO_CLOCK": "Trusted"}).clock == "trusted"
    with pytest.raises(InvalidInput) as err:
        Settings.load(env={"MEMENTO_CLOCK": "sometimes"})
    assert err.value.field == "clock"


def test_untrusted_flag_and_filter_over_http(settings):
    from memento_edge.web import create_app

    clk = FakeClock()
    with _memory(settings.replace(insecure_no_auth=True), clk) as mem:
        client = create_app(mem.settings, memory=mem).test_client()
        mid = client.post("/v1/memories", json={"text": "offline note"}).get_json()["id"]
        assert client.get(f"/v1/memories/{mid}").get_json()["clock_trusted"] is False
        body = {"query": "offline", "mode": "keyword", "filters": {"untrusted_time": "exclude"}}
        assert client.post("/v1/recall", json=body).get_json()["hits"] == []


def test_readyz_and_metrics_show_the_clock(settings):
    from memento_edge.web import create_app

    clk = FakeClock()
    with _memory(settings.replace(insecure_no_auth=True), clk) as mem:
        client = create_app(mem.settings, memory=mem).test_client()
        client.post("/v1/memories", json={"text": "offline note"})
        ready = client.get("/readyz").get_json()["clock"]
        assert ready["trusted"] is False and ready["untrusted_memories"] == 1
        assert 'memento_clock_trusted{source="test"} 0' in client.get("/metrics").get_data(as_text=True)
        clk.advance(1.0)
        clk.sync(OFFSET)
        ready = client.get("/readyz").get_json()["clock"]
        assert ready["trusted"] is True and ready["untrusted_memories"] == 0 and ready["corrected"] == 1
        text = client.get("/metrics").get_data(as_text=True)
        assert 'memento_clock_trusted{source="test"} 1' in text and "memento_clock_corrected_total 1" in text


def test_cli_human_views_mark_unverified_times(monkeypatch):
    """`get`, the hit/recent tables and `stats` show the flag to a person, not only in --json."""
    from click.testing import CliRunner

    from memento_edge import embedder
    from memento_edge.cli import main

    monkeypatch.setattr(embedder, "make_embedder", lambda settings, *a, **k: FakeEmbedder())
    runner = CliRunner()
    untrusted = {"MEMENTO_CLOCK": "untrusted"}
    # (a trusted clock would re-date the offline note at once: it was stored in this boot)
    assert runner.invoke(main, ["remember", "synced note"], env={"MEMENTO_CLOCK": "trusted"}).exit_code == 0
    assert runner.invoke(main, ["remember", "offline note"], env=untrusted).exit_code == 0
    out = runner.invoke(main, ["--no-json", "get", "2"], env=untrusted).output
    (created,) = [line for line in out.splitlines() if "created_at:" in line]
    assert "time unverified" in created
    assert "time unverified" not in runner.invoke(main, ["--no-json", "get", "1"], env=untrusted).output
    table = runner.invoke(main, ["--no-json", "recall", "note", "-m", "keyword"], env=untrusted).output
    rows = {line.split()[0]: line for line in table.splitlines() if line[:1].isdigit()}
    assert " ?" in rows["2"] and " ?" not in rows["1"] and "?: time unverified" in table
    assert " ?" in runner.invoke(main, ["--no-json", "recent"], env=untrusted).output
    stats = runner.invoke(main, ["--no-json", "stats"], env=untrusted).output
    (clock,) = [line for line in stats.splitlines() if line.startswith("clock")]
    assert "NOT synchronised (setting)" in clock and "1 memories with an unverified time" in clock


def test_appliance_unit_orders_after_time_sync_without_waiting_for_the_network():
    """The unit starts after time-sync.target (timesyncd restored the saved clock) but never pulls in or
    requires a synchronised clock: a board without Wi-Fi must still serve."""
    from pathlib import Path

    unit = (Path(__file__).resolve().parents[1] / "ansible" / "roles" / "memento_edge" / "templates"
            / "memento-edge.service.j2").read_text(encoding="utf-8")
    lines = [line.strip() for line in unit.splitlines() if not line.lstrip().startswith("#")]
    assert "After=time-sync.target" in lines
    binding = [line for line in lines if line.split("=", 1)[0] in ("Wants", "Requires", "BindsTo", "Requisite")]
    assert not [line for line in binding if "time-sync" in line or "time-wait-sync" in line]
    assert not [line for line in lines if "time-wait-sync" in line]
