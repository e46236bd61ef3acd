"""One thread for all model work in the serving process.

PyTorch's CPU build parallelises each op with OpenMP (libgomp), and libgomp keeps one thread team
per OS thread that runs parallel regions. When forwards hop between threads (the main thread at
load time, then whichever worker thread the async server picks), several teams compete for the
same two cores and intra-op parallelism stops paying: measured on the embedded model, a readout
took 49 ms on the thread that loaded the model and 80 ms on a pool thread. Loading the model and
running every forward on one dedicated thread keeps one warm team. Forwards are serialised by the
model lock anyway, so a single thread costs no concurrency.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class EngineThread:
    def __init__(self) -> None:
        self._ex = ThreadPoolExecutor(max_workers=1, thread_name_prefix="amygdala-engine")

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run on the engine thread and wait (from synchronous code)."""
        return self._ex.submit(fn, *args, **kwargs).result()

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Any:
        """Queue work on the engine thread without waiting (a Future)."""
        return self._ex.submit(fn, *args, **kwargs)

    async def arun(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run on the engine thread without blocking the event loop."""
        return await asyncio.wrap_future(self._ex.submit(fn, *args, **kwargs))

    def close(self) -> None:
        self._ex.shutdown(wait=True)
