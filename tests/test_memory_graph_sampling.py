"""Replay sampling: the weight formula, proportional draws, interleaving of old material, seeds."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import networkx as nx
import pytest

from amygdala.memory_graph import MemoryGraph, ReplayConfig, replay_weights, sample_for_replay
from amygdala.memory_graph.models import Correction, Memory

NOW = datetime(2025, 6, 1, tzinfo=timezone.utc)


def _graph(items: list[tuple[str, float, float, int]]) -> nx.MultiDiGraph:
    """items: (id, age_days, salience, failures) -> a graph of memories."""
    g = nx.MultiDiGraph()
    for node_id, age, salience, failures in items:
        m = Memory(id=node_id, text=node_id, time=NOW - timedelta(days=age),
                   emotions={"curious": salience} if salience else {}, failures=failures)
        g.add_node(m.id, **m.payload())
    return g


def test_weight_formula() -> None:
    cfg = ReplayConfig(half_life_days=7, floor=0.05, failure_weight=0.5, old_after_days=30)
    g = _graph([("a", 0, 0.0, 0), ("b", 7, 0.0, 0), ("c", 14, 0.95, 0), ("d", 0, 0.45, 2), ("old", 60, 0.45, 0)])
    w = {x.node_id: x for x in replay_weights(g, now=NOW, config=cfg)}
    assert list(w) == ["a", "b", "c", "d", "old"]
    assert w["a"].weight == pytest.approx(0.05)
    assert w["b"].recency == pytest.approx(0.5) and w["b"].weight == pytest.approx(0.025)
    assert w["c"].weight == pytest.approx(1.0 * 0.25)
    assert w["d"].failure_boost == 2.0 and w["d"].weight == pytest.approx(0.5 * 2.0)
    # Old material is weighted without recency, or it would never come back.
    assert w["old"].stratum == "old" and w["old"].weight == pytest.approx(0.5)
    assert w["old"].recency < 0.01


def test_salience_is_the_strongest_emotion_and_corrections_count_too() -> None:
    g = nx.MultiDiGraph()
    c = Correction(id="c1", context="c", preferred="p", emotions={"a": 0.2, "b": 0.7}, time=NOW)
    g.add_node(c.id, **c.payload())
    (w,) = replay_weights(g, now=NOW)
    assert w.kind == "correction" and w.salience == 0.7
    assert replay_weights(g, now=NOW, config=ReplayConfig(kinds=("memory",))) == []


def test_same_seed_same_batch_and_different_seeds_differ() -> None:
    g = _graph([(f"m{i:02d}", i % 20, (i * 37 % 100) / 100, i % 3) for i in range(60)])
    a = sample_for_replay(g, 15, seed=7, now=NOW)
    assert a == sample_for_replay(g, 15, seed=7, now=NOW)
    # Node insertion order does not matter, only content and seed.
    shuffled = nx.MultiDiGraph()
    for n in reversed(list(g.nodes)):
        shuffled.add_node(n, **g.nodes[n])
    assert a == sample_for_replay(shuffled, 15, seed=7, now=NOW)
    others = {tuple(x.node_id for x in sample_for_replay(g, 15, seed=s, now=NOW)) for s in range(8, 20)}
    assert len(others) > 10
    assert len({x.node_id for x in a}) == 15


def test_draw_frequencies_follow_the_weights() -> None:
    g = _graph([("heavy", 0, 0.95, 0), ("mid", 0, 0.45, 0), ("light", 0, 0.0, 0)])  # weights 1.0, 0.5, 0.05
    counts = Counter(sample_for_replay(g, 1, seed=s, now=NOW)[0].node_id for s in range(4000))
    total = 1.0 + 0.5 + 0.05
    for node_id, weight in (("heavy", 1.0), ("mid", 0.5), ("light", 0.05)):
        assert counts[node_id] / 4000 == pytest.approx(weight / total, abs=0.03)


def test_failures_raise_the_chance_of_replay() -> None:
    g = _graph([("ok", 0, 0.5, 0), ("failed", 0, 0.5, 4)])  # boost 3x
    counts = Counter(sample_for_replay(g, 1, seed=s, now=NOW)[0].node_id for s in range(3000))
    assert counts["failed"] / 3000 == pytest.approx(0.75, abs=0.04)


def test_old_material_is_interleaved_even_when_recent_material_dominates() -> None:
    recent = [(f"r{i:02d}", 1, 0.95, 3) for i in range(30)]   # salient, failing, fresh
    old = [(f"o{i:02d}", 200, 0.0, 0) for i in range(30)]      # dull and ancient
    g = _graph(recent + old)
    cfg = ReplayConfig(old_fraction=0.3, old_after_days=30)
    batch = sample_for_replay(g, 10, seed=1, now=NOW, config=cfg)
    positions = [i for i, item in enumerate(batch) if item.stratum == "old"]
    assert len(positions) == 3 and all(batch[i].node_id.startswith("o") for i in positions)
    assert positions == [1, 4, 8]  # spread out, not bunched at the end
    seen_old = {item.node_id for s in range(200) for item in sample_for_replay(g, 10, seed=s, now=NOW, config=cfg)
                if item.stratum == "old"}
    assert len(seen_old) == 30  # every old memory keeps coming back
    no_old = sample_for_replay(g, 10, seed=1, now=NOW, config=ReplayConfig(old_fraction=0.0, old_after_days=30))
    assert all(item.stratum == "recent" for item in no_old)


def test_short_strata_are_topped_up_and_k_is_capped() -> None:
    g = _graph([("r0", 0, 0.5, 0), ("o0", 100, 0.5, 0), ("o1", 100, 0.5, 0), ("o2", 100, 0.5, 0)])
    cfg = ReplayConfig(old_fraction=0.25, old_after_days=30)
    batch = sample_for_replay(g, 3, seed=0, now=NOW, config=cfg)
    assert sorted(i.stratum for i in batch) == ["old", "old", "recent"]
    assert sorted(i.node_id for i in sample_for_replay(g, 99, seed=0, now=NOW, config=cfg)) == ["o0", "o1", "o2", "r0"]
    assert sample_for_replay(g, 0, seed=0, now=NOW) == []
    with pytest.raises(ValueError):
        sample_for_replay(g, -1, seed=0, now=NOW)
    with pytest.raises(ValueError, match="old_fraction"):
        ReplayConfig(old_fraction=1.5)


def test_works_on_a_store(tmp_path: Path) -> None:
    with MemoryGraph(tmp_path / "g") as g:
        for i in range(5):
            g.add_memory(f"m{i}\nemotion: curious=0.{i}", time=NOW - timedelta(days=i))
        g.submit_correction("c", "p", "r", time=NOW)
        batch = sample_for_replay(g, 4, seed=3, now=NOW)
        assert len(batch) == 4 and batch == sample_for_replay(g, 4, seed=3, now=NOW)
        assert {i.kind for i in sample_for_replay(g, 6, seed=3, now=NOW)} == {"memory", "correction"}
