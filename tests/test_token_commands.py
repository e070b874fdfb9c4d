"""`memento-edge token create | list | revoke | rotate` (#15, finding 4), through click's runner."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from memento_edge.auth import TokenTable, hash_token
from memento_edge.cli import main
from memento_edge.config import Settings


def _create(cfg: Path, name: str, *scopes: str) -> str:
    args = ["--config", str(cfg), "token", "create", "--name", name]
    for s in scopes:
        args += ["--scope", s]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    return r.stdout.strip()


def _table(cfg: Path) -> TokenTable:
    return TokenTable(Settings.load(config_file=str(cfg), env={}).tokens)


def test_list_shows_names_and_scopes_never_digests(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    r = CliRunner().invoke(main, ["--config", str(cfg), "--json", "token", "list"])
    assert r.exit_code == 0 and json.loads(r.output)["tokens"] == []
    secret = _create(cfg, "agent-7", "read", "write")
    _create(cfg, "backup", "admin")
    r = CliRunner().invoke(main, ["--config", str(cfg), "token", "list", "--json"])
    data = json.loads(r.output)
    assert data["tokens"] == [{"name": "agent-7", "scopes": ["read", "write"]},
                              {"name": "backup", "scopes": ["admin"]}]
    assert hash_token(secret) not in r.output and secret not in r.output
    human = CliRunner().invoke(main, ["--config", str(cfg), "--no-json", "token", "list"]).output
    assert "agent-7" in human and "read, write" in human


def test_revoke_removes_only_that_token(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    s1, s2 = _create(cfg, "one", "read"), _create(cfg, "two", "read")
    r = CliRunner().invoke(main, ["--config", str(cfg), "--no-json", "token", "revoke", "one"])
    assert r.exit_code == 0 and r.output.strip() == f"token 'one' removed from {cfg}"
    table = _table(cfg)
    assert table.verify(s1) is None and table.verify(s2).name == "two"
    r = CliRunner().invoke(main, ["--config", str(cfg), "token", "revoke", "one"])
    assert r.exit_code == 1 and "no token named 'one'" in r.output


def test_rotate_keeps_name_and_scopes_with_a_new_secret(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    old = _create(cfg, "agent-7", "read", "admin")
    r = CliRunner().invoke(main, ["--config", str(cfg), "token", "rotate", "agent-7"])
    assert r.exit_code == 0, r.output
    new = r.stdout.strip()
    assert new.startswith("mem_") and new != old
    table = _table(cfg)
    assert table.verify(old) is None
    principal = table.verify(new)
    assert principal.name == "agent-7" and principal.scopes == {"read", "admin"}
    r = CliRunner().invoke(main, ["--config", str(cfg), "token", "rotate", "nobody"])
    assert r.exit_code == 1 and "no token named 'nobody'" in r.output


def test_permission_denied_hints_at_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The write fails as it does for a non-root user on /etc (simulated: the tests may run as root)."""
    from memento_edge import auth

    def denied(path: Path, text: str) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(auth, "_write_atomic", denied)
    cfg = tmp_path / "config.yaml"
    for args in (["token", "create", "--name", "x"], ["token", "revoke", "x"], ["token", "rotate", "x"]):
        if args[1] != "create":
            cfg.write_text("tokens:\n- {name: x, sha256: " + "0" * 64 + ", scopes: [read]}\n")
        _check_hint(CliRunner().invoke(main, ["--config", str(cfg), *args]), cfg)


def _check_hint(result, cfg: Path) -> None:
    assert result.exit_code == 1
    line = result.output.strip()
    assert line.startswith(f"Error: cannot write {cfg}: permission denied") and "--config FILE" in line



def test_unreadable_config_hints_at_sudo_or_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-root user on the appliance may not even look into /etc/memento-edge (root:memento-edge 0750;
    simulated: the tests may run as root). Every command, token ones included, says what to do instead of a
    bare "[Errno 13]", and none falls back to the user's own file (tokens the service would never see)."""
    from memento_edge import config

    system = tmp_path / "etc" / "memento-edge" / "config.yaml"
    system.parent.mkdir(parents=True)
    system.write_text("tokens: []\n", encoding="utf-8")
    monkeypatch.setattr(config, "DEFAULT_CONFIG_FILE", str(system))
    monkeypatch.setattr(config, "venv_config_file", lambda: None)
    monkeypatch.setattr(config, "_is_root", lambda: False)
    monkeypatch.delenv("MEMENTO_CONFIG", raising=False)
    real_stat = Path.stat

    def stat(self: Path, **kwargs: object):  # what stat() answers inside a directory we may not search
        if self == system:
            raise PermissionError(13, "Permission denied", str(self))
        return real_stat(self, **kwargs)

    monkeypatch.setattr(Path, "stat", stat)
    for args in (["token", "list"], ["token", "create", "--name", "x"], ["stats"], ["config"]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 1, r.output
        line = r.output.strip()
        assert line == (f"Error: cannot read config file {system}: permission denied. Run as root (sudo), or "
                        "name a file you can read with --config FILE (or MEMENTO_CONFIG)")
    assert not config.user_config_file().exists()
