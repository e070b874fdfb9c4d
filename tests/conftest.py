"""Shared fixtures: every test gets its own state directory; nothing touches the real home."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


def real_model_dir() -> Path:
    """The real int8 model used by `real_model` tests (MEMENTO_TEST_MODEL_DIR or <repo>/models/minilm-int8)."""
    return Path(os.environ.get("MEMENTO_TEST_MODEL_DIR") or REPO / "models" / "minilm-int8")


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path, monkeypatch):
    """Point every MEMENTO_* path at a temporary directory (habit 6: every state path is redirectable)."""
    home = tmp_path / "home"
    monkeypatch.setenv("MEMENTO_HOME", str(home))
    monkeypatch.setenv("MEMENTO_CONFIG", "")
    for var in ("MEMENTO_DB", "MEMENTO_MODEL_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    # Not the config scripts/setup leaves in .venv either: a test names the settings it wants.
    from memento_edge import config

    monkeypatch.setattr(config, "venv_config_file", lambda: None)
    yield


@pytest.fixture
def settings(tmp_path):
    from memento_edge.config import Settings

    return Settings.load(env={"MEMENTO_HOME": str(tmp_path / "home")})


@pytest.fixture
def fake_memory(settings):
    """A Memory on a temp database with the deterministic FakeEmbedder (unit tests only)."""
    from memento_edge.embedder import FakeEmbedder
    from memento_edge.memory import Memory

    with Memory(settings, embedder=FakeEmbedder()) as mem:
        yield mem


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The real model directory; a missing one fails the test with the command that builds it."""
    path = real_model_dir()
    if not (path / "manifest.json").exists():
        pytest.fail(f"real model missing at {path}: run scripts/build-model (or set MEMENTO_TEST_MODEL_DIR)")
    return path


@pytest.fixture
def real_memory(tmp_path, model_dir):
    """A Memory on a temp database with the real int8 model."""
    from memento_edge.config import Settings
    from memento_edge.memory import Memory

    s = Settings.load(env={"MEMENTO_HOME": str(tmp_path / "home"), "MEMENTO_MODEL_DIR": str(model_dir)})
    with Memory(s) as mem:
        yield mem
