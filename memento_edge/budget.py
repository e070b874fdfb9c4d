"""Embedding work budget: how much embedding a request may ask for, and how much may run at once.

Embedding is the expensive part of a write (a ~256-token text costs ~2.5 s on a Pi Zero). Four valid
batches of 1,000 x 8,000 characters once kept every worker busy for minutes and pushed the service past
its memory ceiling. Work is counted in *estimated tokens* (what the model will actually process: a text's
length in characters / 4, capped at the model's ``max_tokens``):

* a request estimated above the budget is refused (``InvalidInput``: split the batch);
* work that does not fit next to what is already running waits briefly, then is shed
  (``Busy``: 503 with Retry-After) - before it costs anything;
* recall queries (at most 1,000 characters) do not take from the budget, so recall stays responsive.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterable, Iterator

from .errors import Busy, InvalidInput

CHARS_PER_TOKEN = 4   # WordPiece on English prose: ~4 characters per token
SPECIAL_TOKENS = 2    # [CLS] and [SEP]


def estimate_tokens(texts: Iterable[str], max_tokens: int) -> int:
    """Tokens the model will process for ``texts`` (each truncated at ``max_tokens``), estimated."""
    return sum(min(max_tokens, len(t) // CHARS_PER_TOKEN + SPECIAL_TOKENS) for t in texts)


class WorkBudget:
    """A counting semaphore of embedding tokens in flight (thread-safe)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self.in_flight = 0
        self.shed = 0
        self._cond = threading.Condition()

    def saturated(self) -> bool:
        """At least half the budget is taken: a large new request would very likely be shed."""
        with self._cond:
            return self.in_flight * 2 >= self.capacity

    @contextmanager
    def take(self, tokens: int, *, wait: float, field: str = "items") -> Iterator[None]:
        """Hold ``tokens`` of the budget for the block; waits up to ``wait`` s for room, else Busy."""
        if tokens > self.capacity:
            raise InvalidInput(f"this request needs about {tokens:,} tokens of embedding; the limit per request "
                               f"is {self.capacity:,} (work_token_budget): split it into smaller batches",
                               field=field)
        deadline = time.monotonic() + wait
        with self._cond:
            while self.in_flight and self.in_flight + tokens > self.capacity:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.shed += 1
                    raise Busy("the server is busy embedding other writes; retry shortly", retry_after=5.0)
                self._cond.wait(left)
            self.in_flight += tokens
        try:
            yield
        finally:
            with self._cond:
                self.in_flight -= tokens
                self._cond.notify_all()
