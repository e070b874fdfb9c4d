"""Documentation stays in step with the code (habit 7: documented by construction)."""
from __future__ import annotations

from pathlib import Path

from memento_edge.config import SETTINGS, settings_markdown

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def test_every_setting_is_in_the_readme_table():
    for s in SETTINGS:
        assert f"| `{s.name}` |" in README, f"setting {s.name} missing from README"
        assert s.help, s.name


def test_readme_settings_table_is_the_generated_one():
    """The README's table is exactly what the one table of settings generates (defaults and help included)."""
    table = settings_markdown()
    assert table in README, (
        "README's settings table differs from memento_edge.config.SETTINGS; regenerate it with\n"
        "  .venv/bin/python -c 'from memento_edge.config import settings_markdown as m; print(m(), end=\"\")'\n"
        + table)


def test_readme_starts_with_the_two_commands():
    head = README[:1500]
    assert "./scripts/setup && .venv/bin/memento-edge" in head
    assert "./scripts/test" in head


def test_ci_runs_the_readme_test_command():
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert "scripts/test" in ci
