"""Helpers for the web-layer tests: an app around a temp database and the FakeEmbedder.

Import what a test module needs (``from webfixtures import WebEnv, make_env, ...``). The fixtures are
registered under the names ``web`` and ``authed`` when a test module imports ``web_fixture`` /
``authed_fixture`` into its namespace (only the root conftest may declare ``pytest_plugins``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest

from memento_edge.auth import create_token
from memento_edge.config import Settings
from memento_edge.embedder import FakeEmbedder
from memento_edge.errors import ModelUnavailable
from memento_edge.memory import Memory
from memento_edge.web import create_app


_MISSING = "model missing at /nowhere: run `memento-edge model build`"


class MissingModelEmbedder(FakeEmbedder):
    """A FakeEmbedder whose model directory "is missing": fingerprint and embeds raise ModelUnavailable."""

    def __init__(self) -> None:
        super().__init__(fail_with=ModelUnavailable(_MISSING))

    @property
    def fingerprint(self) -> str:
        raise ModelUnavailable(_MISSING)


class WebEnv:
    """An app, its test client, its Memory and (optionally) tokens by scope name."""

    def __init__(self, home: Path, *, embedder: Any = None, tokens: Optional[Dict[str, List[str]]] = None,
                 **overrides: Any) -> None:
        self.tokens: Dict[str, str] = {}
        entries = []
        for name, scopes in (tokens or {}).items():
            plain, entry = create_token(name, scopes)
            self.tokens[name] = plain
            entries.append(entry)
        self.settings = Settings(home=str(home), tokens=entries, **overrides)
        self.embedder = embedder if embedder is not None else FakeEmbedder()
        self.memory = Memory(self.settings, embedder=self.embedder)
        self.app = create_app(self.settings, self.memory)
        self.client = self.app.test_client()

    def auth(self, name: str) -> Dict[str, str]:
        """Authorization header of the token called ``name``."""
        return {"Authorization": f"Bearer {self.tokens[name]}"}

    def close(self) -> None:
        """Close the database."""
        self.memory.close()


def make_env(tmp_path: Path, **kwargs: Any) -> WebEnv:
    """A WebEnv in a fresh subdirectory of ``tmp_path`` (several per test are fine)."""
    n = len(list(tmp_path.glob("web-*")))
    return WebEnv(tmp_path / f"web-{n}", **kwargs)


ALL_TOKENS = {"reader": ["read"], "writer": ["write"], "rw": ["read", "write"], "admin": ["admin"]}


@pytest.fixture(name="web")
def web_fixture(tmp_path: Path) -> Iterator[WebEnv]:
    """No tokens configured, loopback: the open local-only setup."""
    env = make_env(tmp_path)
    yield env
    env.close()


@pytest.fixture(name="authed")
def authed_fixture(tmp_path: Path) -> Iterator[WebEnv]:
    """Tokens configured: reader (read), writer (write), rw (read+write), admin (admin)."""
    env = make_env(tmp_path, tokens=ALL_TOKENS)
    yield env
    env.close()
