"""The single-writer lock shared by every process that writes one graph directory.

An exclusive `flock` on ``writer.lock``. The holder writes its pid into the file after acquiring,
so a process that gives up waiting can say who is in the way. (filelock opens its lock file with
O_TRUNC, which would erase that note each time a waiter retries, hence plain fcntl.)
The kernel drops a flock when its holder dies, so a killed writer never leaves the graph locked.

Waiting is a *blocking* flock in a helper thread, not a sleep-and-retry loop: the kernel wakes a
blocked waiter the moment the holder unlocks, while a polling waiter almost always wakes up after
a busy writer has already taken the lock again and starves until it times out.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
from pathlib import Path
from types import TracebackType

from .errors import LockTimeoutError
from .models import utc_now


class _Waiter:
    """A blocking flock on its own open file description, in a daemon thread.

    Its own description (not a dup) matters: if the caller gives up, a late acquisition here must
    not be confused with, or release, a lock the caller took some other way.
    """

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        self.done = threading.Event()
        self.acquired = False
        self.cancelled = False
        self.error: OSError | None = None
        self._mutex = threading.Lock()
        threading.Thread(target=self._run, name="memory-graph-lock-waiter", daemon=True).start()

    def _run(self) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError as exc:
            self.error = exc
            os.close(self.fd)
            self.done.set()
            return
        with self._mutex:
            if self.cancelled:  # the caller timed out meanwhile: let the next writer in
                fcntl.flock(self.fd, fcntl.LOCK_UN)
                os.close(self.fd)
            else:
                self.acquired = True
        self.done.set()

    def wait(self, timeout: float) -> bool:
        self.done.wait(timeout)
        with self._mutex:
            if not self.acquired:
                self.cancelled = True
            return self.acquired


class WriterLock:
    def __init__(self, path: Path, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self._fd: int | None = None
        self._held = False

    @property
    def held(self) -> bool:
        return self._held

    def acquire(self, timeout: float | None = None) -> None:
        timeout = self.timeout if timeout is None else timeout
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            waiter = _Waiter(self.path)
            if not waiter.wait(timeout):
                if waiter.error is not None:
                    raise waiter.error
                raise LockTimeoutError(self.path, timeout, self.holder()) from None
            os.close(self._fd)
            self._fd = waiter.fd
        self._held = True
        note = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": utc_now().isoformat()})
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, note.encode(), 0)

    def release(self) -> None:
        if self._fd is not None and self._held:
            self._held = False
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def holder(self) -> str:
        """Who holds the lock, from the note its holder wrote."""
        try:
            info = json.loads(self.path.read_text() or "{}")
            return f"pid {info['pid']} on {info.get('host', '?')} (holding since {info.get('since', '?')})"
        except (OSError, ValueError, KeyError, TypeError):
            return "an unknown process (no holder note in the lock file)"

    def close(self) -> None:
        self.release()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "WriterLock":
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
