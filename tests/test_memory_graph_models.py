"""Node and edge types: round trips of every kind through the journal and the snapshot, validation,
edge rules and correction status transitions."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from pydantic import ValidationError

from amygdala.memory_graph import (NODE_KINDS, STATUS_TRANSITIONS, Certificate, Correction, DreamCycle, InvalidInputError,
                          InvalidTransitionError, Invariant, Memory, MemoryGraph, Scenario)
from amygdala.memory_graph.models import NODE_ADAPTER, node_from_attrs

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)


def _populate(g: MemoryGraph) -> dict[str, str]:
    inv = g.add_invariant("no_invented_facts", "Never state a fact it cannot support.",
                          {"kind": "llm", "params": {"rubric": "Is every claim supported?", "votes": 3, "strict": True}},
                          threshold=0.9, confidence=0.99, templates=["What is the capital of {country}?"], time=T0)
    mem = g.add_memory("Answered from memory, was wrong.\nemotion: ashamed=0.6 curious=0.2", source="session-17",
                       tags=["error", "geography"], links=[("violates", inv.id)], time=T0 + timedelta(minutes=1),
                       idempotency_key="mem-1")
    cor = g.submit_correction("What is the capital of Australia?", "Canberra.", "Sydney.", invariant="no_invented_facts",
                              note="classic confusion", idempotency_key="cor-1", emotions={"ashamed": 0.5},
                              links=[("derived_from", mem.id)], time=T0 + timedelta(minutes=2))
    scn = g.add_scenario(inv.id, "What is the capital of Canada?", template="What is the capital of {country}?",
                         variables={"country": "Canada"}, expected="Ottawa", seed=42, derived_from=[cor.id],
                         time=T0 + timedelta(minutes=3))
    g.set_correction_status(cor.id, "queued", time=T0 + timedelta(hours=1))
    g.set_correction_status(cor.id, "trained", note="adapter a1", time=T0 + timedelta(hours=2))
    cert = g.issue_certificate("no_invented_facts", model="gemma-270m+a1", trials=200, successes=196,
                               lower_bound=0.9497, upper_bound=0.9922, method="wilson", passed=True, p_value=0.001,
                               details={"seed": 3, "judge_votes": [1, 1, 0]}, corrections=[cor.id], scenarios=[scn.id],
                               time=T0 + timedelta(hours=3))
    g.set_correction_status(cor.id, "certified", time=T0 + timedelta(hours=3))
    g.record_failure(mem.id, time=T0 + timedelta(hours=4))
    g.add_edge(mem.id, inv.id, "exemplifies", note="negative example")
    cyc, _ = g.start_cycle(DreamCycle(id="cyc-1", pid=1, seed=7, time=T0 + timedelta(hours=5)),
                           is_running=lambda c: False, links=[("about", inv.id)])
    g.update_cycle(cyc.id, phase="done", outcome="kept", finished=T0 + timedelta(hours=6),
                   counts={"triplets": 3}, links=[("about", cor.id)])
    return {"invariant": inv.id, "memory": mem.id, "correction": cor.id, "scenario": scn.id, "certificate": cert.id,
            "cycle": cyc.id}


def _state(g: MemoryGraph) -> tuple[dict, list]:
    nodes = {n.id: n for n in g.nodes()}
    edges = sorted((e.source, e.target, e.kind, e.note) for e in g.edges())
    return nodes, edges


def test_every_node_kind_round_trips_through_journal_and_snapshot(tmp_path: Path) -> None:
    d = tmp_path / "g"
    with MemoryGraph(d, snapshot_every=None) as g:
        ids = _populate(g)
        written = _state(g)
    assert {written[0][i].kind for i in ids.values()} == set(NODE_KINDS)

    with MemoryGraph(d, readonly=True) as g:  # journal replay only
        assert not (d / "snapshot.json").exists()
        assert _state(g) == written
    with MemoryGraph(d) as g:
        g.snapshot()
    assert (d / "journal.log").read_bytes().count(b"\n") == 1  # just the header
    with MemoryGraph(d, readonly=True) as g:  # snapshot only
        nodes, edges = _state(g)
        assert (nodes, edges) == written
        cor = nodes[ids["correction"]]
        assert isinstance(cor, Correction)
        assert [h.status for h in cor.history] == ["pending", "queued", "trained", "certified"]
        assert cor.history[2].note == "adapter a1"
        mem = nodes[ids["memory"]]
        assert isinstance(mem, Memory) and mem.failures == 1 and mem.emotions == {"ashamed": 0.6, "curious": 0.2}
        inv = nodes[ids["invariant"]]
        assert isinstance(inv, Invariant) and inv.judge.params == {"rubric": "Is every claim supported?", "votes": 3, "strict": True}
        cert = nodes[ids["certificate"]]
        assert isinstance(cert, Certificate) and cert.pass_rate == 0.98 and cert.details["judge_votes"] == [1, 1, 0]
        assert isinstance(nodes[ids["scenario"]], Scenario)
        assert {(e.kind, e.target) for e in g.edges(ids["certificate"], direction="out")} == {
            ("certifies", ids["invariant"]), ("certifies", ids["correction"]), ("derived_from", ids["scenario"])}


def test_payload_round_trip_is_exact_for_each_kind(tmp_path: Path) -> None:
    with MemoryGraph(tmp_path / "g") as g:
        _populate(g)
        for node in g.nodes():
            again = node_from_attrs(node.id, node.payload())
            assert again == node and type(again) is type(node)
            assert NODE_ADAPTER.validate_json(node.model_dump_json()) == node


def test_times_must_carry_a_zone() -> None:
    with pytest.raises(ValidationError):
        Memory(id="m1", text="x", time=datetime(2025, 1, 1))


@pytest.mark.parametrize("fields, message", [
    (dict(trials=10, successes=11, lower_bound=0.5, upper_bound=1.0, passed=False), "cannot exceed"),
    (dict(trials=10, successes=9, lower_bound=0.95, upper_bound=1.0, passed=False), "must contain"),
    (dict(trials=10, successes=9, lower_bound=0.6, upper_bound=0.98, passed=True), "lower_bound >= threshold"),
])
def test_certificate_statistics_must_be_consistent(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Certificate(id="c1", invariant_id="i1", model="m", threshold=0.8, confidence=0.95, method="wilson", **fields)


def test_correction_with_identical_preferred_and_rejected_is_refused(tmp_path: Path) -> None:
    with MemoryGraph(tmp_path / "g") as g:
        with pytest.raises(InvalidInputError, match="nothing to learn"):
            g.submit_correction("ctx", "same answer", " same answer ")
        with pytest.raises(InvalidInputError, match="context"):
            g.submit_correction("   ", "a", "b")
        assert len(g) == 0


def test_edges_only_connect_the_kinds_they_are_meant_for(tmp_path: Path) -> None:
    with MemoryGraph(tmp_path / "g") as g:
        ids = _populate(g)
        before = g.seq
        with pytest.raises(InvalidInputError, match="'certifies' edge cannot go from a memory"):
            g.add_edge(ids["memory"], ids["invariant"], "certifies")
        with pytest.raises(InvalidInputError, match="no node 'nope'"):
            g.add_edge(ids["memory"], "nope", "about")
        with pytest.raises(InvalidInputError, match="itself"):
            g.add_edge(ids["memory"], ids["memory"], "about")
        with pytest.raises(InvalidInputError, match="not an existing scenario"):
            g.issue_certificate(ids["invariant"], model="m", trials=1, successes=1, lower_bound=0.95, upper_bound=1.0,
                                method="x", passed=True, scenarios=[ids["memory"]])
        assert g.seq == before


def test_certificate_cannot_use_a_weaker_threshold_than_its_invariant(tmp_path: Path) -> None:
    with MemoryGraph(tmp_path / "g") as g:
        g.add_invariant("r", "rule", {"kind": "regex"}, threshold=0.9)
        with pytest.raises(InvalidInputError, match="below invariant"):
            g.issue_certificate("r", model="m", trials=10, successes=10, lower_bound=0.8, upper_bound=1.0,
                                method="wilson", passed=True, threshold=0.5)
        cert = g.issue_certificate("r", model="m", trials=10, successes=7, lower_bound=0.4, upper_bound=0.9,
                                   method="wilson", passed=False)
        assert cert.threshold == 0.9 and cert.confidence == 0.95
        revoked = g.revoke_certificate(cert.id, "judge bug")
        assert revoked.revoked and revoked.revoked_reason == "judge bug"
        assert g.get(cert.id) == revoked


def test_status_transitions_follow_the_table(tmp_path: Path) -> None:
    with MemoryGraph(tmp_path / "g") as g:
        cid = g.submit_correction("c", "p", "r").id
        path = ["queued", "pending", "queued", "trained", "rolled_back", "queued", "trained", "certified", "rolled_back"]
        for status in path:
            assert status in STATUS_TRANSITIONS[g.get(cid).status]  # type: ignore[union-attr]
            g.set_correction_status(cid, status)  # type: ignore[arg-type]
        cor = g.get(cid)
        assert isinstance(cor, Correction)
        assert [h.status for h in cor.history] == ["pending", *path]

        with pytest.raises(InvalidTransitionError) as exc:
            g.set_correction_status(cid, "certified")
        assert exc.value.allowed == ["queued"] and "rolled_back" in str(exc.value)

        seq = g.seq
        assert g.set_correction_status(cid, "rolled_back").status == "rolled_back"  # same status: a no-op
        assert g.seq == seq
        with pytest.raises(InvalidInputError, match="not a correction"):
            g.set_correction_status(g.add_memory("m").id, "queued")


def test_node_content_cannot_change_after_it_is_stored(tmp_path: Path) -> None:
    from amygdala.memory_graph import ops

    with MemoryGraph(tmp_path / "g") as g:
        m = g.add_memory("original")
        graph = g.to_networkx()
        idx = ops.Indexes.build(graph)
        changed = Memory.model_validate({**m.model_dump(), "text": "rewritten"})
        with pytest.raises(ops.MutationError, match="only lifecycle fields"):
            ops.check(graph, [ops.ReplaceNode(node=changed)], idx)
        failed = Memory.model_validate({**m.model_dump(), "failures": 3})
        ops.check(graph, [ops.ReplaceNode(node=failed)], idx)  # lifecycle fields may change
