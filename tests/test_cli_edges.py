"""CLI behaviour at the edges (#15, finding 5), through click's runner with the FakeEmbedder."""
from __future__ import annotations

import io
import json
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from memento_edge import cli
from memento_edge.cli import main


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    from memento_edge import embedder

    monkeypatch.setattr(embedder, "make_embedder", lambda settings, *a, **k: embedder.FakeEmbedder())
    return CliRunner()


def _ok(result) -> str:
    assert result.exit_code == 0, result.output
    return result.output


def test_json_after_the_subcommand(runner: CliRunner) -> None:
    _ok(runner.invoke(main, ["remember", "get groceries after work", "--json"]))
    out = _ok(runner.invoke(main, ["recall", "groceries", "--json"]))
    assert json.loads(out)["hits"][0]["text"] == "get groceries after work"
    out = _ok(runner.invoke(main, ["--json", "recall", "groceries", "--no-json"]))
    assert "groceries" in out and not out.lstrip().startswith("{")  # the later flag wins
    assert json.loads(_ok(runner.invoke(main, ["token", "list", "--json"])))["tokens"] == []


def test_piped_text_loses_its_trailing_newline(runner: CliRunner) -> None:
    typed = json.loads(_ok(runner.invoke(main, ["--json", "remember", "the same note"])))
    piped = json.loads(_ok(runner.invoke(main, ["--json", "remember"], input="the same note\r\n")))
    assert (piped["id"], piped["created"], piped["duplicate_of"]) == (typed["id"], False, typed["id"])


def test_nul_is_refused_like_http(runner: CliRunner, tmp_path: Path) -> None:
    r = runner.invoke(main, ["remember"], input="a\x00b")
    assert r.exit_code == 1 and "text must not contain NUL characters" in r.output
    r = runner.invoke(main, ["remember", "x", "--metadata", '{"k": "\\u0000"}'])
    assert r.exit_code == 1 and "metadata must not contain NUL" in r.output
    dump = tmp_path / "in.jsonl"
    dump.write_text('{"text": "fine"}\n{"text": "a\\u0000b"}\n{"text": "raw \x00"}\n{"text": ""}\n',
                    encoding="utf-8")
    r = runner.invoke(main, ["--json", "import", str(dump)])
    res = json.loads(r.output.splitlines()[-1])
    assert r.exit_code == 1 and res["imported"] == 1 and res["error_count"] == 3
    assert [(e["line"], "NUL" in e["message"]) for e in res["errors"]] == [(2, True), (3, True), (4, False)]


@pytest.mark.parametrize("args", [["stats"], ["recall", "x"], ["recent"], ["get", "1"], ["export"],
                                  ["check"], ["backup", "b.db"], ["reindex"], ["delete", "1"]])
def test_a_missing_db_is_refused_not_created(runner: CliRunner, tmp_path: Path, args) -> None:
    db = tmp_path / "typo.db"
    r = runner.invoke(main, ["--db", str(db), *args])
    assert r.exit_code == 1 and f"no database at {db}" in r.output
    assert not db.exists()


def test_export_creates_its_directory(runner: CliRunner, tmp_path: Path) -> None:
    _ok(runner.invoke(main, ["remember", "one"]))
    dest = tmp_path / "new" / "dir" / "out.jsonl"
    _ok(runner.invoke(main, ["export", str(dest)]))
    assert len(dest.read_text(encoding="utf-8").splitlines()) == 1


def test_backup_onto_the_live_database_is_refused(runner: CliRunner, tmp_path: Path) -> None:
    db = tmp_path / "live.db"
    _ok(runner.invoke(main, ["--db", str(db), "remember", "precious"]))
    for dest in (db, Path(str(db) + "-wal")):
        r = runner.invoke(main, ["--db", str(db), "backup", str(dest)])
        assert r.exit_code == 1 and "is the live database" in r.output
    out = _ok(runner.invoke(main, ["--db", str(db), "--json", "recent"]))
    assert [m["text"] for m in json.loads(out)["items"]] == ["precious"]


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_with_unknown_total_counts_without_a_total() -> None:
    out = _Tty()
    with cli._Counter("importing", file=out) as bar:
        for _ in range(16):
            bar.update(1)
    text = out.getvalue()
    assert text.endswith("\rimporting: 16\n") and "/" not in text


def test_messages_carry_no_field_suffix(runner: CliRunner) -> None:
    _ok(runner.invoke(main, ["remember", "one"]))
    r = runner.invoke(main, ["get", "17"])
    assert r.exit_code == 1 and r.output.strip() == "Error: no memory with id 17"


@pytest.mark.parametrize("args", [["recall", "x", "--bogus"], ["nosuchcommand"], ["get"], ["get", "abc"],
                                  ["recall", "x", "-m", "fuzzy"]])
def test_usage_errors_are_one_line_and_exit_1(runner: CliRunner, args) -> None:
    r = runner.invoke(main, args)
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "--help" in lines[0]


def test_help_and_version_still_exit_0(runner: CliRunner) -> None:
    assert "Usage:" in _ok(runner.invoke(main, ["recall", "--help"]))
    assert "memento-edge" in _ok(runner.invoke(main, ["--version"]))


def test_port_clash_names_the_port(runner: CliRunner) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        r = runner.invoke(main, ["serve", "--port", str(port)])
    assert r.exit_code == 1
    assert f"cannot listen on http://127.0.0.1:{port}: Address already in use" in r.output
