"""The training side's boundary types: settings, job requests, results and status (pydantic).

They cross process boundaries (HTTP bodies, ZeroMQ messages between the serving process and the
training worker), so they validate on the way in and serialise to plain JSON. Token ids are raw:
the training side has no tokenizer, the client tokenizes with the served model's tokenizer.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from .apollo import DEFAULT_RANK, DEFAULT_UPDATE_PROJ_GAP, OptimizerKind, OptimizerSpec
from .losses import DEFAULT_ORPO_LAMBDA

LossKind = Literal["sft", "orpo"]
JobState = Literal["queued", "running", "done", "failed", "cancelled"]
DEFAULT_LR = 1e-5
MAX_LR = 1e-2  # above this one step of Adam-like updates wrecks a pretrained model
MAX_BODY_BYTES = 4 * 1024 * 1024  # largest HTTP request body, for the training API and the daemon alike


class JobRejected(ValueError):
    """A job that cannot run as given; the message says which field is wrong and how to fix it."""


class WorkerUnavailable(RuntimeError):
    """The training worker is not running (never started, died, or the client is closed)."""


class InvalidTargets(JobRejected):
    """Training targets that select nothing (or out-of-range layers); the message lists the valid module names."""


ATTENTION_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")


class TrainTargets(BaseModel):
    """Which weights to train: module name patterns and a decoder-layer range (see training/targets.py).

    Example, the attention projections of layers 6-11: `TrainTargets(modules=ATTENTION_PROJECTIONS,
    layers=(6, 11))`, or in JSON `{"modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "layers": "6-11"}`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    modules: tuple[str, ...] = Field((), description="fnmatch patterns of module names: inside a decoder layer relative to it "
                                     "('self_attn.q_proj', or just 'q_proj'; 'mlp.*'), outside the layers by full path "
                                     "('model.norm'). Empty: every module of the chosen layers.")
    layers: tuple[int, int] | None = Field(None, description="First and last decoder layer to train (inclusive), e.g. "
                                           "[6, 11] or '6-11'. None: every layer.")

    @field_validator("modules", mode="before")
    @classmethod
    def _modules(cls, v: object) -> object:
        if isinstance(v, str):
            v = [v]
        if isinstance(v, (list, tuple)):
            for i, pat in enumerate(v):
                if not isinstance(pat, str) or not pat.strip():
                    raise ValueError(f"modules[{i}] must be a non-blank module name pattern, e.g. 'self_attn.q_proj'")
        return v

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, v: object) -> object:
        if isinstance(v, str):
            a, sep, b = v.partition("-")
            try:
                return (int(a), int(b if sep else a))
            except ValueError:
                raise ValueError(f"layers {v!r}: write a range like '6-11' (or one layer, '7')") from None
        return v

    @model_validator(mode="after")
    def _range(self) -> TrainTargets:
        if self.layers is not None and not 0 <= self.layers[0] <= self.layers[1]:
            raise ValueError(f"layers {list(self.layers)}: need 0 <= first <= last (both inclusive)")
        return self

    def describe(self) -> str:
        mods = ", ".join(self.modules) if self.modules else "every module"
        where = "every layer" if self.layers is None else f"layers {self.layers[0]}-{self.layers[1]}"
        return f"{mods} of {where}"


class TrainSettings(BaseModel):
    """How the worker trains. Defaults follow the original work: lr 1e-5, one pass, small batches."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    optimizer: OptimizerKind = Field("apollo", description="'apollo' (rank `rank`, channel-wise), 'apollo-mini' (rank 1, tensor-wise, scale 128) or 'adamw'.")
    rank: int = Field(DEFAULT_RANK, ge=1, description="APOLLO projection rank (APOLLO-Mini always uses 1).")
    scale: float | None = Field(None, gt=0, description="APOLLO scale; None: 1 for APOLLO, 128 for APOLLO-Mini.")
    update_proj_gap: int = Field(DEFAULT_UPDATE_PROJ_GAP, ge=1, description="Steps between new random projections.")
    lr: float = Field(DEFAULT_LR, gt=0, le=MAX_LR, description="Learning rate when a job gives none.")
    weight_decay: float = Field(0.0, ge=0)
    orpo_lambda: float = Field(DEFAULT_ORPO_LAMBDA, ge=0, description="Weight of the odds-ratio term in ORPO.")
    max_grad_norm: float = Field(1.0, ge=0, description="Clip the global gradient norm to this; 0 disables clipping.")
    batch_size: int = Field(4, ge=1, description="Examples per optimizer step (gradients accumulated).")
    train_embeddings: bool = Field(False, description="Also train the (tied) embedding matrix, with AdamW. Off: it is 62% of "
                                   "Gemma 3 270M's weights, doubles the gradient memory and shifts every token's output.")
    targets: TrainTargets | None = Field(None, description="Which modules and layers the worker trains (and holds optimizer "
                                         "state for); None: the whole body, embeddings frozen.")
    keep_snapshots: int = Field(4, ge=0, description="Jobs whose pre-job weights are kept in memory for exact rollback.")
    threads: int | None = Field(None, ge=1, description="torch threads in the worker; None: half the cores, leaving the rest to serving.")
    progress: bool = Field(True, description="tqdm progress bar (stderr) for jobs of several steps.")

    def optimizer_spec(self, lr: float | None = None) -> OptimizerSpec:
        return OptimizerSpec(kind=self.optimizer, rank=self.rank if self.optimizer == "apollo" else 1, scale=self.scale,
                             update_proj_gap=self.update_proj_gap, lr=lr or self.lr, weight_decay=self.weight_decay)


class TrainExample(BaseModel):
    """One training example: a context and the continuation to learn (plus the rejected one for ORPO)."""

    model_config = ConfigDict(extra="forbid")

    context_ids: list[StrictInt] = Field(description="Token ids of the context (prompt), including BOS; not trained on.")
    continuation_ids: list[StrictInt] = Field(description="Token ids of the preferred continuation.")
    rejected_ids: list[StrictInt] | None = Field(None, description="Token ids of the rejected continuation (ORPO only).")
    loss: LossKind = Field(description="'sft' (learn continuation_ids) or 'orpo' (prefer continuation_ids over rejected_ids).")

    @model_validator(mode="after")
    def _structure(self) -> "TrainExample":
        if not self.context_ids:
            raise ValueError("context_ids is empty: pass the tokenized context, at least the model's BOS token")
        if not self.continuation_ids:
            raise ValueError("continuation_ids is empty: pass the tokenized continuation to train on")
        if self.loss == "orpo" and not self.rejected_ids:
            raise ValueError("loss 'orpo' needs non-empty rejected_ids (the dispreferred continuation); "
                             "use loss 'sft' to train on continuation_ids alone")
        if self.loss == "sft" and self.rejected_ids is not None:
            raise ValueError("rejected_ids were given with loss 'sft', which would ignore them: "
                             "use loss 'orpo', or drop rejected_ids")
        return self

    def sequences(self) -> dict[str, list[int]]:
        out = {"context_ids": self.context_ids, "continuation_ids": self.continuation_ids}
        if self.rejected_ids is not None:
            out["rejected_ids"] = self.rejected_ids
        return out

    def longest(self) -> int:
        return len(self.context_ids) + max(len(self.continuation_ids), len(self.rejected_ids or []))


class TrainJob(BaseModel):
    """A unit of training: one snapshot (one rollback point), `epochs` passes over `examples`."""

    model_config = ConfigDict(extra="forbid")

    examples: list[TrainExample] = Field(min_length=1)
    lr: float | None = Field(None, gt=0, le=MAX_LR, description="Learning rate for this job; default the worker's (1e-5).")
    dry_run: bool = Field(False, description="Compute loss and gradient norms only; weights and optimizer state stay bit-identical.")
    epochs: int = Field(1, ge=1, le=1000, description="Passes over the examples (one optimizer step per batch per pass).")
    batch_size: int | None = Field(None, ge=1, description="Examples per step; default the worker's.")
    label: str | None = Field(None, max_length=200, description="Free text kept with the result (e.g. a correction id).")
    targets: TrainTargets | None = Field(None, description="Train only these modules/layers in this job (a subset of what "
                                         "the worker trains); None: everything the worker trains.")


class TrainRequest(TrainExample):
    """Body of POST /train: one example plus job options."""

    lr: float | None = Field(None, gt=0, le=MAX_LR)
    dry_run: bool = False
    epochs: int = Field(1, ge=1, le=1000)
    label: str | None = Field(None, max_length=200)

    def to_job(self) -> TrainJob:
        example = TrainExample(context_ids=self.context_ids, continuation_ids=self.continuation_ids,
                               rejected_ids=self.rejected_ids, loss=self.loss)
        return TrainJob(examples=[example], lr=self.lr, dry_run=self.dry_run, epochs=self.epochs, label=self.label)


class ModelLimits(BaseModel):
    """What the served model accepts: ids below vocab_size, sequences up to max_tokens."""

    vocab_size: int
    max_tokens: int


def check_job(job: TrainJob, limits: ModelLimits) -> None:
    """Raise JobRejected naming the first bad token id or over-long sequence."""
    for i, ex in enumerate(job.examples):
        where = f"examples[{i}]." if len(job.examples) > 1 else ""
        for field, ids in ex.sequences().items():
            for j, t in enumerate(ids):
                if not 0 <= t < limits.vocab_size:
                    raise JobRejected(f"{where}{field}[{j}] = {t} is not a token id of the served model (valid: 0 to "
                                      f"{limits.vocab_size - 1}); tokenize with the served model's tokenizer")
        if ex.longest() > limits.max_tokens:
            raise JobRejected(f"{where}context_ids + continuation has {ex.longest()} tokens, over the limit of "
                              f"{limits.max_tokens} (AMYGDALA_MAX_TOKENS); shorten the context, keeping its end")


class StepReport(BaseModel):
    step: int
    loss: float | None = None
    grad_norm: float | None = Field(None, description="Global gradient norm before clipping.")
    applied: bool
    reason: str | None = Field(None, description="Why the step was not applied (dry run, non-finite loss or gradient).")
    changed_tensors: int = Field(0, description="Tensors the step wrote (stamped with the weights version for checkpoint sync).")


class JobResult(BaseModel):
    job_id: str
    state: JobState
    dry_run: bool = False
    label: str | None = None
    examples: int = 0
    total_steps: int = 0
    steps_applied: int = 0
    steps_skipped: int = 0
    steps: list[StepReport] = Field(default_factory=list)
    loss: float | None = Field(None, description="Mean loss of the last step (of the whole job for a dry run).")
    grad_norm: float | None = None
    grad_norms: dict[str, float] | None = Field(None, description="Dry run: gradient norm of each trained tensor.")
    example_losses: list[dict] | None = Field(None, description="Dry run: each example's loss and its parts.")
    error: str | None = None
    submitted_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    rollback_available: bool = False

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "cancelled")


class RollbackResult(BaseModel):
    job_id: str
    restored_tensors: int
    undone_jobs: list[str] = Field(description="The job and every later job still on record: all of them are undone.")
    weights_version: int


class TrainStatus(BaseModel):
    worker_alive: bool
    worker_pid: int | None = None
    worker_error: str | None = Field(None, description="Why the worker is not running, when it is not.")
    queue: list[str] = Field(default_factory=list, description="Job ids waiting, oldest first.")
    current_job: str | None = None
    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    last_error: str | None = None
    jobs_finished: int = Field(0, description="Jobs that ended (done, failed or cancelled), counted once their "
                               "on_job_finished hooks ran: corrections are already marked when this moves.")
    weights_version: int = Field(0, description="Even: weights stable; odd: a step is being applied right now.")
    optimizer: str = ""
    rollback_available: list[str] = Field(default_factory=list)
