"""test_steering: try a steering vector against the unsteered run before spending training compute."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations
from pydantic import Field

from ..models import SteeringSide, TestSteeringResult
from ..services import Services
from .common import on_engine, progress_reporter, services, tool_errors

MAX_ABS_ALPHA = 1.0


def register(mcp: MCPServer, svc_static: Services) -> None:
    @mcp.tool(title="Test steering", annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False))
    async def test_steering(
        prompt: Annotated[str, Field(description="Prompt to continue, once unsteered and once steered.")],
        concepts: Annotated[dict[str, float], Field(description="Concept -> alpha. alpha 1 = a push as large as the layer's "
                                                               "typical residual norm; useful values are a few hundredths (0.02-0.05); negative steers away.")],
        ctx: Context,
        layers: Annotated[list[int] | None, Field(description="Layers to steer; default: the readout's default layers.")] = None,
        positions: Annotated[Literal["prompt", "generated", "both"], Field(description="Where to add the vectors.")] = "both",
        max_new_tokens: Annotated[int | None, Field(ge=1, description="Tokens to generate per run (default 48, capped by the server limit).")] = None,
        seed: Annotated[int | None, Field(description="Sampling seed shared by both runs.")] = 0,
        temperature: Annotated[float, Field(ge=0.0, le=2.0, description="0 = greedy.")] = 0.7,
    ) -> TestSteeringResult:
        """Generate with and without concept steering (same seed) and re-read both continuations unsteered.

        The model is unchanged afterwards: steering lives only inside this call.
        """
        svc = services(ctx)
        lim = svc.limits
        if not prompt.strip():
            raise ToolError("prompt is empty; pass the text to continue")
        if not concepts:
            raise ToolError("concepts is empty; pass e.g. {\"joyful\": 0.03} (list_concepts shows valid names)")
        if len(concepts) > lim.max_concepts:
            raise ToolError(f"{len(concepts)} concepts given, at most {lim.max_concepts} at once")
        for name, alpha in concepts.items():
            if not math.isfinite(alpha) or abs(alpha) > MAX_ABS_ALPHA:
                raise ToolError(f"alpha for {name!r} is {alpha}; use a finite value within ±{MAX_ABS_ALPHA} "
                                "(alpha 1 already pushes by a whole typical residual norm; useful values are a few hundredths)")
        if max_new_tokens is None:
            max_new_tokens = min(48, lim.max_new_tokens)
        if max_new_tokens > lim.max_new_tokens:
            raise ToolError(f"max_new_tokens {max_new_tokens} is over the limit of {lim.max_new_tokens}")
        if len(prompt) > lim.max_text_chars:
            raise ToolError(f"prompt is {len(prompt)} characters, over the limit of {lim.max_text_chars}")
        with tool_errors():
            r = svc.readout
            n = len(svc.lm.tokenizer(prompt)["input_ids"])
            if n > lim.max_prompt_tokens:
                raise ToolError(f"prompt is {n} tokens, over the limit of {lim.max_prompt_tokens}; shorten it")
            from amygdala.engine.steering import build_plan
            from amygdala.engine.steering_eval import compare

            build_plan(r, concepts, layers, positions)  # validate names and layers before any generation
            report = progress_reporter(ctx)
            res = await on_engine(svc, lambda: compare(svc.lm, r, prompt, concepts, layers, positions, max_new_tokens, seed,
                                                  temperature, progress=report))
        return TestSteeringResult(prompt=res.prompt, concepts=res.concepts, layers=res.layers, positions=res.positions,
                                  seed=res.seed, baseline=SteeringSide(**res.baseline.model_dump()),
                                  steered=SteeringSide(**res.steered.model_dump()), delta=res.delta)
