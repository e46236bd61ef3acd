"""Tool outputs (pydantic): the structured results an agent receives, with their JSON schemas."""

from __future__ import annotations

from pydantic import BaseModel, Field

from amygdala.training.schemas import TrainStatus


class ConceptScore(BaseModel):
    concept: str
    family: str
    score: float = Field(description="z-score: standard deviations above this concept's average over the corpus.")


class TokenReadout(BaseModel):
    token: str
    top: list[ConceptScore]


class ReadEmotionsResult(BaseModel):
    top: list[ConceptScore] = Field(description="Highest-scoring concepts, best first.")
    layers: list[int] = Field(description="Decoder layers read (scores are averaged over them).")
    layer_depths: list[str] = Field(description="Each layer with its relative depth, e.g. 'layer 8 (44%)'.")
    tokens: int
    per_token: list[TokenReadout] | None = Field(None, description="With per_token: the top 3 concepts at every token "
                                                                   "(BOS left out: it is no text).")
    drift: str | None = Field(None, description="Set when training has moved the served weights away from the ones the "
                                                "readout was fit on: how far, and how to refit.")


class ConceptInfo(BaseModel):
    concept: str
    name: str
    family: str
    valence: float
    arousal: float
    note: str = ""


class ListConceptsResult(BaseModel):
    count: int
    families: list[str]
    concepts: list[ConceptInfo]


class SteeringSide(BaseModel):
    text: str
    scores: dict[str, float | None] = Field(description="Unsteered re-read of this continuation for each steered concept.")
    tokens: int
    perplexity: float | None = Field(description="Perplexity of the continuation under the unsteered model.")
    score_note: str | None = Field(None, description="Why scores are null, when they are (e.g. an empty continuation).")


class TestSteeringResult(BaseModel):
    prompt: str
    concepts: dict[str, float]
    layers: list[int]
    positions: str
    seed: int | None
    baseline: SteeringSide
    steered: SteeringSide
    delta: dict[str, float | None] = Field(description="steered minus baseline score per concept.")


class CorrectionResult(BaseModel):
    correction_id: str
    status: str
    duplicate: bool = Field(description="True when the idempotency_key matched an earlier submission (stored once).")
    training_job: str | None = Field(None, description="Job id when train_now queued a training job.")
    training_loss: str | None = Field(None, description="'orpo' (with rejected) or 'sft' when a job was queued.")
    message: str


class WorkerStatus(BaseModel):
    """The training worker as an agent sees it (a public contract: the worker's internal status may change)."""

    alive: bool = Field(description="Whether the training worker process is running and ready.")
    pid: int | None = None
    error: str | None = Field(None, description="Why the worker is not running, when it is not.")
    queue: list[str] = Field(default_factory=list, description="Job ids waiting, oldest first.")
    current_job: str | None = None
    step: int | None = Field(None, description="Steps done in the current job.")
    total_steps: int | None = None
    loss: float | None = Field(None, description="Loss of the latest step.")
    last_error: str | None = None
    jobs_finished: int = 0
    optimizer: str = Field("", description="Optimizer and what it trains, e.g. 'APOLLO rank 64, 235 tensors'.")
    rollback_available: list[str] = Field(default_factory=list, description="Jobs that can still be undone exactly.")
    weights_changing: bool = Field(False, description="True while a step writes the served weights (readouts then see a mix).")

    @classmethod
    def from_internal(cls, st: TrainStatus) -> "WorkerStatus":
        return cls(alive=st.worker_alive, pid=st.worker_pid, error=st.worker_error, queue=list(st.queue),
                   current_job=st.current_job, step=st.step, total_steps=st.total_steps, loss=st.loss,
                   last_error=st.last_error, jobs_finished=st.jobs_finished, optimizer=st.optimizer,
                   rollback_available=list(st.rollback_available), weights_changing=st.weights_version % 2 == 1)


class TrainStatusResult(BaseModel):
    enabled: bool = Field(description="False when the server runs without the training worker (--no-train).")
    message: str
    worker: WorkerStatus | None = Field(None, description="The training worker: queue, current job, step, loss.")
    next_checkpoint_sync: str | None = Field(None, description="ISO time of the scheduled checkpoint sync, if any.")
    corrections: dict[str, int] = Field(default_factory=dict, description="Stored corrections by status.")
    readout_drift: str | None = Field(None, description="How far the served weights have drifted from the ones the "
                                                        "readout was fit on (None: not at all), and how to refit.")
