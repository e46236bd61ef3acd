"""Choosing what the dream loop replays: salient, recent and failing material, with old material mixed in.

Each candidate (memories and corrections by default) gets

    weight = (floor + salience) * failure_boost * recency
    salience = its strongest emotion score (0 when unscored)
    failure_boost = 1 + failure_weight * failures
    recency = 0.5 ** (age_days / half_life_days)

Pure recency weighting would starve old material, so candidates older than ``old_after_days``
form a separate *old* stratum that gets ``old_fraction`` of every batch and is weighted without
the recency factor. The old picks are then spread evenly through the batch (interleaved), so a
consumer that stops early still sees some of them. Draws are weighted without replacement
(Efraimidis-Spirakis keys) from a `random.Random(seed)` over candidates sorted by id: the same
graph, seed and `now` always give the same batch.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Literal

import networkx as nx

from .models import NodeKind, parse_time, utc_now

if TYPE_CHECKING:
    from .store import MemoryGraph

Stratum = Literal["recent", "old"]
_SECONDS_PER_DAY = 86_400.0


@dataclass(frozen=True)
class ReplayConfig:
    kinds: tuple[NodeKind, ...] = ("memory", "correction")
    half_life_days: float = 7.0
    floor: float = 0.05
    failure_weight: float = 0.5
    old_after_days: float = 7.0
    old_fraction: float = 0.3

    def __post_init__(self) -> None:
        if self.half_life_days <= 0:
            raise ValueError(f"half_life_days must be > 0, got {self.half_life_days}")
        if self.floor <= 0:
            raise ValueError(f"floor must be > 0 so unscored items can still be drawn, got {self.floor}")
        if self.failure_weight < 0:
            raise ValueError(f"failure_weight must be >= 0, got {self.failure_weight}")
        if self.old_after_days < 0:
            raise ValueError(f"old_after_days must be >= 0, got {self.old_after_days}")
        if not 0.0 <= self.old_fraction <= 1.0:
            raise ValueError(f"old_fraction must be in [0, 1], got {self.old_fraction}")
        if not self.kinds:
            raise ValueError("kinds must name at least one node kind")


@dataclass(frozen=True)
class ReplayWeight:
    node_id: str
    kind: str
    salience: float
    recency: float
    failure_boost: float
    stratum: Stratum
    weight: float


@dataclass(frozen=True)
class ReplayItem:
    node_id: str
    kind: str
    stratum: Stratum
    weight: float


def _as_graph(graph: "nx.MultiDiGraph | MemoryGraph") -> nx.MultiDiGraph:
    return graph if isinstance(graph, nx.MultiDiGraph) else graph.to_networkx()


def replay_weights(graph: "nx.MultiDiGraph | MemoryGraph", *, now: datetime | None = None,
                   config: ReplayConfig = ReplayConfig()) -> list[ReplayWeight]:
    """The weight of every candidate, sorted by node id (the order draws are made in)."""
    g = _as_graph(graph)
    now = utc_now() if now is None else now
    out: list[ReplayWeight] = []
    for node_id in sorted(n for n, a in g.nodes(data=True) if a.get("kind") in config.kinds):
        attrs = g.nodes[node_id]
        age_days = max(0.0, (now - parse_time(attrs["time"])).total_seconds() / _SECONDS_PER_DAY)
        salience = max((float(v) for v in (attrs.get("emotions") or {}).values()), default=0.0)
        recency = 0.5 ** (age_days / config.half_life_days)
        boost = 1.0 + config.failure_weight * int(attrs.get("failures") or 0)
        stratum: Stratum = "old" if age_days > config.old_after_days else "recent"
        base = (config.floor + salience) * boost
        weight = base if stratum == "old" else base * recency
        out.append(ReplayWeight(node_id, attrs["kind"], salience, recency, boost, stratum, weight))
    return out


def _draw(candidates: list[ReplayWeight], k: int, rng: random.Random) -> list[ReplayWeight]:
    """k weighted draws without replacement; one uniform per candidate, in the given order."""
    keyed = []
    for c in candidates:
        u = 1.0 - rng.random()  # in (0, 1], so log is finite
        key = math.log(u) / c.weight if c.weight > 0 else -math.inf
        keyed.append((key, c))
    keyed.sort(key=lambda kc: kc[0], reverse=True)  # stable: ties keep id order
    return [c for _, c in keyed[:k]]


def _interleave(recent: list[ReplayWeight], old: list[ReplayWeight]) -> list[ReplayWeight]:
    total = len(recent) + len(old)
    out: list[ReplayWeight] = []
    r = o = 0
    for step in range(total):
        # Take an old item whenever the old share so far would fall behind an even spread.
        if o < len(old) and (r >= len(recent) or (o + 0.5) * total <= (step + 1) * len(old)):
            out.append(old[o])
            o += 1
        else:
            out.append(recent[r])
            r += 1
    return out


def sample_for_replay(graph: "nx.MultiDiGraph | MemoryGraph", k: int, *, seed: int, now: datetime | None = None,
                      config: ReplayConfig = ReplayConfig()) -> list[ReplayItem]:
    """Up to `k` distinct candidates, old ones interleaved among recent ones."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    weights = replay_weights(graph, now=now, config=config)
    recent = [w for w in weights if w.stratum == "recent"]
    old = [w for w in weights if w.stratum == "old"]
    k = min(k, len(weights))
    k_old = min(len(old), round(k * config.old_fraction))
    k_recent = min(len(recent), k - k_old)
    k_old = min(len(old), k - k_recent)  # a short recent stratum leaves room for more old items
    rng = random.Random(seed)
    picked_recent = _draw(recent, k_recent, rng)
    picked_old = _draw(old, k_old, rng)
    return [ReplayItem(w.node_id, w.kind, w.stratum, w.weight) for w in _interleave(picked_recent, picked_old)]
