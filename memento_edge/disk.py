"""The disk under the database: free space, read-only mounts, and the lock that keeps `restore` away
from a database another process has open.

No SQL here (that is ``store.py``); these are the file-system facts the store, readiness and restore act on.
"""
from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from .errors import Busy, StoreError

# Below this much free space (for an unprivileged writer) the disk counts as full: SQLite needs room for
# the WAL, a checkpoint and the -shm file, and a half-written backup helps nobody.
MIN_FREE_BYTES = 1 << 20
DISK_FULL = "the disk is full"
READ_ONLY = "the file system is read-only"


def disk_state(directory: Path) -> Dict[str, Any]:
    """Free and total bytes of the file system holding ``directory``, and whether it can take writes.

    ``problem`` is None, :data:`DISK_FULL` or :data:`READ_ONLY`. Uses ``statvfs`` only: it writes nothing
    (a readiness probe polled every few seconds must not wear the SD card).
    """
    try:
        st = os.statvfs(str(directory))
    except OSError as exc:
        return {"free_bytes": None, "total_bytes": None, "problem": f"cannot inspect {directory}: {exc.strerror}"}
    free = st.f_bavail * st.f_frsize
    problem = None
    if st.f_flag & os.ST_RDONLY:
        problem = READ_ONLY
    elif free < MIN_FREE_BYTES:
        problem = DISK_FULL
    return {"free_bytes": free, "total_bytes": st.f_blocks * st.f_frsize, "problem": problem}


def disk_problem(directory: Path) -> Optional[str]:
    """Why the file system holding ``directory`` cannot take writes (None when it can)."""
    problem = disk_state(directory)["problem"]
    return problem if problem in (DISK_FULL, READ_ONLY) else None


def lock_path(db_path: Path) -> Path:
    """The lock file beside a database (the database file itself is SQLite's to lock)."""
    return db_path.with_name(db_path.name + ".lock")


class DatabaseLock:
    """A ``flock`` on ``<db>.lock``: every open store holds it shared, ``restore`` takes it exclusively.

    A separate file, because closing any other descriptor of the database file would drop SQLite's own
    POSIX locks. The kernel releases a flock when its process dies, so a crash never leaves it stale.
    """

    def __init__(self, db_path: Path) -> None:
        self.path = lock_path(db_path)
        self._fd: Optional[int] = None

    def acquire_shared(self, timeout: float) -> bool:
        """Hold the lock shared (waits up to ``timeout`` s while a restore runs); False when the lock
        file cannot exist (read-only disk: nobody can restore onto it either)."""
        fd = self._open()
        if fd is None:
            return False
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                self._fd = fd
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise Busy(f"{self.path.with_suffix('')} is being restored from a backup; retry when "
                               "the restore has finished", retry_after=5.0) from None
                time.sleep(0.05)

    def acquire_exclusive(self) -> None:
        """Hold the lock exclusively, or raise StoreError naming the processes that have the database open."""
        fd = self._open(create=True)
        assert fd is not None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pids = _holders(fd)
            os.close(fd)
            who = f" (pid {', '.join(map(str, pids))})" if pids else ""
            raise StoreError(f"the database is open in another memento-edge process{who}: stop the service "
                             "(systemctl stop memento-edge) and any running command, then restore") from None
        self._fd = fd

    def release(self) -> None:
        """Give the lock back (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open(self, create: bool = True) -> Optional[int]:
        try:
            return os.open(str(self.path), os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
        except OSError as exc:
            if exc.errno in (errno.EROFS, errno.ENOSPC, errno.EACCES):
                try:
                    return os.open(str(self.path), os.O_RDONLY)
                except OSError:
                    return None
            raise StoreError(f"cannot open the lock file {self.path}: {exc.strerror}") from None


def _holders(fd: int) -> List[int]:
    """Pids holding a flock on ``fd``'s file (from /proc/locks; empty where that is unavailable)."""
    st = os.fstat(fd)
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids: List[int] = []
    try:
        with open("/proc/locks", encoding="ascii") as fh:
            for line in fh:
                parts = line.split()
                # "1: FLOCK  ADVISORY  READ 1234 08:01:5678 0 EOF" (blocked waiters carry a "->" field)
                if "->" in parts or len(parts) < 6 or parts[1] != "FLOCK":
                    continue
                if parts[5] == want:
                    pids.append(int(parts[4]))
    except (OSError, ValueError):
        return []
    return sorted(set(pids))
