"""Per-principal rate limiting: token buckets with bounded memory."""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Callable, Tuple


class RateLimiter:
    """Token buckets keyed by principal (token name or client address), with bounded memory.

    Each key may burst up to ``per_minute`` requests and refills at ``per_minute / 60`` per second.
    At most ``max_keys`` buckets are kept (least recently used evicted): an evicted bucket is simply
    full again, which only matters for a client that is idle - or for one cycling through thousands of
    addresses, which gets fresh buckets either way.
    """

    def __init__(self, per_minute: int, *, max_keys: int = 4096,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: "OrderedDict[str, Tuple[float, float]]" = OrderedDict()  # key -> (tokens, t)
        self._lock = threading.Lock()
        self.limited = 0

    @property
    def enabled(self) -> bool:
        """False when ``rate_limit_per_minute`` is 0."""
        return self.capacity > 0

    def hit(self, key: str) -> float:
        """Take one token for ``key``: 0.0 if allowed, else the seconds until a token is available."""
        if not self.enabled:
            return 0.0
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.pop(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                tokens -= 1.0
                wait = 0.0
            else:
                wait = (1.0 - tokens) / self.rate
                self.limited += 1
            self._buckets[key] = (tokens, now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        return wait

