"""A Python whose sqlite3 cannot load extensions is said so, not silently slow (#15, finding 7)."""
from __future__ import annotations

import json
import logging

import pytest
from click.testing import CliRunner

from memento_edge import store
from memento_edge.cli import main
from memento_edge.embedder import FakeEmbedder
from memento_edge.memory import Memory


@pytest.fixture
def no_extensions(monkeypatch: pytest.MonkeyPatch) -> None:
    """Behave like pyenv's default build: sqlite3 without enable_load_extension."""
    monkeypatch.setattr(store, "sqlite_can_load_extensions", lambda: False)
    monkeypatch.setattr(store, "_load_sqlite_vec", lambda conn: False)


def test_a_new_database_warns_and_stats_say_why(no_extensions, settings, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="memento_edge.store"):
        with Memory(settings, embedder=FakeEmbedder()) as mem:
            info = mem.stats()
    assert info["vector_backend"] == "numpy" and info["sqlite_extensions"] is False
    assert "cannot load extensions" in info["vector_note"]
    assert any("cannot load extensions" in r.getMessage() for r in caplog.records)


def test_a_capable_python_says_nothing(settings, caplog) -> None:
    if not store.sqlite_can_load_extensions():
        pytest.fail("this Python's sqlite3 cannot load extensions: run scripts/setup (it picks one that can)")
    with caplog.at_level(logging.WARNING, logger="memento_edge.store"):
        with Memory(settings, embedder=FakeEmbedder()) as mem:
            info = mem.stats()
    assert info["sqlite_extensions"] is True and info["vector_note"] is None
    assert not [r for r in caplog.records if r.name == "memento_edge.store"]


def test_numpy_chosen_on_purpose_gets_no_start_warning(no_extensions, settings, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="memento_edge.store"):
        with Memory(settings.replace(vector_backend="numpy"), embedder=FakeEmbedder()) as mem:
            assert mem.stats()["vector_backend"] == "numpy"
    assert not caplog.records


def test_cli_stats_prints_the_note(no_extensions, monkeypatch: pytest.MonkeyPatch) -> None:
    from memento_edge import embedder

    monkeypatch.setattr(embedder, "make_embedder", lambda settings, *a, **k: FakeEmbedder())
    runner = CliRunner()
    assert runner.invoke(main, ["remember", "x"]).exit_code == 0
    r = runner.invoke(main, ["--no-json", "stats"])
    assert r.exit_code == 0 and "note: this Python's sqlite3 cannot load extensions" in r.output
    r = runner.invoke(main, ["--json", "stats"])
    assert json.loads(r.output)["sqlite_extensions"] is False


def test_readyz_and_the_start_line_say_so(no_extensions, settings, caplog) -> None:
    """The service tells an operator too: /readyz's ``vectors`` and a warning right after the start line."""
    from memento_edge import web
    from memento_edge.web.state import EXT

    with Memory(settings, embedder=FakeEmbedder()) as mem:
        app = web.create_app(settings, memory=mem)
        vectors = app.test_client().get("/readyz").get_json()["vectors"]
        assert vectors["backend"] == "numpy" and vectors["sqlite_extensions"] is False
        assert "cannot load extensions" in vectors["note"]
        with caplog.at_level(logging.INFO, logger="memento_edge.web"):
            web._log_start("loopback-open", app.extensions[EXT], "http://127.0.0.1:8077")
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "memento_edge.web"]
    assert "vectors=numpy" in lines[0][1]
    assert any(level == "WARNING" and "cannot load extensions" in msg for level, msg in lines[1:])
