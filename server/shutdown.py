"""Clean shutdown on SIGTERM as on SIGINT, bounded in time.

`kill`, systemd and `docker stop` send SIGTERM, whose default action ends the process at once:
uvicorn catches it, stops serving, then re-raises it with the original handler restored, so
without a handler of ours `Services.close()` (final checkpoint sync, worker stop, graph close)
never ran and every weight trained since the last sync was lost. Here SIGTERM raises SystemExit
in the main thread, so the same `finally` that handles Ctrl-C runs. During the shutdown itself a
second signal is only reported: interrupting the final sync halfway would waste the journal's work
(it is crash-safe, but the new weights would not land).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

DEFAULT_SHUTDOWN_S = 120.0


def _exit_on_term(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def terminate_like_interrupt() -> Iterator[None]:
    """Inside the block, SIGTERM raises SystemExit (so `finally` blocks run); outside, as before."""
    previous = signal.signal(signal.SIGTERM, _exit_on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def close_within(close: Callable[[], None], timeout_s: float, echo: Callable[[str], None]) -> bool:
    """Run the shutdown steps with signals reported instead of obeyed; give up after timeout_s.

    Returns False when the steps did not finish in time (the process then exits anyway; an
    unfinished checkpoint sync is replayed from its journal at the next start).
    """
    started = time.monotonic()

    def busy(signum: int, frame: object) -> None:
        echo(f"amygdala: already shutting down ({time.monotonic() - started:.0f} s of at most {timeout_s:.0f} s: "
             "final checkpoint sync, worker stop, graph close); send SIGKILL to abandon it")

    old = {s: signal.signal(s, busy) for s in (signal.SIGTERM, signal.SIGINT)}
    errors: list[BaseException] = []

    def run() -> None:
        try:
            close()
        except BaseException as exc:  # reported below
            errors.append(exc)

    worker = threading.Thread(target=run, name="amygdala-shutdown", daemon=True)
    worker.start()
    try:
        worker.join(timeout_s)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if worker.is_alive():
        echo(f"amygdala: shutdown did not finish within {timeout_s:.0f} s; exiting anyway. Weights trained since the "
             "last checkpoint sync may be lost; an interrupted sync is replayed from its journal at the next start")
        return False
    if errors:
        log.error("shutdown failed: %s", errors[0])
        return False
    echo(f"amygdala: shut down cleanly in {time.monotonic() - started:.1f} s")
    return True
