"""The CLI: every command documented, JSON output, errors without tracebacks."""
from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner

from memento_edge.cli import main


def _commands(group: click.Group, prefix=()):
    for name, cmd in group.commands.items():
        yield prefix + (name,), cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, prefix + (name,))


def test_every_command_has_help():
    names = []
    for path, cmd in _commands(main):
        assert cmd.help, f"command {' '.join(path)} has no help"
        result = CliRunner().invoke(main, [*path, "--help"])
        assert result.exit_code == 0, result.output
        names.append(" ".join(path))
    for expected in ("remember", "recall", "get", "update", "delete", "recent", "stats", "export", "import",
                     "backup", "restore", "check", "reindex", "model build", "model info", "serve",
                     "token create"):
        assert expected in names


@pytest.fixture
def fake_cli(monkeypatch):
    """CLI runs with the FakeEmbedder (unit tests only) instead of the real model."""
    from memento_edge import embedder

    monkeypatch.setattr(embedder, "make_embedder", lambda settings, *a, **k: embedder.FakeEmbedder())
    return CliRunner()


def run(runner, *args, input=None):
    result = runner.invoke(main, ["--json", *args], input=input)
    return result


def test_remember_recall_get_update_delete(fake_cli):
    r = run(fake_cli, "remember", "get groceries after work", "-t", "todo", "--importance", "0.8")
    assert r.exit_code == 0, r.output
    mid = json.loads(r.output)["id"]
    r = run(fake_cli, "remember", input="piped text memory\n")
    assert json.loads(r.output)["created"]
    r = run(fake_cli, "recall", "groceries", "--tag", "todo")
    hits = json.loads(r.output)["hits"]
    assert [h["id"] for h in hits] == [mid]
    r = run(fake_cli, "update", str(mid), "--text", "buy milk")
    assert json.loads(r.output)["text"] == "buy milk"
    r = run(fake_cli, "recent", "-n", "1")
    assert json.loads(r.output)["next_cursor"]
    assert run(fake_cli, "delete", str(mid)).exit_code == 0
    r = run(fake_cli, "get", str(mid))
    assert r.exit_code == 1 and "no memory with id" in r.output and "Traceback" not in r.output


def test_recall_min_score_drops_weak_hits(fake_cli):
    run(fake_cli, "remember", "get groceries after work")
    run(fake_cli, "remember", "the faucet drips")
    hits = json.loads(run(fake_cli, "recall", "groceries", "-m", "keyword").output)["hits"]
    assert [h["matched_terms"] for h in hits] == [["groceries"]]
    r = run(fake_cli, "recall", "groceries", "--min-score", "1.0")
    assert all(h["score"] >= 1.0 for h in json.loads(r.output)["hits"])
    r = run(fake_cli, "recall", "groceries", "--min-score", "5")
    assert r.exit_code == 1 and "min_score" in r.output


def test_invalid_input_is_a_clean_error(fake_cli):
    r = run(fake_cli, "remember", "x", "--importance", "3")
    assert r.exit_code == 1 and "importance" in r.output and "Traceback" not in r.output
    r = run(fake_cli, "recall", "x", "--filters", '{"bogus": 1}')
    assert r.exit_code == 1 and "bogus" in r.output


def test_export_import_backup_check(fake_cli, tmp_path):
    for t in ("one", "two", "three"):
        run(fake_cli, "remember", t)
    out = tmp_path / "dump.jsonl"
    assert run(fake_cli, "export", str(out)).exit_code == 0
    assert len(out.read_text().splitlines()) == 3
    other = tmp_path / "other.db"
    r = fake_cli.invoke(main, ["--json", "--db", str(other), "import", str(out)])
    assert json.loads(r.output.splitlines()[-1])["imported"] == 3
    bk = tmp_path / "b.db"
    assert run(fake_cli, "backup", str(bk)).exit_code == 0 and bk.exists()
    r = run(fake_cli, "check")
    assert r.exit_code == 0 and json.loads(r.output)["ok"]
    r = run(fake_cli, "stats")
    assert json.loads(r.output)["memories"] == 3


def test_missing_model_says_how_to_build(tmp_path):
    r = CliRunner().invoke(main, ["--model-dir", str(tmp_path / "nope"), "remember", "hello"])
    assert r.exit_code == 1
    assert "memento-edge model build" in r.output
    r = CliRunner().invoke(main, ["--model-dir", str(tmp_path / "nope"), "model", "info"])
    assert r.exit_code == 1 and "memento-edge model build" in r.output
