"""extract_training_pairs: per-emotion thresholds, unscored memories, tag stripping, ORPO triplets, JSONL files."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from amygdala.memory_graph import EmotionThreshold, MemoryGraph, extract_training_pairs

T0 = datetime(2025, 5, 1, tzinfo=timezone.utc)


@pytest.fixture()
def graph(tmp_path: Path) -> MemoryGraph:
    g = MemoryGraph(tmp_path / "g")
    scores = {  # memory name -> tag-line scores
        "hi": {"frustrated": 0.9, "curious": 0.1},
        "edge_pos": {"frustrated": 0.6},          # exactly the positive threshold
        "mid": {"frustrated": 0.4, "curious": 0.5},
        "edge_neg": {"frustrated": 0.2},          # exactly the negative threshold
        "low": {"frustrated": 0.0, "curious": 0.95},
        "none": {},
    }
    for i, (name, s) in enumerate(scores.items()):
        tag = ("\nemotion: " + " ".join(f"{k}={v}" for k, v in s.items())) if s else ""
        g.add_memory(f"memory {name}{tag}", time=T0 + timedelta(minutes=i))
    g.add_invariant("honest", "No invented facts.", {"kind": "regex"}, threshold=0.9)
    a = g.submit_correction("ctx a", "good a", "bad a", invariant="honest", time=T0 + timedelta(hours=1))
    g.submit_correction("ctx b", "good b", None, time=T0 + timedelta(hours=2))
    c = g.submit_correction("ctx c", "good c", "bad c", time=T0 + timedelta(hours=3))
    g.set_correction_status(c.id, "queued")
    d = g.submit_correction("ctx d", "good d", "bad d", time=T0 + timedelta(hours=4))
    g.set_correction_status(d.id, "queued")
    g.set_correction_status(d.id, "trained")
    g._ids = {"a": a.id, "c": c.id, "d": d.id}  # type: ignore[attr-defined]
    yield g
    g.close()


def _names(result, emotion: str, label: str) -> list[str]:  # type: ignore[no-untyped-def]
    return [e.text.removeprefix("memory ") for e in result.examples if e.emotion == emotion and e.label == label]


def test_thresholds_are_inclusive_and_the_middle_is_left_out(graph: MemoryGraph) -> None:
    r = extract_training_pairs(graph, {"frustrated": (0.6, 0.2)})
    assert _names(r, "frustrated", "positive") == ["hi", "edge_pos"]
    assert _names(r, "frustrated", "negative") == ["edge_neg", "low"]
    assert r.counts["frustrated"].positive == 2 and r.counts["frustrated"].negative == 2
    assert {e.emotion for e in r.examples} == {"frustrated"}


def test_per_emotion_thresholds_and_a_default_for_the_rest(graph: MemoryGraph) -> None:
    r = extract_training_pairs(graph, {"*": EmotionThreshold(positive=0.5, negative=0.1),
                                       "frustrated": EmotionThreshold(positive=0.95, negative=0.0)})
    assert _names(r, "frustrated", "positive") == []
    assert _names(r, "frustrated", "negative") == ["low"]
    assert _names(r, "curious", "positive") == ["mid", "low"]
    assert _names(r, "curious", "negative") == ["hi"]
    assert any("'frustrated' has no positive examples" in w for w in r.warnings)


def test_unscored_memories_are_skipped_unless_missing_counts_as_zero(graph: MemoryGraph) -> None:
    skip = extract_training_pairs(graph, {"curious": (0.9, 0.1)})
    assert _names(skip, "curious", "negative") == ["hi"]
    zero = extract_training_pairs(graph, {"curious": (0.9, 0.1)}, missing="zero")
    assert _names(zero, "curious", "negative") == ["hi", "edge_pos", "edge_neg", "none"]


def test_example_text_has_no_tag_lines(graph: MemoryGraph) -> None:
    r = extract_training_pairs(graph, {"*": (0.5, 0.2)})
    assert r.examples and all("emotion:" not in e.text for e in r.examples)


def test_bad_thresholds_are_refused() -> None:
    with pytest.raises(ValueError, match="must be below positive"):
        EmotionThreshold(positive=0.3, negative=0.3)
    g_empty = __import__("networkx").MultiDiGraph()
    with pytest.raises(ValueError, match="not an emotion id"):
        extract_training_pairs(g_empty, {"Frustrated": (0.6, 0.2)})
    with pytest.raises(ValueError, match="no thresholds"):
        extract_training_pairs(g_empty, {})


def test_corrections_become_orpo_triplets_by_status(graph: MemoryGraph) -> None:
    ids = graph._ids  # type: ignore[attr-defined]
    r = extract_training_pairs(graph, {"*": (0.5, 0.2)})
    assert [(t.prompt, t.chosen, t.rejected) for t in r.triplets] == [("ctx a", "good a", "bad a"), ("ctx c", "good c", "bad c")]
    assert r.triplets[0].invariant_id == graph.invariant("honest").id and r.triplets[0].correction_id == ids["a"]
    assert len(r.without_rejected) == 1 and any("no rejected response" in w for w in r.warnings)
    trained = extract_training_pairs(graph, {"*": (0.5, 0.2)}, statuses=["trained"])
    assert [t.correction_id for t in trained.triplets] == [ids["d"]]
    everything = extract_training_pairs(graph, {"*": (0.5, 0.2)}, statuses=None)
    assert len(everything.triplets) == 3


def test_jsonl_files_are_written_and_read_back(graph: MemoryGraph, tmp_path: Path) -> None:
    out = tmp_path / "train"
    r = extract_training_pairs(graph, {"frustrated": (0.6, 0.2)}, out)
    rows = [json.loads(line) for line in r.example_path.read_text().splitlines()]  # type: ignore[union-attr]
    assert [(x["label"], x["score"]) for x in rows] == [("positive", 0.9), ("positive", 0.6), ("negative", 0.2), ("negative", 0.0)]
    assert set(rows[0]) == {"emotion", "label", "text", "score", "memory_id", "time"}
    trip = [json.loads(line) for line in r.triplet_path.read_text().splitlines()]  # type: ignore[union-attr]
    assert [t["prompt"] for t in trip] == ["ctx a", "ctx c"]
    assert set(trip[0]) >= {"prompt", "chosen", "rejected", "correction_id"}
    # Deterministic: the same graph gives byte-identical files.
    first = r.example_path.read_bytes()  # type: ignore[union-attr]
    extract_training_pairs(graph.to_networkx(), {"frustrated": (0.6, 0.2)}, out)
    assert r.example_path.read_bytes() == first  # type: ignore[union-attr]
