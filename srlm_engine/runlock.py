"""One job per run folder: RUN/.lock, held with flock(2) for the job's lifetime.

The kernel drops an flock when its holder dies, however it dies, so a lock left by a killed job is
never stale in the kernel's eyes: the next job takes it over at once. The file keeps the holder's
host and pid, for the message a second job gets and for the note a job that takes over prints.
Under torchrun, rank 0 holds it; the loop tells the other ranks whether it got it (loop.py).
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path


class RunLocked(RuntimeError):
    """Another live job holds the run folder."""


class RunLock:
    def __init__(self, root: Path):
        self.path = Path(root) / ".lock"
        self._fd: int | None = None
        self.previous: dict | None = None  # what a dead job left in the file, if anything

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise RunLocked(f"{self.path.parent} is held by another job (host {holder.get('host', '?')}, pid "
                            f"{holder.get('pid', '?')}, since {holder.get('since', '?')}); wait for it to end, "
                            f"or use another --out folder") from None
        self.previous = _read(fd) or None
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # a clean end leaves no holder to report
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        return {}
