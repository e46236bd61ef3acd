"""Shared plumbing for tool modules: services lookup, error translation, threads and progress."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import anyio
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError

from ..services import Services

T = TypeVar("T")


def services(ctx: Context) -> Services:
    return ctx.request_context.lifespan_context


@contextmanager
def tool_errors() -> Iterator[None]:
    """Anticipated failures become ToolErrors whose message the agent reads and can act on.

    (The MCP SDK hides the text of any other exception from the client, so every error a caller
    could fix must pass through here.)
    """
    from amygdala.engine.readout import ReadoutError
    from amygdala.engine.steering import SteeringError
    from amygdala.engine.tokens import TextError

    from ..services import ReadoutNotReady

    try:
        yield
    except ToolError:
        raise
    except (TextError, SteeringError, ReadoutError, ReadoutNotReady, ValueError) as exc:
        raise ToolError(str(exc)) from exc
    except KeyError as exc:
        raise ToolError(str(exc.args[0]) if exc.args else str(exc)) from exc


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
