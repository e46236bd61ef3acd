"""Shared plumbing for tool modules: services lookup, error translation, threads and progress."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import anyio
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError

from ..services import Services

T = TypeVar("T")
log = logging.getLogger(__name__)


def services(ctx: Context) -> Services:
    return ctx.request_context.lifespan_context


def caller_errors() -> tuple[type[BaseException], ...]:
    """The project's own error types: each means "the call was wrong" and its message says how to fix it."""
    from amygdala.dream.errors import DreamError
    from amygdala.engine.model import ModelError
    from amygdala.engine.readout import ReadoutError
    from amygdala.engine.steering import SteeringError
    from amygdala.engine.tokens import TextError
    from amygdala.memory_graph.errors import MemoryGraphError
    from amygdala.training.schemas import JobRejected, WorkerUnavailable

    from ..services import ReadoutNotReady

    return (TextError, SteeringError, ReadoutError, ModelError, ReadoutNotReady, MemoryGraphError, JobRejected,
            WorkerUnavailable, DreamError)


@contextmanager
def tool_errors(tool: str = "tool") -> Iterator[None]:
    """The project's own errors become ToolErrors whose message the agent reads and can act on.

    Anything else is a bug on our side, not in the call: it is logged with its traceback and the
    agent is told so, instead of being handed a message (e.g. a bare KeyError) it would mistake
    for advice about its arguments.
    """
    try:
        yield
    except ToolError:
        raise
    except caller_errors() as exc:
        raise ToolError(str(exc)) from exc
    except Exception as exc:
        log.exception("internal error in %s", tool)
        raise ToolError(f"internal error in {tool} ({type(exc).__name__}); the server logged the traceback. "
                        "This is a bug in amygdala, not in your call: retrying will not help, please report it") from exc


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run blocking work off the event loop, so one slow call never stalls the others."""
    return await anyio.to_thread.run_sync(fn, *args)


async def on_engine(svc: Services, fn: Callable[..., T], *args: Any) -> T:
    """Run model work on the server's engine thread (one warm OpenMP team), or a worker thread."""
    if svc.engine is not None:
        return await svc.engine.arun(fn, *args)
    return await anyio.to_thread.run_sync(fn, *args)


def progress_reporter(ctx: Context) -> Callable[[float, float, str], None]:
    """A progress callback that work on another thread (the engine thread) can call.

    Call it from the tool's coroutine (it captures the running event loop); the callback schedules
    ctx.report_progress on that loop and does not wait for it.
    """
    import asyncio

    loop = asyncio.get_running_loop()

    def report(done: float, total: float, message: str) -> None:
        fut = asyncio.run_coroutine_threadsafe(ctx.report_progress(done, total, message), loop)
        fut.add_done_callback(lambda f: f.exception())  # best-effort: a client without a progress token

    return report
