"""Which config file the CLI reads and writes when none is named (#15, findings 2 and 4)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from memento_edge import config
from memento_edge.cli import main


@pytest.fixture
def places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A virtualenv file, a user file and a system file, none existing yet; the caller is not root."""
    venv = tmp_path / "venv" / "etc" / "memento-edge" / "config.yaml"
    user = tmp_path / "config" / "memento-edge" / "config.yaml"  # conftest points XDG_CONFIG_HOME here
    system = tmp_path / "etc" / "memento-edge" / "config.yaml"
    monkeypatch.setattr(config, "venv_config_file", lambda: venv)
    monkeypatch.setattr(config, "DEFAULT_CONFIG_FILE", str(system))
    monkeypatch.setattr(config, "_is_root", lambda: False)
    monkeypatch.delenv("MEMENTO_CONFIG")
    return venv, user, system


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_search_order_venv_then_user_then_system(places) -> None:
    venv, user, system = places
    assert config.config_search_path() == [venv, user, system]
    assert config.default_config_file() == user  # nothing exists: a non-root user's own file
    _write(system, "port: 9001\n")
    assert config.default_config_file() == system
    _write(user, "port: 9002\n")
    assert config.Settings.load().port == 9002
    _write(venv, "port: 9003\n")
    s = config.Settings.load()
    assert (s.port, s.config_file) == (9003, str(venv))  # only one file is read: the first found


def test_root_skips_the_user_file(places, monkeypatch: pytest.MonkeyPatch) -> None:
    venv, user, system = places
    monkeypatch.setattr(config, "_is_root", lambda: True)
    _write(user, "port: 9002\n")
    assert config.config_search_path() == [venv, system]
    assert config.default_config_file() == system


def test_user_file_honours_xdg_config_home(tmp_path: Path) -> None:
    assert config.user_config_file({"XDG_CONFIG_HOME": str(tmp_path)}) == tmp_path / "memento-edge" / "config.yaml"


def test_cli_reads_the_model_dir_from_the_venv_file(places, tmp_path: Path) -> None:
    venv, _user, _system = places
    _write(venv, f"model_dir: '{tmp_path / 'models' / 'minilm-int8'}'\n")
    r = CliRunner().invoke(main, ["--json", "config"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["model_path"] == str(tmp_path / "models" / "minilm-int8")
    assert data["config_file"] == str(venv)


def test_token_create_writes_the_file_the_cli_reads(places) -> None:
    venv, user, _system = places
    r = CliRunner().invoke(main, ["token", "create", "--name", "agent-7"])
    assert r.exit_code == 0, r.output
    assert "agent-7" in user.read_text(encoding="utf-8")  # no file yet: the user's, not /etc
    _write(venv, "model_dir: /m\n")
    r = CliRunner().invoke(main, ["token", "create", "--name", "agent-8"])
    assert r.exit_code == 0, r.output
    assert "agent-8" in venv.read_text(encoding="utf-8") and "agent-8" not in user.read_text(encoding="utf-8")
