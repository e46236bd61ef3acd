"""Training data out of the graph: emotion examples for vector training, correction triplets for ORPO.

Emotion examples: for each emotion with a threshold, a memory whose score is at or above
``positive`` is a positive example and one at or below ``negative`` a negative example; scores in
between are ambiguous and left out. A memory without a score for the emotion is left out too
unless ``missing="zero"``: an absent tag usually means "not annotated", not "not felt".
Example text has its tag lines removed, so a vector cannot learn to detect the tag itself.

Triplets: each correction (by default those still ``pending`` or ``queued``) with a rejected
response becomes ``{"prompt": context, "chosen": preferred, "rejected": rejected}``, the field
names ORPO trainers expect. Corrections without a rejected response are listed, not dropped
silently.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import networkx as nx
from pydantic import AwareDatetime, BaseModel, ConfigDict, model_validator

from amygdala.fsio import atomic_write
from .models import Correction, CorrectionStatus, Memory, Score, node_from_attrs
from .tags import EMOTION_ID, strip_tag_lines

if TYPE_CHECKING:
    from .store import MemoryGraph

VECTOR_FILE = "emotion_examples.jsonl"
ORPO_FILE = "orpo_triplets.jsonl"
DEFAULT_STATUSES: tuple[CorrectionStatus, ...] = ("pending", "queued")
ALL_EMOTIONS = "*"


class EmotionThreshold(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    positive: Score
    negative: Score

    @model_validator(mode="after")
    def _ordered(self) -> "EmotionThreshold":
        if not self.negative < self.positive:
            raise ValueError(f"negative ({self.negative}) must be below positive ({self.positive}), or a memory "
                             "could be both a positive and a negative example")
        return self


class EmotionExample(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    emotion: str
    label: Literal["positive", "negative"]
    text: str
    score: float
    memory_id: str
    time: AwareDatetime


class OrpoTriplet(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str
    chosen: str
    rejected: str
    correction_id: str
    invariant_id: str | None = None
    status: CorrectionStatus
    note: str | None = None


@dataclass
class EmotionCounts:
    positive: int = 0
    negative: int = 0


@dataclass
class ExtractionResult:
    examples: list[EmotionExample]
    triplets: list[OrpoTriplet]
    counts: dict[str, EmotionCounts]
    without_rejected: list[str]
    warnings: list[str] = field(default_factory=list)
    example_path: Path | None = None
    triplet_path: Path | None = None


Thresholds = Mapping[str, EmotionThreshold | tuple[float, float]]


def _as_graph(graph: "nx.MultiDiGraph | MemoryGraph") -> nx.MultiDiGraph:
    return graph if isinstance(graph, nx.MultiDiGraph) else graph.to_networkx()


def _normalise(thresholds: Thresholds) -> dict[str, EmotionThreshold]:
    out: dict[str, EmotionThreshold] = {}
    for name, value in thresholds.items():
        if name != ALL_EMOTIONS and not EMOTION_ID.match(name):
            raise ValueError(f"threshold key {name!r} is not an emotion id (or '*' for every emotion)")
        out[name] = value if isinstance(value, EmotionThreshold) else EmotionThreshold(positive=value[0], negative=value[1])
    if not out:
        raise ValueError("no thresholds given; pass e.g. {'frustrated': (0.6, 0.2)} or {'*': (0.6, 0.2)}")
    return out


def _memories(g: nx.MultiDiGraph) -> list[Memory]:
    mems = [node_from_attrs(n, a) for n, a in g.nodes(data=True) if a.get("kind") == "memory"]
    return sorted((m for m in mems if isinstance(m, Memory)), key=lambda m: (m.time, m.id))


def emotion_examples(graph: "nx.MultiDiGraph | MemoryGraph", thresholds: Thresholds, *,
                     missing: Literal["skip", "zero"] = "skip") -> tuple[list[EmotionExample], dict[str, EmotionCounts], list[str]]:
    """(examples, counts per emotion, warnings) for every emotion in `thresholds` ('*' = all seen)."""
    if missing not in ("skip", "zero"):
        raise ValueError(f"missing must be 'skip' or 'zero', not {missing!r}")
    limits = _normalise(thresholds)
    memories = _memories(_as_graph(graph))
    seen = sorted({e for m in memories for e in m.emotions})
    emotions = sorted({*(k for k in limits if k != ALL_EMOTIONS), *(seen if ALL_EMOTIONS in limits else [])})
    texts = {m.id: strip_tag_lines(m.text) for m in memories}
    warnings = [f"memory {mid} has no text besides its tag lines; not used" for mid, t in texts.items() if not t.strip()]
    examples: list[EmotionExample] = []
    counts: dict[str, EmotionCounts] = {}
    for emotion in emotions:
        limit = limits.get(emotion) or limits[ALL_EMOTIONS]
        c = counts.setdefault(emotion, EmotionCounts())
        positives, negatives = [], []
        for m in memories:
            if not texts[m.id].strip():
                continue
            score = m.emotions.get(emotion, 0.0 if missing == "zero" else None)
            if score is None:
                continue
            if score >= limit.positive:
                positives.append((m, score))
            elif score <= limit.negative:
                negatives.append((m, score))
        for label, group in (("positive", positives), ("negative", negatives)):
            for m, score in group:
                examples.append(EmotionExample(emotion=emotion, label=label, text=texts[m.id], score=score,
                                               memory_id=m.id, time=m.time))
        c.positive, c.negative = len(positives), len(negatives)
        if not positives or not negatives:
            side = "positive" if not positives else "negative"
            warnings.append(f"emotion {emotion!r} has no {side} examples at thresholds "
                            f"positive>={limit.positive} negative<={limit.negative}")
    return examples, counts, warnings


def correction_triplets(graph: "nx.MultiDiGraph | MemoryGraph", *,
                        statuses: Collection[CorrectionStatus] | None = DEFAULT_STATUSES) -> tuple[list[OrpoTriplet], list[str]]:
    """(triplets, ids of selected corrections that have no rejected response). statuses=None: all."""
    g = _as_graph(graph)
    corrections = [node_from_attrs(n, a) for n, a in g.nodes(data=True) if a.get("kind") == "correction"]
    selected = sorted((c for c in corrections if isinstance(c, Correction) and (statuses is None or c.status in statuses)),
                      key=lambda c: (c.time, c.id))
    triplets = [OrpoTriplet(prompt=c.context, chosen=c.preferred, rejected=c.rejected, correction_id=c.id,
                            invariant_id=c.invariant_id, status=c.status, note=c.note)
                for c in selected if c.rejected is not None]
    return triplets, [c.id for c in selected if c.rejected is None]


def _jsonl(rows: list[BaseModel]) -> bytes:
    return "".join(json.dumps(r.model_dump(mode="json"), ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def extract_training_pairs(graph: "nx.MultiDiGraph | MemoryGraph", thresholds: Thresholds,
                           out_dir: Path | str | None = None, *, missing: Literal["skip", "zero"] = "skip",
                           statuses: Collection[CorrectionStatus] | None = DEFAULT_STATUSES) -> ExtractionResult:
    """Select emotion examples and correction triplets; with `out_dir`, also write both as JSONL.

    Files are replaced atomically, so a training job never reads a half-written file.
    """
    g = _as_graph(graph)
    examples, counts, warnings = emotion_examples(g, thresholds, missing=missing)
    triplets, without = correction_triplets(g, statuses=statuses)
    if without:
        warnings.append(f"{len(without)} correction(s) have no rejected response and are not ORPO triplets: "
                        + ", ".join(without[:10]) + (" ..." if len(without) > 10 else ""))
    result = ExtractionResult(examples=examples, triplets=triplets, counts=counts, without_rejected=without,
                              warnings=warnings)
    if out_dir is not None:
        out = Path(out_dir).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        result.example_path, result.triplet_path = out / VECTOR_FILE, out / ORPO_FILE
        atomic_write(result.example_path, _jsonl(list(examples)))
        atomic_write(result.triplet_path, _jsonl(list(triplets)))
    return result


def parse_threshold(spec: str) -> tuple[str, EmotionThreshold]:
    """'frustrated=0.6:0.2' (or '*=0.6:0.2') -> (emotion, threshold); for the CLI."""
    name, eq, values = spec.partition("=")
    pos, colon, neg = values.partition(":")
    if not eq or not colon:
        raise ValueError(f"threshold {spec!r} should look like emotion=POSITIVE:NEGATIVE, e.g. frustrated=0.6:0.2")
    try:
        return name.strip(), EmotionThreshold(positive=float(pos), negative=float(neg))
    except ValueError as exc:
        raise ValueError(f"threshold {spec!r}: {exc}") from None
