"""Graph mutations: the only way the in-memory networkx graph changes.

A write is journaled as a list of mutations and applied after the journal line is durable. The
same `check` runs before journaling and during replay, so a record that was accepted once always
replays; that is what lets replay treat a failing record as corruption instead of guessing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Literal, Union

import networkx as nx
from pydantic import BaseModel, ConfigDict, Field

from .models import EDGE_RULES, Edge, Invariant, Node, node_from_attrs


class _Op(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AddNode(_Op):
    op: Literal["add_node"] = "add_node"
    node: Node


class ReplaceNode(_Op):
    """A new version of an existing node (lifecycle changes); kind and idempotency key are fixed."""

    op: Literal["replace_node"] = "replace_node"
    node: Node


class AddEdge(_Op):
    op: Literal["add_edge"] = "add_edge"
    edge: Edge


Mutation = Annotated[Union[AddNode, ReplaceNode, AddEdge], Field(discriminator="op")]


class MutationError(ValueError):
    """A mutation does not fit the current graph (unknown endpoint, duplicate id, ...)."""


@dataclass
class Indexes:
    """Lookups kept in step with the graph: idempotency key -> node id, invariant name -> id.

    A name maps to its active (not retired) invariant when there is one, else to the newest retired one.
    """

    keys: dict[str, str] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)

    @classmethod
    def build(cls, graph: nx.MultiDiGraph) -> "Indexes":
        idx = cls()
        for nid, attrs in graph.nodes(data=True):
            if attrs.get("idempotency_key") is not None:
                idx.keys[attrs["idempotency_key"]] = nid
            if attrs.get("kind") == "invariant":
                prev = idx.names.get(attrs["name"])
                if prev is None or not attrs.get("retired") or graph.nodes[prev].get("retired"):
                    idx.names[attrs["name"]] = nid
        return idx


def _name_taken(graph: nx.MultiDiGraph, idx: Indexes, name: str, freed: set[str]) -> bool:
    """Whether an active invariant has `name` (retired ones, and ones this record retires, do not count)."""
    nid = idx.names.get(name)
    return nid is not None and name not in freed and nid in graph and not graph.nodes[nid].get("retired")


def check(graph: nx.MultiDiGraph, mutations: Sequence[Mutation], idx: Indexes) -> None:
    """Raise MutationError unless every mutation applies, in order, to `graph`.

    Nodes added earlier in the same list count as present, so one record can add a node and its
    edges. A node's content never changes after it is added (only its lifecycle fields do), which
    is what makes "this idempotency key was stored once, with this content" a lasting fact.
    """
    added: dict[str, str] = {}
    new_keys: set[str] = set()
    new_names: set[str] = set()
    freed: set[str] = set()  # names whose active invariant this record retires
    for m in mutations:
        if isinstance(m, AddNode):
            nid = m.node.id
            if nid in graph or nid in added:
                raise MutationError(f"node id {nid!r} already exists")
            key = m.node.idempotency_key
            if key is not None and (key in idx.keys or key in new_keys):
                raise MutationError(f"idempotency key {key!r} is already used by {idx.keys.get(key, nid)}")
            if key is not None:
                new_keys.add(key)
            if isinstance(m.node, Invariant):
                if _name_taken(graph, idx, m.node.name, freed) or m.node.name in new_names:
                    raise MutationError(f"an invariant named {m.node.name!r} already exists "
                                        f"({idx.names.get(m.node.name, nid)})")
                new_names.add(m.node.name)
            added[nid] = m.node.kind
        elif isinstance(m, ReplaceNode):
            nid = m.node.id
            if nid not in graph:
                raise MutationError(f"cannot replace unknown node {nid!r}")
            old = node_from_attrs(nid, graph.nodes[nid])
            if old.kind != m.node.kind:
                raise MutationError(f"node {nid} is a {old.kind}; it cannot become a {m.node.kind}")
            if old.idempotency_key != m.node.idempotency_key or old.content() != m.node.content():
                raise MutationError(f"node {nid}: only lifecycle fields "
                                    f"({', '.join(sorted(old.LIFECYCLE_FIELDS)) or 'none'}) may change")
            if isinstance(old, Invariant) and isinstance(m.node, Invariant):
                if old.retired and not m.node.retired:
                    raise MutationError(f"invariant {nid} ({old.name!r}) is retired and stays retired; add it again "
                                        "as a new invariant")
                if m.node.retired and not old.retired:
                    freed.add(old.name)
        else:
            e = m.edge
            kinds = []
            for end in (e.source, e.target):
                if end in added:
                    kinds.append(added[end])
                elif end in graph:
                    kinds.append(graph.nodes[end]["kind"])
                else:
                    raise MutationError(f"edge {e.source} -{e.kind}-> {e.target}: no node {end!r}")
            sources, targets = EDGE_RULES[e.kind]
            if kinds[0] not in sources or kinds[1] not in targets:
                raise MutationError(
                    f"a {e.kind!r} edge cannot go from a {kinds[0]} to a {kinds[1]} "
                    f"(allowed: {sorted(sources)} -> {sorted(targets)})")


def apply(graph: nx.MultiDiGraph, mutations: Sequence[Mutation], idx: Indexes) -> None:
    """Apply already-checked mutations, keeping `idx` in step."""
    for m in mutations:
        if isinstance(m, (AddNode, ReplaceNode)):
            if isinstance(m, ReplaceNode):
                graph.nodes[m.node.id].clear()
            graph.add_node(m.node.id, **m.node.payload())
            if m.node.idempotency_key is not None:
                idx.keys[m.node.idempotency_key] = m.node.id
            if isinstance(m.node, Invariant) and (
                    isinstance(m, AddNode) or idx.names.get(m.node.name) in (None, m.node.id)):
                idx.names[m.node.name] = m.node.id
        else:
            e = m.edge
            # Keyed by kind: one edge of a kind between two nodes; re-adding updates its attributes.
            graph.add_edge(e.source, e.target, key=e.kind, **e.payload())
