"""The MCP server: one MCPServer whose tools come from small modules under server/tools/."""

from __future__ import annotations

import importlib
from contextlib import asynccontextmanager
from typing import Any

from mcp.server import MCPServer

from .services import Services

# A later feature (dream loop, certificate review) adds its module here; nothing else changes.
TOOL_MODULES: tuple[str, ...] = (
    "amygdala.server.tools.readout",
    "amygdala.server.tools.steering",
    "amygdala.server.tools.corrections",
)

INSTRUCTIONS = """\
amygdala reads the emotional state a text evokes in this model's residual stream, tests steering
vectors before any training, and stores behavioural corrections that become weight updates.
- read_emotions(text): z-scores of 267 emotion concepts (list_concepts shows them, with families).
- test_steering(prompt, {concept: alpha}): steered vs unsteered continuation, both re-read.
- submit_correction(context, preferred, rejected?): stored durably; train_now queues ORPO/SFT.
- train_status(): the training worker, its queue and the next checkpoint sync.
Errors say how to fix the call."""


def build_mcp(services: Services, modules: tuple[str, ...] = TOOL_MODULES) -> MCPServer:
    """An MCPServer over already-loaded services (loading happens once, before any transport starts)."""

    @asynccontextmanager
    async def lifespan(_: Any):
        yield services

    from amygdala import __version__

    mcp = MCPServer("amygdala", title="amygdala", version=__version__, instructions=INSTRUCTIONS, lifespan=lifespan)
    for name in modules:
        importlib.import_module(name).register(mcp, services)
    return mcp
