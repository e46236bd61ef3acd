"""submit_correction and train_status: behavioural corrections become durable memories and, on
request, training jobs on the served weights."""

from __future__ import annotations

from typing import Annotated

from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations
from pydantic import Field

from ..models import CorrectionResult, TrainStatusResult
from ..services import Services
from .common import in_thread, services


def correction_job(svc, context: str, preferred: str, rejected: str | None, label: str):
    """Tokenize a correction into a training job: ORPO with a rejected response, SFT without."""
    from amygdala.training.schemas import TrainExample, TrainJob

    tok = svc.lm.tokenizer
    ctx_ids = tok(context)["input_ids"]  # with BOS
    pref = tok(preferred, add_special_tokens=False)["input_ids"]
    rej = tok(rejected, add_special_tokens=False)["input_ids"] if rejected else None
    loss = "orpo" if rej else "sft"
    return TrainJob(examples=[TrainExample(context_ids=ctx_ids, continuation_ids=pref, rejected_ids=rej, loss=loss)],
                    label=label), loss


def register(mcp: MCPServer, svc_static: Services) -> None:
    @mcp.tool(title="Submit correction", annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False,
                                                                      idempotent_hint=True, open_world_hint=False))
    async def submit_correction(
        context: Annotated[str, Field(description="The situation (prompt or conversation) the correction is about.")],
        preferred: Annotated[str, Field(description="The response that should have been given.")],
        ctx: Context,
        rejected: Annotated[str | None, Field(description="The response that was actually given and is wrong (enables ORPO).")] = None,
        invariant: Annotated[str | None, Field(description="Id or name of a behavioural invariant this correction is about.")] = None,
        note: Annotated[str | None, Field(description="Why; kept with the correction.")] = None,
        idempotency_key: Annotated[str | None, Field(max_length=200, description="Send the same key when retrying: the correction is stored once.")] = None,
        train_now: Annotated[bool, Field(description="Also queue a training job now (ORPO with rejected, SFT without) "
                                                     "instead of waiting for the nightly dream loop.")] = False,
    ) -> CorrectionResult:
        """Store a behavioural correction durably (fsync'd before this returns); optionally train on it now."""
        svc = services(ctx)
        lim = svc.limits
        for name, value in (("context", context), ("preferred", preferred), ("rejected", rejected), ("note", note)):
            if value is not None and len(value) > lim.max_correction_chars:
                raise ToolError(f"{name} is {len(value)} characters, over the limit of {lim.max_correction_chars}")
        for name, value in (("context", context), ("preferred", preferred)):
            if not value.strip():
                raise ToolError(f"{name} is empty; a correction needs the situation and the preferred response")
        if rejected is not None and not rejected.strip():
            rejected = None
        if train_now and svc.trainer is None:
            raise ToolError("train_now needs the training worker, which this server runs without "
                            "(started with --no-train); submit without train_now and the dream loop will pick it up")
        from amygdala.memory_graph.errors import MemoryGraphError

        graph = svc.graph
        earlier = graph.find_by_key(idempotency_key) if idempotency_key else None
        try:
            corr = await in_thread(lambda: graph.submit_correction(context, preferred, rejected, invariant, note, idempotency_key))
        except MemoryGraphError as exc:
            raise ToolError(str(exc)) from exc
        duplicate = earlier is not None and earlier.id == corr.id
        job_id = loss = None
        message = "stored durably; the nightly dream loop will train on it"
        if duplicate:
            message = "already stored under this idempotency_key; nothing new was written"
        if train_now and not duplicate:
            from amygdala.training.schemas import JobRejected, WorkerUnavailable

            try:
                job, loss = correction_job(svc, context, preferred, rejected, label=corr.id)
                job_id = await in_thread(svc.trainer.submit, job)
                corr = await in_thread(lambda: graph.set_correction_status(corr.id, "queued", note=f"train_now job {job_id}"))
                message = f"stored durably and queued as {loss.upper()} job {job_id}; follow it with train_status"
            except (JobRejected, WorkerUnavailable, ValueError) as exc:
                message = f"stored durably, but the training job was not queued: {exc}"
        return CorrectionResult(correction_id=corr.id, status=corr.status, duplicate=duplicate, training_job=job_id,
                                training_loss=loss, message=message)

    @mcp.tool(title="Training status", annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=False, open_world_hint=False))
    async def train_status(ctx: Context) -> TrainStatusResult:
        """The training worker's queue, current job, step and loss, the next checkpoint sync, and stored corrections."""
        svc = services(ctx)
        stats = svc.graph.stats()
        corrections = dict(stats.corrections_by_status)
        if svc.trainer is None:
            return TrainStatusResult(enabled=False, message="training disabled (server started with --no-train)",
                                     corrections=corrections)
        st = svc.trainer.status()
        nxt = svc.sync.next_run_time if svc.sync is not None else None
        msg = "training worker running" if st.worker_alive else f"training worker down: {st.worker_error}"
        return TrainStatusResult(enabled=True, message=msg, worker=st, corrections=corrections,
                                 next_checkpoint_sync=nxt.isoformat() if nxt else None)
