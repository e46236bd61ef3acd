"""Exceptions and warnings raised by the memory graph.

Every error carries enough context (path, line, id) for the message alone to say what to do next,
because the callers are often agents that only see the message text.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .tags import TagLineError


class MemoryGraphError(Exception):
    """Base class: anything the memory graph refuses to do."""


class InvalidInputError(MemoryGraphError, ValueError):
    """A write was rejected before anything was stored; the message says how to fix it."""


class NodeNotFoundError(MemoryGraphError, KeyError):
    def __init__(self, node_id: str, hint: str = "") -> None:
        self.node_id = node_id
        msg = f"no node with id {node_id!r} in the memory graph"
        super().__init__(msg + (f"; {hint}" if hint else "; `amygdala memory list` shows the ids"))

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0])


class IdempotencyConflictError(InvalidInputError):
    """The idempotency key was already used for a different write.

    Reusing a key with different content is almost always a client bug (a key derived from too
    little of the request); silently returning the old node would hide it.
    """

    def __init__(self, key: str, existing_id: str, differences: list[str]) -> None:
        self.key = key
        self.existing_id = existing_id
        self.differences = differences
        super().__init__(
            f"idempotency key {key!r} was already used for node {existing_id} with different content "
            f"(differs in: {', '.join(differences) or 'edges'}); use a new key for a new write, or resend "
            f"exactly the original request to get the stored node back"
        )


class InvalidTransitionError(InvalidInputError):
    def __init__(self, node_id: str, current: str, requested: str, allowed: list[str]) -> None:
        self.node_id = node_id
        self.current = current
        self.requested = requested
        self.allowed = allowed
        super().__init__(
            f"correction {node_id} is {current!r}; it cannot move to {requested!r} "
            f"(allowed from {current!r}: {', '.join(allowed) or 'none'})"
        )


class MalformedTagLinesError(InvalidInputError):
    """Emotion tag lines that could not be parsed; nothing was stored."""

    def __init__(self, errors: Sequence["TagLineError"]) -> None:
        self.errors = list(errors)
        lines = "\n".join(f"  {e}" for e in self.errors)
        super().__init__(
            f"{len(self.errors)} malformed emotion tag line(s); nothing was stored:\n{lines}\n"
            "A tag line looks like `emotion: frustrated=0.7 curious=0.4` (lower-case emotion ids, "
            "scores between 0 and 1). Fix the line, or reword it so it does not start with `emotion:`."
        )


class LockTimeoutError(MemoryGraphError, TimeoutError):
    """Another process held the writer lock for longer than the caller was willing to wait."""

    def __init__(self, lock_path: Path, timeout: float, holder: str) -> None:
        self.lock_path = lock_path
        self.timeout = timeout
        self.holder = holder
        super().__init__(
            f"could not get the memory graph writer lock {lock_path} within {timeout:g}s; it is held by "
            f"{holder}. Wait for that process to finish (or stop it), or pass a longer lock timeout"
        )


class CorruptGraphError(MemoryGraphError):
    """The files on disk are damaged in a way that loading must not paper over.

    Loading refuses instead of returning a partial or empty graph: an empty graph would look like a
    successful load and the next snapshot would make the loss permanent.
    """

    def __init__(self, directory: Path, detail: str) -> None:
        self.directory = directory
        self.detail = detail
        super().__init__(
            f"memory graph at {directory} cannot be loaded: {detail}. Nothing was changed on disk. "
            f"Run `amygdala memory repair --dir {directory}` (it backs the files up first, then "
            f"salvages every intact write and lists what it could not keep)"
        )


class TornTailWarning(UserWarning):
    """The last journal line was incomplete (a crash mid-write) and was dropped.

    A torn line was never acknowledged (acknowledgement happens after fsync of the whole line),
    so dropping it loses nothing a caller was told was stored.
    """
