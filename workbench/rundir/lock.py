"""One trainer per run directory: an OS lock on ``<run_dir>/.lock``, and a little disk space held back.

The lock is ``fcntl.flock`` on a file of the run directory, taken without waiting: a second trainer (another
process, or another Trainer in this one) is refused at once, whichever started first, and the kernel lets
go of the lock when its process dies, however it dies (a SIGKILL leaves no stale lock to clean up). The
file holds the owner's pid, for the refusal's message.

The same file is the run's reserve: ``RESERVE_BYTES`` allocated while the run trains, given back
(:meth:`RunLock.free_reserve`) when a write fails for want of space, so that the run's last words (its
status, its last rows and events) still reach ``run.db`` on a full disk.
"""
from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

LOCK_NAME = ".lock"
RESERVE_BYTES = 256 * 1024
#: errno values that mean "the disk cannot take this write": such a failure ends the run (see Loop)
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG})


class RunBusy(ValueError):
    """The run directory is trained by another trainer (this process or another one)."""


class RunLock:
    """Hold ``run_dir``'s lock until :meth:`release` (or until this process ends)."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            try:
                owner = os.pread(fd, 32, 0).split(b"\0", 1)[0].decode(errors="replace").strip() or "unknown"
            except OSError:
                owner = "unknown"
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            here = " (this process)" if owner == str(os.getpid()) else ""
            raise RunBusy(f"run_dir: {self.run_dir} is being trained by process {owner}{here}; one trainer per run "
                          f"directory. Allowed: watch or steer it (RunView, the dashboard), fork it into a new "
                          f"directory, or resume it once that run has ended") from None
        self._fd: int | None = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.reserved = False
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, RESERVE_BYTES)
                self.reserved = True
        except OSError:  # no room even for the reserve (or no fallocate on this file system): run without it
            pass

    @property
    def held(self) -> bool:
        return self._fd is not None

    def free_reserve(self) -> None:
        """Give the reserved space back to the file system (a write just failed for want of it)."""
        if self._fd is not None and self.reserved:
            self.reserved = False
            try:
                os.ftruncate(self._fd, len(f"{os.getpid()}\n"))
            except OSError:
                pass

    def release(self) -> None:
        """Let another trainer have the directory. Idempotent."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        os.close(fd)  # closing the only descriptor of the open file releases the flock

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter teardown
            pass


def is_storage_error(e: BaseException) -> bool:
    """A write failed because the disk cannot take it (full, quota, read-only, I/O error), not because of a
    bug: such a failure ends the run, since what follows could never be saved."""
    import sqlite3

    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
            return True
        if isinstance(e, sqlite3.OperationalError) and any(
                s in str(e).lower() for s in ("disk is full", "disk i/o error", "readonly database")):
            return True
        if getattr(e, "errno", None) in STORAGE_ERRNOS:  # WriteFailed from the writer process carries it
            return True
        e = e.__cause__ or e.__context__
    return False
