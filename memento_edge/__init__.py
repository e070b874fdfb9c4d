"""memento-edge: persistent semantic memory for AI agents, sized for a Raspberry Pi Zero.

>>> from memento_edge import Memory, Settings
>>> with Memory(Settings.load()) as mem:                      # doctest: +SKIP
...     mem.remember("get groceries after work", tags=["todo"])
...     mem.recall("buy food").hits[0].text
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = [
    "Memory", "Settings", "MemoryRecord", "Hit", "RecallResult", "RememberResult", "Page", "ImportResult",
    "MementoError", "InvalidInput", "NotFound", "Conflict", "ModelUnavailable", "ModelMismatch", "StoreError",
    "StorageFull", "Busy", "EmbedTimeout", "__version__",
]

from .config import Settings
from .errors import (
    Busy, Conflict, EmbedTimeout, InvalidInput, MementoError, ModelMismatch, ModelUnavailable, NotFound,
    StorageFull, StoreError,
)


def __getattr__(name: str) -> Any:
    # Memory and its result types import numpy; keep `import memento_edge` (and the CLI's --help) light.
    if name in ("Memory", "MemoryRecord", "Hit", "RecallResult", "RememberResult", "Page", "ImportResult"):
        from . import memory

        return getattr(memory, name)
    raise AttributeError(name)
