"""Domain errors raised by the library.

Only the edges (``cli.py`` and ``web/``) translate these into exit codes or HTTP responses; nothing
below ``memory.py`` knows about click or Flask.
"""
from __future__ import annotations

from typing import Optional


class MementoError(Exception):
    """Base class of every error memento-edge raises on purpose.

    ``code`` is a stable machine-readable identifier (used in the JSON error body of the web API).
    """

    code = "memento_error"

    def __init__(self, message: str, *, field: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidInput(MementoError):
    """The caller passed something the library refuses (names the offending ``field``)."""

    code = "invalid_input"


class NotFound(MementoError):
    """No memory with the requested id."""

    code = "not_found"


class Conflict(MementoError):
    """The request conflicts with the stored state (e.g. an idempotency key reused with another body)."""

    code = "conflict"


class ModelUnavailable(MementoError):
    """The embedding model is missing, unverifiable or failed to load."""

    code = "model_unavailable"


class ModelMismatch(MementoError):
    """The database was embedded with a different model; ``memento-edge reindex`` re-embeds it."""

    code = "model_mismatch"


class StoreError(MementoError):
    """The database cannot be opened or used (corrupt file, not a memento-edge database, ...)."""

    code = "store_error"


class StorageFull(StoreError):
    """The disk is full: nothing was written."""

    code = "storage_full"


class Busy(MementoError):
    """The service is temporarily unable to take more work (memory pressure, lock timeout).

    ``retry_after`` is a hint in seconds.
    """

    code = "busy"

    def __init__(self, message: str, *, retry_after: float = 1.0, field: Optional[str] = None) -> None:
        super().__init__(message, field=field)
        self.retry_after = retry_after


class EmbedTimeout(Busy):
    """An embedding did not finish within the configured time."""

    code = "timeout"
