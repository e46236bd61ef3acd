"""Snapshots: the whole graph as node-link JSON, checksummed and replaced atomically.

File layout (``snapshot.json``): a header line, then the networkx node-link JSON on one line::

    {"format": "amygdala.memory_graph.snapshot", "version": 1, "seq": 1234, "sha256": "...", ...}
    {"directed": true, "multigraph": true, "graph": {}, "nodes": [...], "edges": [...]}

The header's sha256 covers the node-link line, so a damaged snapshot is detected before a single
node is trusted, without re-serialising the graph to compare.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import networkx as nx
from networkx.readwrite import json_graph
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from amygdala.fsio import atomic_write
from .models import EdgeKind, Node, utc_now


class SnapshotHeader(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["amygdala.memory_graph.snapshot"] = "amygdala.memory_graph.snapshot"
    version: Literal[1] = 1
    seq: int = Field(ge=0)
    created: AwareDatetime
    nodes: int = Field(ge=0)
    edges: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class SnapshotError(ValueError):
    """The snapshot file is damaged or not a snapshot; the message says which part."""


@dataclass
class LoadedSnapshot:
    header: SnapshotHeader
    graph: nx.MultiDiGraph


def write_snapshot(path: Path, graph: nx.MultiDiGraph, seq: int) -> SnapshotHeader:
    data = json_graph.node_link_data(graph, edges="edges")
    body = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    header = SnapshotHeader(seq=seq, created=utc_now(), nodes=graph.number_of_nodes(),
                            edges=graph.number_of_edges(), sha256=hashlib.sha256(body).hexdigest())
    atomic_write(path, [header.model_dump_json().encode("utf-8"), b"\n", body, b"\n"])
    return header


def read_snapshot_header(path: Path) -> SnapshotHeader:
    with path.open("rb") as fh:
        first = fh.readline()
    return _parse_header(first)


def _parse_header(first: bytes) -> SnapshotHeader:
    try:
        return SnapshotHeader.model_validate_json(first)
    except ValidationError as exc:
        raise SnapshotError(f"snapshot header is not valid ({exc.errors()[0].get('msg')})") from None


def read_snapshot(path: Path, *, validate_nodes: bool = True) -> LoadedSnapshot:
    """Read and check a snapshot. The body is node-link JSON as `node_link_data` writes it; it is
    turned into a graph directly (not via `node_link_graph`, which costs twice as long at 100k
    nodes) after validating every node in one pydantic call."""
    raw = path.read_bytes()
    first, nl, rest = raw.partition(b"\n")
    if not nl:
        raise SnapshotError("snapshot has no header line")
    header = _parse_header(first)
    body = rest[:-1] if rest.endswith(b"\n") else rest
    if hashlib.sha256(body).hexdigest() != header.sha256:
        raise SnapshotError("snapshot checksum mismatch (the file was damaged after it was written)")
    try:
        data = json.loads(body)
        nodes, edges = data["nodes"], data["edges"]
        if not (data.get("directed") and data.get("multigraph")):
            raise ValueError("not a directed multigraph")
    except (ValueError, KeyError, TypeError) as exc:
        raise SnapshotError(f"snapshot body is not node-link JSON of a directed multigraph ({exc})") from None
    if len(nodes) != header.nodes or len(edges) != header.edges:
        raise SnapshotError(f"snapshot holds {len(nodes)} nodes / {len(edges)} edges "
                            f"but its header says {header.nodes} / {header.edges}")
    if validate_nodes:
        _validate(nodes, _NODES, "node")
        _validate(edges, _EDGES, "edge")
    graph = nx.MultiDiGraph()
    try:
        graph.add_nodes_from((n.pop("id"), n) for n in nodes)
        graph.add_edges_from((e.pop("source"), e.pop("target"), e.pop("key"), e) for e in edges)
    except (KeyError, TypeError, AttributeError) as exc:
        raise SnapshotError(f"snapshot body is not node-link JSON ({exc!r} missing or malformed)") from None
    if graph.number_of_nodes() != header.nodes:
        raise SnapshotError("snapshot lists the same node id twice")
    return LoadedSnapshot(header=header, graph=graph)


class _EdgeRecord(BaseModel):
    """An edge as node-link JSON stores it; the key is the edge kind."""

    model_config = ConfigDict(extra="forbid")

    source: str
    target: str
    key: EdgeKind
    kind: EdgeKind
    time: AwareDatetime
    note: str | None = None


_NODES: TypeAdapter[list[Node]] = TypeAdapter(list[Node])
_EDGES: TypeAdapter[list[_EdgeRecord]] = TypeAdapter(list[_EdgeRecord])


def _validate(items: list, adapter: TypeAdapter, what: str) -> None:  # type: ignore[type-arg]
    try:
        adapter.validate_python(items)
    except ValidationError as exc:
        err = exc.errors()[0]
        index = err["loc"][0] if err.get("loc") else "?"
        item = items[index] if isinstance(index, int) else {}
        ident = item.get("id") or f"{item.get('source')} -> {item.get('target')}"
        raise SnapshotError(f"snapshot {what} {ident!r} is not valid ({'.'.join(map(str, err['loc'][1:]))}: "
                            f"{err.get('msg')})") from None
