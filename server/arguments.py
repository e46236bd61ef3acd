"""Tool arguments at the edge: unknown fields refused, schema violations described in one plain line.

The SDK validates arguments against each tool's pydantic model and would (a) silently drop an
argument the tool does not take (`top-k` for `top_k`: the agent never learns its option was
ignored) and (b) report a violation as pydantic's multi-line dump, echoing the input back. Here
every tool's argument model forbids extra fields, and a validation error becomes a sentence that
names the field, the limit and what was sent.
"""

from __future__ import annotations

from typing import Any

from mcp.server import MCPServer
from pydantic import ConfigDict, ValidationError


def forbid_unknown_arguments(mcp: MCPServer) -> None:
    """Rebuild every registered tool's argument model with extra="forbid" (and say so in its schema)."""
    for tool in mcp._tool_manager.list_tools():  # no public hook for this in the SDK (2.x)
        tool.fn_metadata.arg_model = _forbidding(tool.fn_metadata.arg_model)
        tool.parameters = {**tool.parameters, "additionalProperties": False}


def _forbidding(base: type) -> type:
    """A subclass of the SDK's argument model that refuses fields it does not declare."""
    return type(base.__name__, (base,), {"model_config": ConfigDict(**{**base.model_config, "extra": "forbid"}),
                                         "__module__": base.__module__})


def _shown(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + "...'" if isinstance(value, str) else text[:limit] + "..."


def describe(tool: str, exc: ValidationError, fields: list[str]) -> str:
    """One line per problem: which argument, what the limit is, what was sent, how to fix it."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ())) or "arguments"
        kind, ctx, value = err.get("type", ""), err.get("ctx") or {}, err.get("input")
        if kind == "extra_forbidden":
            lines.append(f"unknown argument {loc!r}: {tool} takes {', '.join(fields)}")
        elif kind == "missing":
            lines.append(f"{loc} is required")
        elif kind == "string_too_long":
            lines.append(f"{loc} is {len(value)} characters, over the limit of {ctx.get('max_length')}; "
                         "shorten it (keep the most recent part)")
        elif kind == "string_too_short":
            lines.append(f"{loc} must have at least {ctx.get('min_length')} character(s)")
        elif kind == "too_long":
            lines.append(f"{loc} has {ctx.get('actual_length')} items, over the limit of {ctx.get('max_length')}")
        elif kind == "too_short":
            lines.append(f"{loc} is empty; it needs at least {ctx.get('min_length')} item(s)" if ctx.get("actual_length") == 0
                         else f"{loc} must have at least {ctx.get('min_length')} item(s)")
        elif kind in ("less_than_equal", "less_than"):
            bound = ctx.get("le", ctx.get("lt"))
            lines.append(f"{loc} must be {'less than or equal to' if kind == 'less_than_equal' else 'less than'} {bound} "
                         f"(got {_shown(value)}): the limit of {bound}")
        elif kind in ("greater_than_equal", "greater_than"):
            bound = ctx.get("ge", ctx.get("gt"))
            lines.append(f"{loc} must be {'greater than or equal to' if kind == 'greater_than_equal' else 'greater than'} "
                         f"{bound} (got {_shown(value)})")
        elif kind == "finite_number":
            lines.append(f"{loc} must be a finite number (got {_shown(value)})")
        else:
            lines.append(f"{loc}: {err.get('msg')} (got {_shown(value)})")
    return f"invalid arguments for {tool}: " + "; ".join(lines) + ". The tool's input schema lists every limit."
