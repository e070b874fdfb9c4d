"""Waitress, hardened against connection exhaustion (issue #14, item 3).

Waitress stops accepting once ``connection_limit`` sockets are open and closes a socket only after
``channel_timeout`` seconds without a byte. So 30 slowloris sockets (one header byte a second, never idle)
or 40 idle keep-alives locked every other client out for as long as the attacker liked. This server adds:

* a deadline for an incomplete request: its headers must arrive within ``header_timeout`` seconds and the
  whole request within ``4 x header_timeout`` (whatever the trickle rate);
* a cap on the sockets one client address may hold (``connections_per_client``): a new socket beyond it
  is closed at once;
* under pressure (3/4 of ``connection_limit`` open), idle keep-alive sockets are closed after a couple of
  seconds instead of ``channel_timeout`` (HTTP clients reopen a closed keep-alive transparently);
* the "Task queue depth" warning, logged once per queued request, at most once a minute.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Dict, Optional

from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.server import MultiSocketServer, TcpWSGIServer
from waitress.task import ThreadedTaskDispatcher

log = logging.getLogger(__name__)

PRESSURE = 0.75          # share of connection_limit from which idle keep-alives are closed early
PRESSURE_IDLE_S = 2.0    # how long an idle keep-alive may stay open under pressure
CLEANUP_INTERVAL_S = 1   # how often the deadlines are checked (waitress's default is 30 s)
BODY_DEADLINE_FACTOR = 4


class _GuardedChannel(HTTPChannel):
    """An HTTP channel that remembers when the request it is reading began."""

    request_started: Optional[float] = None

    def received(self, data: bytes) -> bool:
        before = self.request
        done: bool = super().received(data)
        if self.request is None:
            self.request_started = None
        elif self.request is not before or self.request_started is None:
            self.request_started = time.time()
        return done


class _GuardedServer(TcpWSGIServer):
    """A TCP server with per-request deadlines, a per-address cap and idle eviction under pressure."""

    channel_class = _GuardedChannel
    header_timeout = 10.0
    per_client = 16

    def maintenance(self, now: float) -> None:
        super().maintenance(now)
        crowded = len(self.active_channels) >= PRESSURE * self.adj.connection_limit
        for channel in list(self.active_channels.values()):
            if channel.requests or channel.will_close:
                continue  # being served, or already closing
            started = getattr(channel, "request_started", None)
            if started is not None:
                headers_done = bool(getattr(channel.request, "headers_finished", False))
                deadline = self.header_timeout * (BODY_DEADLINE_FACTOR if headers_done else 1)
                if now - started > deadline:
                    channel.will_close = True
            elif crowded and channel.last_activity < now - PRESSURE_IDLE_S:
                channel.will_close = True

    def handle_accept(self) -> None:
        try:
            accepted = self.accept()
            if accepted is None:
                return
            conn, addr = accepted
            self.set_socket_options(conn)
        except OSError:
            return  # the peer went away before we got to it (waitress does the same)
        addr = self.fix_addr(addr)
        host = addr[0] if isinstance(addr, tuple) else addr
        held = sum(1 for ch in self.active_channels.values() if _host_of(ch) == host)
        if held >= self.per_client:
            _too_many.warn(host, held)
            conn.close()
            return
        self.channel_class(self, conn, addr, self.adj, map=self._map)


def _host_of(channel: Any) -> Any:
    addr = getattr(channel, "addr", None)
    return addr[0] if isinstance(addr, tuple) else addr


class _RateLimitedWarning:
    """Log a warning at most once per ``every`` seconds, saying how many were held back."""

    def __init__(self, every: float = 60.0) -> None:
        self.every = every
        self._last = 0.0
        self._held = 0

    def warn(self, host: Any, held: int) -> None:
        now = time.monotonic()
        if now - self._last < self.every:
            self._held += 1
            return
        log.warning("refused a connection from %s: it already holds %d (connections_per_client); "
                    "%d more refusals since the last warning", host, held, self._held)
        self._last, self._held = now, 0


_too_many = _RateLimitedWarning()


class QueueDepthFilter(logging.Filter):
    """Let waitress's "Task queue depth is N" through at most once per ``every`` seconds.

    Waitress logs it for every request queued behind busy workers: 6,495 lines in two minutes of load.
    """

    def __init__(self, every: float = 60.0) -> None:
        super().__init__()
        self.every = every
        self._last = -every
        self._held = 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        if now - self._last < self.every:
            self._held += 1
            return False
        if self._held:
            record.msg = f"{record.msg} ({self._held} such warnings in the last minute held back)"
        self._last, self._held = now, 0
        return True


def install_queue_warning_filter() -> None:
    """Attach one :class:`QueueDepthFilter` to waitress's queue logger (idempotent)."""
    logger = logging.getLogger("waitress.queue")
    if not any(isinstance(f, QueueDepthFilter) for f in logger.filters):
        logger.addFilter(QueueDepthFilter())


def create_guarded_server(app: Any, *, header_timeout: float, connections_per_client: int,
                          **adjustments: Any) -> Any:
    """Like ``waitress.create_server`` for TCP listeners, with the guards above."""
    adjustments.setdefault("cleanup_interval", CLEANUP_INTERVAL_S)
    adj = Adjustments(**adjustments)
    dispatcher = ThreadedTaskDispatcher()
    dispatcher.set_thread_count(adj.threads)
    install_queue_warning_filter()
    socket_map: Dict[int, Any] = {}
    servers = []
    for sockinfo in adj.listen:
        server = _GuardedServer(app, socket_map, True, None, dispatcher=dispatcher, adj=adj, sockinfo=sockinfo)
        server.header_timeout = float(header_timeout)
        server.per_client = int(connections_per_client)
        servers.append(server)
    if len(servers) == 1:
        return servers[0]
    listen = [(s.effective_host, s.effective_port) for s in servers]
    return MultiSocketServer(socket_map, adj, listen, dispatcher)
