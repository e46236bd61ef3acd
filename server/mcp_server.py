"""The MCP server: one MCPServer whose tools come from small modules under server/tools/."""

from __future__ import annotations

import importlib
from contextlib import asynccontextmanager
from typing import Any

from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ToolError, UnexpectedToolError
from pydantic import ValidationError

from .arguments import describe, forbid_unknown_arguments
from .services import Services

# A later feature (dream loop, certificate review) adds its module here; nothing else changes.
TOOL_MODULES: tuple[str, ...] = (
    "amygdala.server.tools.readout",
    "amygdala.server.tools.steering",
    "amygdala.server.tools.corrections",
    "amygdala.server.tools.dream",
)

INSTRUCTIONS = """\
amygdala reads the emotional state a text evokes in this model's residual stream, tests steering
vectors before any training, and stores behavioural corrections that become weight updates.
- read_emotions(text): z-scores of 267 emotion concepts (list_concepts shows them, with families).
- test_steering(prompt, {concept: alpha}): steered vs unsteered continuation, both re-read.
- submit_correction(context, preferred, rejected?): stored durably; train_now queues ORPO/SFT.
- train_status(): the training worker, its queue and the next checkpoint sync.
- dream_status() / run_dream_now(): the nightly dream loop (on-policy cases, ORPO training, rollback
  on regression); add_invariant(spec) proposes a rule it tests and trains next cycle.
- list_certificates / get_certificate / verify_certificate: statistical behavioural certificates
  (review is the operator's, not a tool).
Errors say how to fix the call."""


class AmygdalaMCP(MCPServer):
    """MCPServer whose argument errors read as one line naming the field, the limit and the fix."""

    async def call_tool(self, name: str, arguments: dict[str, Any], context: Any = None) -> Any:
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as exc:
            cause = exc.__cause__
            if isinstance(exc, UnexpectedToolError) or not isinstance(cause, ValidationError):
                raise
            tool = self._tool_manager.get_tool(name)
            fields = sorted((tool.parameters.get("properties") or {}) if tool else [])
            raise ToolError(describe(name, cause, fields)) from cause


def build_mcp(services: Services, modules: tuple[str, ...] = TOOL_MODULES) -> MCPServer:
    """An MCPServer over already-loaded services (loading happens once, before any transport starts)."""

    @asynccontextmanager
    async def lifespan(_: Any):
        yield services

    from amygdala import __version__

    mcp = AmygdalaMCP("amygdala", title="amygdala", version=__version__, instructions=INSTRUCTIONS, lifespan=lifespan)
    for name in modules:
        importlib.import_module(name).register(mcp, services)
    forbid_unknown_arguments(mcp)
    return mcp
