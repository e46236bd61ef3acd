"""Where amygdala keeps its state when nothing says otherwise (stdlib only; engine.config builds on it)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_HOME = "~/.local/share/amygdala"
HOME_ENV = "AMYGDALA_HOME"


def home_from_env() -> Path:
    """$AMYGDALA_HOME, or ~/.local/share/amygdala."""
    return Path(os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser()


LOCK_NAME = "daemon.lock"


class HomeBusy(RuntimeError):
    """Another process owns this AMYGDALA_HOME; the message names it and what to do instead."""

    def __init__(self, home: Path, holder: dict, doing: str):
        self.home, self.holder = home, holder
        what = holder.get("what", "amygdala daemon")
        where = f", serving {holder['url']}" if holder.get("url") else ""
        super().__init__(f"cannot {doing}: {home} is owned by another {what} (pid {holder.get('pid', '?')}, "
                         f"since {holder.get('since', '?')}{where}). Stop it first, talk to it instead "
                         f"(its MCP tools or `amygdala train ... --url`), or use another --home")


class HomeLock:
    """One owner per AMYGDALA_HOME: an exclusive flock held for the owner's whole life.

    Two daemons on one home would each start a training worker on the same model directory and
    optimizer state and overwrite each other's weights. The kernel drops a flock when its holder
    dies, so a killed daemon never leaves the home locked. The holder writes a note (pid, what,
    since, url) into the lock file so whoever is refused can be told who is in the way (plain
    fcntl, not filelock, whose O_TRUNC open would erase that note).
    """

    def __init__(self, home: Path):
        self.home = Path(home)
        self.path = self.home / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, what: str, url: str | None = None) -> "HomeLock":
        """Take the lock or raise HomeBusy naming the holder."""
        import fcntl
        import json
        import time

        self.home.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise HomeBusy(self.home, self.holder() or {}, f"start {what}") from None
        note = {"pid": os.getpid(), "what": what, "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "url": url}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(note).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def set_url(self, url: str) -> None:
        """Record where the owner serves (after it bound its port)."""
        import json

        if self._fd is not None:
            note = {**(self.holder() or {}), "url": url}
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, json.dumps(note).encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def holder(self) -> dict | None:
        """The owner's note, or None when nobody holds the lock."""
        import fcntl
        import json

        if not self.path.is_file():
            return None
        if self._fd is None:  # probe: if we can take it, nobody holds it
            fd = os.open(self.path, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass
            else:
                fcntl.flock(fd, fcntl.LOCK_UN)
                return None
            finally:
                os.close(fd)
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def refuse_if_held(self, doing: str) -> None:
        """For commands that would write the model, optimizer state or graph beside a running owner."""
        holder = self.holder()
        if holder is not None and holder.get("pid") != os.getpid():
            raise HomeBusy(self.home, holder, doing)

    def __enter__(self) -> "HomeLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
