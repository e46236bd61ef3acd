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
    per_token: list[TokenReadout] | None = Field(None, description="With per_token: the top 3 concepts at every token.")


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


class TrainStatusResult(BaseModel):
    enabled: bool = Field(description="False when the server runs without the training worker (--no-train).")
    message: str
    worker: TrainStatus | None = Field(None, description="The training worker's own status (queue, current job, step, loss).")
    next_checkpoint_sync: str | None = Field(None, description="ISO time of the scheduled checkpoint sync, if any.")
    corrections: dict[str, int] = Field(default_factory=dict, description="Stored corrections by status.")
