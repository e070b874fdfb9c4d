"""Is the wall clock trustworthy? A board without a real-time clock says "no" until NTP answers.

A Pi Zero has no RTC. After a power cut systemd-timesyncd restarts the clock from the time it last saved
(hours or days behind) and keeps it there until a time server answers, which never happens while the Wi-Fi
is down. Memories stored in that window would carry a wrong ``created_at``. So every write asks a
:class:`ClockSource` for a :class:`ClockReading`: the wall time, whether it is trusted, and a monotonic
reference (``CLOCK_BOOTTIME`` plus the kernel's boot id). Rows written while the clock is untrusted keep
that reference; once the clock is trusted again *in the same boot* the orchestrator re-dates them exactly
(wall now minus the boot time elapsed since). Rows whose boot ended before sync stay flagged: there is no
honest way to date them, so we never guess.

Modes (setting ``clock``):

- ``auto`` (default): trusted when systemd-timesyncd reports synchronisation; when timesyncd is not
  running, the kernel's ``adjtimex`` status decides when it says "synchronised" (chrony, ntpd), and
  otherwise (a laptop without NTP, macOS, a container) the clock is *assumed* trusted and
  :meth:`SystemClock.state` says so.
- ``trusted``: a board with a battery-backed RTC, or an owner who sets the clock by hand.
- ``untrusted``: never trust the wall clock (tests, demos of the guard).
"""
from __future__ import annotations

import ctypes
import functools
import ctypes.util
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Protocol

CLOCK_MODES = ("auto", "trusted", "untrusted")

# systemd-timesyncd creates this file once it has synchronised the clock (systemd >= 239); its directory
# exists whenever timesyncd has run in this boot.
TIMESYNC_FLAG = Path("/run/systemd/timesync/synchronized")
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


@dataclass(frozen=True)
class ClockReading:
    """One look at the clocks: wall time (seconds since the epoch), trust, and the monotonic reference."""

    wall: float
    trusted: bool
    boot_id: Optional[str]
    boot_ns: Optional[int]


class ClockSource(Protocol):
    """What the orchestrator needs from a clock (tests inject their own)."""

    def read(self) -> ClockReading:
        """The current reading."""
        ...

    def state(self) -> Dict[str, Any]:
        """A JSON-ready description for ``stats`` / ``/readyz`` (``trusted``, ``source``, ``mode``)."""
        ...


def _boot_ns() -> Optional[int]:
    # CLOCK_BOOTTIME keeps counting through suspend, unlike CLOCK_MONOTONIC; both are immune to clock steps.
    clock = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime_ns(clock) if clock is not None else None


def _boot_id() -> Optional[str]:
    try:
        return BOOT_ID.read_text(encoding="ascii").strip() or None
    except OSError:
        return None


class _Timex(ctypes.Structure):
    # struct timex from <sys/timex.h>: only the leading fields are read; the tail is padding big enough
    # for every architecture's layout (the kernel writes at most sizeof(struct timex) bytes).
    _fields_ = [("modes", ctypes.c_uint), ("_rest", ctypes.c_byte * 512)]


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    # find_library runs `ldconfig -p` in a child process: once per process, not once per recall.
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _kernel_synchronised() -> Optional[bool]:
    """``adjtimex`` state: True synced, False unsynchronised (TIME_ERROR), None when it cannot be asked."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = _libc()
        tx = _Timex()
        state = libc.adjtimex(ctypes.byref(tx))  # modes = 0: read only, needs no privilege
    except (OSError, AttributeError):
        return None
    if state < 0:
        return None
    return state != 5  # TIME_ERROR: the kernel's clock is not synchronised (STA_UNSYNC)


class SystemClock:
    """The host's clock, judged as the module docstring describes."""

    def __init__(self, mode: str = "auto", *, timesync_flag: Path = TIMESYNC_FLAG) -> None:
        if mode not in CLOCK_MODES:
            raise ValueError(f"clock must be one of {', '.join(CLOCK_MODES)}")
        self.mode = mode
        self._flag = timesync_flag
        self._boot = _boot_id()

    def _judge(self) -> "tuple[bool, str]":
        if self.mode == "trusted":
            return True, "setting"
        if self.mode == "untrusted":
            return False, "setting"
        if self._flag.parent.is_dir():
            return self._flag.exists(), "systemd-timesyncd"
        kernel = _kernel_synchronised()
        if kernel:
            return True, "kernel"
        # Neither timesyncd nor a kernel NTP discipline: nothing can tell us, so do not flag every memory
        # of a laptop or container; ``state()`` says the trust is assumed.
        return True, "assumed"

    def read(self) -> ClockReading:
        """Wall time, trust and monotonic reference, read together."""
        trusted, _ = self._judge()
        return ClockReading(wall=time.time(), trusted=trusted, boot_id=self._boot, boot_ns=_boot_ns())

    def state(self) -> Dict[str, Any]:
        """``{"trusted": bool, "source": ..., "mode": ...}``; source ``assumed`` means nothing could tell."""
        trusted, source = self._judge()
        return {"trusted": trusted, "source": source, "mode": self.mode}

