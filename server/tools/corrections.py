"""submit_correction and train_status: corrections become durable memories and, on request, training jobs.

The tool only validates and reports; the correction's way from submission to trained weights is
owned by `amygdala.dream.corrections.CorrectionLifecycle` (services.corrections). Limits are in the
input schema (annotations evaluated in register(), hence no `from __future__ import annotations`).
"""

from typing import Annotated

from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations
from pydantic import Field

from amygdala.engine.tokens import only_control

from ..models import CorrectionResult, TrainStatusResult, WorkerStatus
from ..services import Services
from .common import in_thread, on_engine, services, tool_errors


def register(mcp: MCPServer, svc_static: Services) -> None:
    lim = svc_static.limits
    Text = Annotated[str, Field(max_length=lim.max_correction_chars)]

    @mcp.tool(title="Submit correction", annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False,
                                                                      idempotent_hint=True, open_world_hint=False))
    async def submit_correction(
        context: Annotated[Text, Field(description=f"The situation (prompt or conversation) the correction is about; at "
                                                   f"most {lim.max_correction_chars} characters (keep the end of a long one).")],
        preferred: Annotated[Text, Field(description="The response that should have been given.")],
        ctx: Context,
        rejected: Annotated[Text | None, Field(description="The response that was actually given and is wrong (enables ORPO).")] = None,
        invariant: Annotated[str | None, Field(max_length=200, description="Id or name of a behavioural invariant this correction is about.")] = None,
        note: Annotated[Text | None, Field(description="Why; kept with the correction.")] = None,
        idempotency_key: Annotated[str | None, Field(min_length=1, max_length=200, description="Send the same key when retrying: the correction is stored once.")] = None,
        train_now: Annotated[bool, Field(description="Also queue a training job now (ORPO with rejected, SFT without) "
                                                     "instead of waiting for the nightly dream loop.")] = False,
    ) -> CorrectionResult:
        """Store a behavioural correction durably (fsync'd before this returns); optionally train on it now."""
        svc = services(ctx)
        for name, value in (("context", context), ("preferred", preferred)):
            if not value.strip():
                raise ToolError(f"{name} is empty; a correction needs the situation and the preferred response")
            if only_control(value):
                raise ToolError(f"{name} has only control or invisible format characters; a correction needs readable text")
        with tool_errors("submit_correction"):
            out = await in_thread(lambda: svc.corrections.submit(context, preferred, rejected, invariant=invariant, note=note,
                                                                 idempotency_key=idempotency_key, train_now=train_now))
        return CorrectionResult(correction_id=out.correction.id, status=out.correction.status, duplicate=not out.created,
                                training_job=out.job_id, training_loss=out.loss, message=out.message)

    @mcp.tool(title="Training status", annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=False, open_world_hint=False))
    async def train_status(ctx: Context) -> TrainStatusResult:
        """The training worker's queue, current job, step and loss, the next checkpoint sync, and stored corrections."""
        svc = services(ctx)
        corrections = svc.corrections.counts()
        with tool_errors("train_status"):
            drift = await on_engine(svc, svc.readout_drift) if svc.readout_ready else None
        if svc.trainer is None:
            return TrainStatusResult(enabled=False, message="training disabled (server started with --no-train)",
                                     corrections=corrections, readout_drift=drift)
        st = svc.trainer.status()
        nxt = svc.sync.next_run_time if svc.sync is not None else None
        msg = "training worker running" if st.worker_alive else f"training worker down: {st.worker_error}"
        return TrainStatusResult(enabled=True, message=msg, worker=WorkerStatus.from_internal(st), corrections=corrections,
                                 next_checkpoint_sync=nxt.isoformat() if nxt else None, readout_drift=drift)
