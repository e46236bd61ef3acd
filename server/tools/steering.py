"""test_steering: try a steering vector against the unsteered run before spending training compute.

Argument limits come from ServerLimits and sit in the tool's input schema, so an agent sees them
before it calls (the annotations are evaluated in register(), hence no `from __future__ import annotations`).
"""

from typing import Annotated, Literal

from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations
from pydantic import Field

from amygdala.engine.tokens import check_text

from ..models import SteeringSide, TestSteeringResult
from ..services import Services
from .common import on_engine, progress_reporter, services, tool_errors

MAX_ABS_ALPHA = 1.0


MAX_SEED = 2**63 - 1


def register(mcp: MCPServer, svc_static: Services) -> None:
    lim = svc_static.limits
    Alpha = Annotated[float, Field(ge=-MAX_ABS_ALPHA, le=MAX_ABS_ALPHA, allow_inf_nan=False)]

    @mcp.tool(title="Test steering", annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False))
    async def test_steering(
        prompt: Annotated[str, Field(max_length=lim.max_text_chars,
                                     description=f"Prompt to continue, once unsteered and once steered (at most "
                                                 f"{lim.max_prompt_tokens} tokens).")],
        concepts: Annotated[dict[str, Alpha], Field(min_length=1, max_length=lim.max_concepts,
                                                    description=f"Concept -> alpha, at most {lim.max_concepts} concepts. "
                                                    "alpha 1 = a push as large as the layer's typical residual norm; useful "
                                                    "values are a few hundredths (0.02-0.05); negative steers away; "
                                                    f"|alpha| <= {MAX_ABS_ALPHA:g}.")],
        ctx: Context,
        layers: Annotated[list[int] | None, Field(description="Layers to steer; default: the readout's default layers.")] = None,
        positions: Annotated[Literal["prompt", "generated", "both"], Field(description="Where to add the vectors.")] = "both",
        max_new_tokens: Annotated[int | None, Field(ge=1, le=lim.max_new_tokens,
                                                    description="Tokens to generate per run (default 48 or the limit).")] = None,
        seed: Annotated[int | None, Field(ge=0, le=MAX_SEED, description="Sampling seed shared by both runs (0 to 2^63-1).")] = 0,
        temperature: Annotated[float, Field(ge=0.0, le=2.0, description="Sampling temperature of both runs; 0 = greedy. "
                                                                         "Default 0.7.")] = 0.7,
    ) -> TestSteeringResult:
        """Generate with and without concept steering (same seed) and re-read both continuations unsteered.

        The model is unchanged afterwards: steering lives only inside this call.
        """
        svc = services(ctx)
        if max_new_tokens is None:
            max_new_tokens = min(48, lim.max_new_tokens)
        with tool_errors("test_steering"):
            check_text(prompt, "prompt")  # empty, whitespace or only control characters
            r = svc.readout
            n = len(svc.lm.tokenizer(prompt)["input_ids"])
            if n > lim.max_prompt_tokens:
                raise ToolError(f"prompt is {n} tokens, over the limit of {lim.max_prompt_tokens}; shorten it, keeping its end")
            from amygdala.engine.steering import build_plan
            from amygdala.engine.steering_eval import compare

            build_plan(r, concepts, layers, positions)  # validate names and layers before any generation
            report = progress_reporter(ctx)
            res = await on_engine(svc, lambda: compare(svc.lm, r, prompt, concepts, layers, positions, max_new_tokens, seed,
                                                       temperature, progress=report))
        return TestSteeringResult(prompt=res.prompt, concepts=res.concepts, layers=res.layers, positions=res.positions,
                                  seed=res.seed, baseline=SteeringSide(**res.baseline.model_dump()),
                                  steered=SteeringSide(**res.steered.model_dump()), delta=res.delta)
