"""Packaging and setup without noise (#15, finding 6): a warning-free wheel with its data files, a setup
that installs every tool the tests use and leaves the CLI a config naming the model it built (finding 2)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_builds_without_setuptools_warnings_and_holds_its_data(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "memento_edge", src / "memento_edge", ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path / "dist"),
                           str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    noise = [line for line in (proc.stdout + proc.stderr).splitlines()
             if re.search(r"Warning\b|deprecated|absent from", line)]
    assert noise == []
    (wheel,) = (tmp_path / "dist").glob("memento_edge-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.relative_to(src).as_posix() for p in (src / "memento_edge").rglob("*") if p.is_file()}
    assert shipped and shipped <= names  # every module, subpackage, template and static file
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata


def test_setup_installs_every_tool_the_tests_use() -> None:
    """`scripts/setup --test` apt-installs chromium and shellcheck when missing, so nothing skips."""
    script = (REPO / "scripts" / "setup").read_text(encoding="utf-8")
    test_block = script.split('if [[ $want_test -eq 1 ]]; then', 1)[1].split("\nfi", 1)[0]
    for tool in ("chromium", "shellcheck"):
        assert f"command -v {tool} >/dev/null || apt_pkgs+=({tool})" in test_block


def test_the_venv_cli_finds_the_model_setup_built(tmp_path: Path) -> None:
    """No --model-dir, no MEMENTO_*: `.venv/bin/memento-edge` reads the config setup left in .venv."""
    cli = REPO / ".venv" / "bin" / "memento-edge"
    venv_config = REPO / ".venv" / "etc" / "memento-edge" / "config.yaml"
    assert venv_config.is_file(), "run scripts/setup (it writes .venv/etc/memento-edge/config.yaml)"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMENTO_")}
    env.update({"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "config"),
                "XDG_DATA_HOME": str(tmp_path / "data")})
    proc = subprocess.run([str(cli), "--json", "config"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["config_file"] == str(venv_config)
    assert Path(data["model_path"]).resolve() == (REPO / "models" / "minilm-int8").resolve()
