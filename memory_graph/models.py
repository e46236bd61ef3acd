"""Typed nodes and edges of the memory graph (pydantic models: they are what goes to disk).

Node kinds and what later features use them for:

* ``memory``: something the agent lived through, with emotion scores (vector training, replay).
* ``correction``: "in this context say *preferred*, not *rejected*"; moves through
  pending → queued → trained → certified / rolled_back as the dream loop handles it.
* ``invariant``: a behavioural rule with a judge (kind + params), test-case templates and the
  pass-rate threshold a certificate must reach.
* ``scenario``: one generated test case for an invariant.
* ``certificate``: the statistics of one evaluation of an invariant on one model.
* ``cycle``: one dream cycle (phase and progress while it runs, then outcome and measurements).

Lifecycle fields (status, history, failure counts, revocation, retirement) change after creation; every other
field is content, which is what an idempotent retry must match exactly.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, JsonValue, TypeAdapter,
                      model_validator)

from .tags import EMOTION_ID

NodeKind = Literal["memory", "correction", "invariant", "scenario", "certificate", "cycle"]
NODE_KINDS: tuple[NodeKind, ...] = ("memory", "correction", "invariant", "scenario", "certificate", "cycle")
EdgeKind = Literal["about", "violates", "exemplifies", "derived_from", "certifies"]
EDGE_KINDS: tuple[EdgeKind, ...] = ("about", "violates", "exemplifies", "derived_from", "certifies")
CorrectionStatus = Literal["pending", "queued", "trained", "certified", "rolled_back"]
CORRECTION_STATUSES: tuple[CorrectionStatus, ...] = ("pending", "queued", "trained", "certified", "rolled_back")

# Which correction status may follow which. Training can be abandoned (queued -> pending), a
# certificate can be revoked later (certified -> rolled_back) and a rolled-back correction can be
# tried again (rolled_back -> queued).
STATUS_TRANSITIONS: dict[str, tuple[str, ...]] = {
    "pending": ("queued",),
    "queued": ("pending", "trained"),
    "trained": ("certified", "rolled_back"),
    "certified": ("rolled_back",),
    "rolled_back": ("queued",),
}

# (allowed source kinds, allowed target kinds) per edge kind. Restricting endpoints keeps queries
# like "corrections about invariant X" meaningful without checking kinds at every call site.
EDGE_RULES: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "about": (frozenset({"memory", "correction", "scenario", "cycle"}), frozenset({"memory", "correction", "invariant"})),
    "violates": (frozenset({"memory", "correction", "scenario"}), frozenset({"invariant"})),
    "exemplifies": (frozenset({"memory", "correction", "scenario"}), frozenset({"invariant"})),
    "derived_from": (
        frozenset({"memory", "correction", "invariant", "scenario", "certificate"}),
        frozenset({"memory", "correction", "invariant", "scenario"}),
    ),
    "certifies": (frozenset({"certificate"}), frozenset({"invariant", "correction"})),
}

_ID_PREFIX: dict[str, str] = {
    "memory": "mem", "correction": "cor", "invariant": "inv", "scenario": "scn", "certificate": "cert",
    "cycle": "cyc",
}
NODE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
NodeId = Annotated[str, Field(pattern=NODE_ID_PATTERN)]
NonBlank = Annotated[str, Field(min_length=1, pattern=r"\S")]
Score = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Slug = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_.-]{0,99}$")]


def new_id(kind: NodeKind) -> str:
    return f"{_ID_PREFIX[kind]}-{uuid.uuid4().hex[:16]}"


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def parse_time(value: str | datetime) -> datetime:
    """A stored time (ISO 8601, maybe with a 'Z' that Python 3.10's fromisoformat rejects)."""
    if isinstance(value, datetime):
        return value
    return datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith("Z") else value)


def _sorted_scores(value: dict[str, float]) -> dict[str, float]:
    return dict(sorted(value.items()))


# The id pattern is checked by pydantic-core (fast at 100k nodes); the message names the pattern.
EmotionId = Annotated[str, Field(pattern=EMOTION_ID.pattern)]
EmotionScores = Annotated[dict[EmotionId, Score], AfterValidator(_sorted_scores)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeBase(_Model):
    kind: NodeKind
    id: NodeId
    time: AwareDatetime = Field(default_factory=utc_now)
    idempotency_key: Annotated[str, Field(min_length=1, max_length=256)] | None = None

    LIFECYCLE_FIELDS: ClassVar[frozenset[str]] = frozenset()

    def content(self) -> dict[str, Any]:
        """The fields an idempotent retry must reproduce (not id, time, key or lifecycle state)."""
        skip = {"id", "time", "idempotency_key", *self.LIFECYCLE_FIELDS}
        return self.model_dump(mode="json", exclude=skip)

    def payload(self) -> dict[str, Any]:
        """JSON-ready attributes for the networkx node (the id is the node key, not an attribute)."""
        return self.model_dump(mode="json", exclude={"id"})


class Memory(NodeBase):
    kind: Literal["memory"] = "memory"
    text: NonBlank
    source: NonBlank = "agent"
    tags: tuple[Annotated[str, Field(pattern=r"^\S{1,100}$")], ...] = ()
    emotions: EmotionScores = Field(default_factory=dict)
    failures: int = Field(0, ge=0)
    last_failure: AwareDatetime | None = None

    LIFECYCLE_FIELDS: ClassVar[frozenset[str]] = frozenset({"failures", "last_failure"})


class StatusChange(_Model):
    status: CorrectionStatus
    time: AwareDatetime
    note: str | None = None
    job_id: str | None = None


class Correction(NodeBase):
    kind: Literal["correction"] = "correction"
    context: NonBlank
    preferred: NonBlank
    rejected: NonBlank | None = None
    note: str | None = None
    invariant_id: NodeId | None = None
    emotions: EmotionScores = Field(default_factory=dict)
    status: CorrectionStatus = "pending"
    job_id: Annotated[str, Field(min_length=1, max_length=128)] | None = Field(
        None, description="The training job that holds (queued) or trained (trained, rolled_back) this correction.")
    history: tuple[StatusChange, ...] = ()
    failures: int = Field(0, ge=0)
    last_failure: AwareDatetime | None = None

    LIFECYCLE_FIELDS: ClassVar[frozenset[str]] = frozenset({"status", "job_id", "history", "failures", "last_failure"})

    @model_validator(mode="after")
    def _distinct(self) -> "Correction":
        if self.rejected is not None and self.rejected.strip() == self.preferred.strip():
            raise ValueError("preferred and rejected are the same text, so there is nothing to learn; "
                             "leave rejected empty or give the response that was actually wrong")
        return self


class JudgeSpec(_Model):
    """How a scenario's response is judged: `kind` names a judge the dream loop knows
    (e.g. "regex", "llm", "emotion_readout"), `params` are passed to it verbatim."""

    kind: Slug
    params: dict[str, JsonValue] = Field(default_factory=dict)


class Invariant(NodeBase):
    kind: Literal["invariant"] = "invariant"
    name: Slug
    description: NonBlank
    judge: JudgeSpec
    templates: tuple[NonBlank, ...] = ()
    threshold: float = Field(gt=0.0, le=1.0)
    confidence: float = Field(0.95, gt=0.0, lt=1.0)
    spec: dict[str, JsonValue] | None = Field(
        None, description="The whole invariant as written (cases, templates, judge): the dream loop reads it back.")
    retired: bool = Field(False, description="Removed or replaced: kept for history, no longer tested or trained. "
                                             "At most one invariant of a name is not retired.")

    LIFECYCLE_FIELDS: ClassVar[frozenset[str]] = frozenset({"retired"})


class Scenario(NodeBase):
    kind: Literal["scenario"] = "scenario"
    invariant_id: NodeId
    prompt: NonBlank
    template: str | None = None
    variables: dict[str, str] = Field(default_factory=dict)
    expected: str | None = None
    generator: NonBlank = "dream"
    seed: int | None = None
    failures: int = Field(0, ge=0)
    last_failure: AwareDatetime | None = None

    LIFECYCLE_FIELDS: ClassVar[frozenset[str]] = frozenset({"failures", "last_failure"})


ReviewDecision = Literal["approve", "reject"]


class CertificateReview(_Model):
    """One operator decision on a certificate: who, when, why. Reviews are only ever appended."""

    decision: ReviewDecision
    operator: NonBlank
    reason: NonBlank
    time: AwareDatetime
    via: NonBlank = "cli"


class Certificate(NodeBase):
    """One statistically checked evaluation: `successes` of `trials` scenarios passed the judge.

    A passing certificate must have its lower confidence bound at or above the invariant's
    threshold; the model refuses anything else so a certificate can be trusted without redoing
    the arithmetic.
    """

    kind: Literal["certificate"] = "certificate"
    invariant_id: NodeId
    model: NonBlank
    trials: int = Field(ge=1)
    successes: int = Field(ge=0)
    threshold: float = Field(gt=0.0, le=1.0)
    confidence: float = Field(gt=0.0, lt=1.0)
    lower_bound: Score
    upper_bound: Score
    method: NonBlank
    p_value: Score | None = None
    passed: bool
    details: dict[str, JsonValue] = Field(default_factory=dict)
    revoked: bool = False
    revoked_reason: str | None = None
    reviews: tuple[CertificateReview, ...] = Field((), description="Operator decisions, oldest first (append-only).")

    LIFECYCLE_FIELDS: ClassVar[frozenset[str]] = frozenset({"revoked", "revoked_reason", "reviews"})

    @property
    def pass_rate(self) -> float:
        return self.successes / self.trials

    @model_validator(mode="after")
    def _consistent(self) -> "Certificate":
        if self.successes > self.trials:
            raise ValueError(f"successes ({self.successes}) cannot exceed trials ({self.trials})")
        rate = self.successes / self.trials
        eps = 1e-9
        if not (self.lower_bound - eps <= rate <= self.upper_bound + eps):
            raise ValueError(f"the confidence interval [{self.lower_bound}, {self.upper_bound}] must contain "
                             f"the observed pass rate {rate:.6g}")
        if self.passed and self.lower_bound + eps < self.threshold:
            raise ValueError(f"a passing certificate needs lower_bound >= threshold; got lower_bound "
                             f"{self.lower_bound} < threshold {self.threshold}")
        return self


CyclePhase = Literal["start", "baseline", "sample", "respond", "judge", "train", "evaluate", "rollback", "sync",
                     "record", "done"]
CycleOutcome = Literal["kept", "rolled_back", "no_failures", "interrupted", "failed", "dry_run"]
CYCLE_OUTCOMES: tuple[CycleOutcome, ...] = ("kept", "rolled_back", "no_failures", "interrupted", "failed", "dry_run")


class DreamCycle(NodeBase):
    """One dream cycle: written when it starts, updated as it goes, finished with its outcome.

    Content (fixed at start): who runs it (pid and the pid's start time, so a reused pid is not
    mistaken for a live cycle), its seed and settings, and the weights hash it started from. All
    the rest is lifecycle: the phase and progress while it runs (what a cycle killed mid-way leaves
    behind for the next one to report), then the outcome, the measurements and the training stats.
    The structured parts are plain JSON here (the graph imports nothing of ours); dream/loop.py
    writes them from its typed report.
    """

    kind: Literal["cycle"] = "cycle"
    pid: int = Field(ge=0)
    pid_start: int | None = Field(None, description="The owner process's start time (clock ticks, /proc/PID/stat).")
    host: str = ""
    runner: NonBlank = Field("standalone", description="'standalone' (`amygdala dream --once`) or 'daemon'.")
    seed: int = 0
    dry_run: bool = False
    settings: dict[str, JsonValue] = Field(default_factory=dict)
    weights_before: str | None = None
    finished: AwareDatetime | None = None
    phase: CyclePhase = "start"
    outcome: CycleOutcome | None = None
    reason: str | None = None
    progress: dict[str, JsonValue] = Field(default_factory=dict)
    temperature: float | None = None
    failure_rate: float | None = None
    counts: dict[str, int] = Field(default_factory=dict)
    invariants: dict[str, JsonValue] = Field(default_factory=dict, description="Per invariant: held-out before/after.")
    perplexity: dict[str, JsonValue] = Field(default_factory=dict)
    training: dict[str, JsonValue] = Field(default_factory=dict)
    triplets: list[JsonValue] = Field(default_factory=list)
    cases: list[JsonValue] = Field(default_factory=list)
    timings: dict[str, float] = Field(default_factory=dict)
    weights_after: str | None = Field(None, description="Hash right after training (before the keep/rollback decision).")
    weights_final: str | None = Field(None, description="Hash the cycle left the weights at.")
    details: dict[str, JsonValue] = Field(default_factory=dict)

    LIFECYCLE_FIELDS: ClassVar[frozenset[str]] = frozenset({
        "finished", "phase", "outcome", "reason", "progress", "temperature", "failure_rate", "counts", "invariants",
        "perplexity", "training", "triplets", "cases", "timings", "weights_after", "weights_final", "details"})

    @property
    def running(self) -> bool:
        return self.finished is None


Node = Annotated[Union[Memory, Correction, Invariant, Scenario, Certificate, DreamCycle], Field(discriminator="kind")]
NODE_ADAPTER: TypeAdapter[Node] = TypeAdapter(Node)
NODE_CLASSES: dict[str, type[NodeBase]] = {
    "memory": Memory, "correction": Correction, "invariant": Invariant, "scenario": Scenario,
    "certificate": Certificate, "cycle": DreamCycle,
}


class Edge(_Model):
    source: NodeId
    target: NodeId
    kind: EdgeKind
    time: AwareDatetime = Field(default_factory=utc_now)
    note: str | None = None

    @model_validator(mode="after")
    def _no_loop(self) -> "Edge":
        if self.source == self.target:
            raise ValueError(f"an edge cannot point from {self.source} to itself")
        return self

    def payload(self) -> dict[str, Any]:
        """Attributes for the networkx edge; source/target/kind are the edge's (u, v, key)."""
        return self.model_dump(mode="json", exclude={"source", "target"})


def node_from_attrs(node_id: str, attrs: dict[str, Any]) -> Node:
    return NODE_ADAPTER.validate_python({**attrs, "id": node_id})


def edge_from_attrs(source: str, target: str, attrs: dict[str, Any]) -> Edge:
    return Edge.model_validate({**attrs, "source": source, "target": target})
