"""`amygdala memory ...`: add to, inspect, export and repair the memory graph from a shell.

Read commands open the graph read-only (no writer lock, no file changes), so they work while the
MCP server or the dream loop is writing.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import typer

from .errors import InvalidInputError, MemoryGraphError
from .models import CORRECTION_STATUSES, EDGE_KINDS, NODE_KINDS, Node
from .store import DEFAULT_LOCK_TIMEOUT, MemoryGraph

app = typer.Typer(help="The memory graph: memories, corrections, invariants, scenarios, certificates.",
                  no_args_is_help=True)


def default_graph_dir() -> Path:
    """Where the graph lives unless --dir says otherwise ($AMYGDALA_HOME/memory)."""
    from amygdala.home import home_from_env

    return home_from_env() / "memory"


DirOpt = typer.Option(None, "--dir", help="Graph directory (default: $AMYGDALA_HOME/memory, "
                                          "i.e. ~/.local/share/amygdala/memory).")
JsonOpt = typer.Option(False, "--json", help="Print JSON instead of text.")
LockOpt = typer.Option(DEFAULT_LOCK_TIMEOUT, "--lock-timeout", help="Seconds to wait for another writer.")


def _dir(directory: Optional[Path]) -> Path:
    return directory.expanduser() if directory is not None else default_graph_dir()


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@contextmanager
def _graph(directory: Optional[Path], *, readonly: bool, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> Iterator[MemoryGraph]:
    """Open the graph, turning library errors and warnings into clear CLI output."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            graph = MemoryGraph(_dir(directory), readonly=readonly, lock_timeout=lock_timeout)
        for w in caught:
            typer.echo(f"warning: {w.message}", err=True)
    except MemoryGraphError as exc:
        raise _fail(str(exc), 1) from None
    try:
        yield graph
    except InvalidInputError as exc:
        raise _fail(str(exc), 2) from None
    except MemoryGraphError as exc:
        raise _fail(str(exc), 1) from None
    finally:
        graph.close()


def _parse_time(value: Optional[str]) -> Optional[datetime]:
    if value is None:
        return None
    try:
        when = datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith("Z") else value)
    except ValueError:
        raise _fail(f"--time {value!r} is not an ISO 8601 time; use e.g. 2025-01-31T09:30:00Z", 2) from None
    if when.tzinfo is None:
        raise _fail(f"--time {value!r} has no time zone; add one, e.g. {value}Z or {value}+02:00", 2)
    return when


def _pairs(values: list[str], option: str, *, as_float: bool = False, as_json: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in values:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise _fail(f"{option} {item!r} should look like name=value", 2)
        try:
            out[key] = float(raw) if as_float else (json.loads(raw) if as_json else raw)
        except ValueError:
            if as_json:
                out[key] = raw  # a bare word is a string
            else:
                raise _fail(f"{option} {item!r}: {raw!r} is not a number", 2) from None
    return out


def _links(values: list[str]) -> list[tuple[Any, str]]:
    out = []
    for item in values:
        kind, colon, target = item.partition(":")
        if not colon or kind not in EDGE_KINDS:
            raise _fail(f"--link {item!r} should look like KIND:ID with KIND one of {', '.join(EDGE_KINDS)}", 2)
        out.append((kind, target))
    return out


def _read_text(text: Optional[str], file: Optional[Path]) -> Optional[str]:
    if file is not None:
        if text is not None:
            raise _fail("give the text either as an argument or with --file, not both", 2)
        return sys.stdin.read() if str(file) == "-" else file.read_text(encoding="utf-8")
    if text == "-":
        return sys.stdin.read()
    return text


def _summary(node: Node) -> str:
    data = node.model_dump()
    text = {"memory": "text", "correction": "context", "invariant": "description", "scenario": "prompt",
            "certificate": "model"}[node.kind]
    first = str(data[text]).strip().splitlines()[0] if str(data[text]).strip() else ""
    return first[:70] + ("…" if len(first) > 70 else "")


def _state(node: Node) -> str:
    d = node.model_dump()
    if node.kind == "correction":
        return d["status"]
    if node.kind == "memory":
        return " ".join(f"{k}={v:g}" for k, v in d["emotions"].items())
    if node.kind == "invariant":
        return f"{d['name']} ≥{d['threshold']:g}"
    if node.kind == "certificate":
        verdict = "revoked" if d["revoked"] else ("pass" if d["passed"] else "fail")
        return f"{verdict} {d['successes']}/{d['trials']}"
    return d.get("invariant_id", "")


@app.command()
def add(
    text: Optional[str] = typer.Argument(None, help="Memory text ('-' reads stdin). Emotion tag lines such as "
                                                    "'emotion: frustrated=0.7 curious=0.4' become scores."),
    kind: str = typer.Option("memory", "--kind", "-k", help="memory, correction or invariant."),
    file: Optional[Path] = typer.Option(None, "--file", "-f", help="Read the memory text from a file ('-' = stdin)."),
    node_json: Optional[Path] = typer.Option(None, "--node-json", help="Add a node given as a JSON object "
                                             "(any kind, as `show --json` prints it; '-' = stdin)."),
    source: str = typer.Option("cli", help="Memory source."),
    tag: list[str] = typer.Option([], "--tag", "-t", help="Memory tag (repeatable)."),
    emotion: list[str] = typer.Option([], "--emotion", "-e", help="Emotion score id=score (repeatable)."),
    time: Optional[str] = typer.Option(None, help="When it happened, ISO 8601 with a zone (default: now)."),
    key: Optional[str] = typer.Option(None, "--key", help="Idempotency key: re-running with it stores nothing new."),
    link: list[str] = typer.Option([], "--link", help="Edge from the new node, KIND:ID (repeatable)."),
    context: Optional[str] = typer.Option(None, help="Correction: the situation / prompt."),
    preferred: Optional[str] = typer.Option(None, help="Correction: the response that should have been given."),
    rejected: Optional[str] = typer.Option(None, help="Correction: the response that was wrong (optional)."),
    invariant: Optional[str] = typer.Option(None, help="Correction: id or name of the invariant it is about."),
    note: Optional[str] = typer.Option(None, help="Correction: free-text note."),
    name: Optional[str] = typer.Option(None, help="Invariant: unique lower-case name, e.g. no_false_claims."),
    description: Optional[str] = typer.Option(None, help="Invariant: the rule in words."),
    judge: Optional[str] = typer.Option(None, help="Invariant: judge kind, e.g. regex, llm, emotion_readout."),
    judge_param: list[str] = typer.Option([], "--judge-param", help="Invariant: judge parameter name=value "
                                                                    "(value parsed as JSON if it can be; repeatable)."),
    template: list[str] = typer.Option([], "--template", help="Invariant: test-case template (repeatable)."),
    threshold: Optional[float] = typer.Option(None, help="Invariant: minimum pass rate a certificate must show."),
    confidence: float = typer.Option(0.95, help="Invariant: confidence level for certificates."),
    directory: Optional[Path] = DirOpt,
    lock_timeout: float = LockOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Add a memory (default), a correction or an invariant, or any node with --node-json."""
    when = _parse_time(time)
    links = _links(link)
    with _graph(directory, readonly=False, lock_timeout=lock_timeout) as g:
        if node_json is not None:
            raw = sys.stdin.read() if str(node_json) == "-" else node_json.read_text(encoding="utf-8")
            try:
                data = json.loads(raw)
            except ValueError as exc:
                raise _fail(f"--node-json is not valid JSON ({exc})", 2) from None
            if not isinstance(data, dict):
                raise _fail("--node-json must be one JSON object with a 'kind' field", 2)
            node: Node = g.add_node(data, links=links)
        elif kind == "memory":
            body = _read_text(text, file)
            if body is None:
                raise _fail("no memory text; pass it as an argument, with --file, or '-' for stdin", 2)
            node = g.add_memory(body, time=when, source=source, tags=tag, emotions=_pairs(emotion, "--emotion", as_float=True),
                                links=links, idempotency_key=key)
        elif kind == "correction":
            if context is None or preferred is None:
                raise _fail("a correction needs --context and --preferred (and usually --rejected)", 2)
            node = g.submit_correction(context, preferred, rejected, invariant=invariant, note=note, idempotency_key=key,
                                       emotions=_pairs(emotion, "--emotion", as_float=True), links=links, time=when)
        elif kind == "invariant":
            if name is None or description is None or judge is None or threshold is None:
                raise _fail("an invariant needs --name, --description, --judge and --threshold", 2)
            node = g.add_invariant(name, description, {"kind": judge, "params": _pairs(judge_param, "--judge-param", as_json=True)},
                                   threshold=threshold, templates=template, confidence=confidence, links=links,
                                   idempotency_key=key, time=when)
        else:
            raise _fail(f"--kind must be memory, correction or invariant (got {kind!r}); add scenarios and "
                        "certificates with --node-json", 2)
    if as_json:
        typer.echo(node.model_dump_json(indent=2))
    else:
        typer.echo(f"{node.id}\t{node.kind}\t{_state(node)}")


@app.command("list")
def list_nodes(
    kind: Optional[str] = typer.Option(None, "--kind", "-k", help=f"Only this kind ({', '.join(NODE_KINDS)})."),
    status: Optional[str] = typer.Option(None, help=f"Only corrections with this status ({', '.join(CORRECTION_STATUSES)})."),
    tag: Optional[str] = typer.Option(None, "--tag", "-t", help="Only memories with this tag."),
    limit: int = typer.Option(50, help="Show the newest N (0 = all)."),
    directory: Optional[Path] = DirOpt,
    as_json: bool = JsonOpt,
) -> None:
    """List nodes, newest last."""
    if kind is not None and kind not in NODE_KINDS:
        raise _fail(f"--kind must be one of {', '.join(NODE_KINDS)}", 2)
    if status is not None and status not in CORRECTION_STATUSES:
        raise _fail(f"--status must be one of {', '.join(CORRECTION_STATUSES)}", 2)
    with _graph(directory, readonly=True) as g:
        nodes = g.nodes(kind if status is None else "correction")  # type: ignore[arg-type]
    if status is not None:
        nodes = [n for n in nodes if getattr(n, "status", None) == status]
    if tag is not None:
        nodes = [n for n in nodes if tag in getattr(n, "tags", ())]
    nodes.sort(key=lambda n: (n.time, n.id))
    if limit > 0:
        nodes = nodes[-limit:]
    if as_json:
        typer.echo(json.dumps([n.model_dump(mode="json") for n in nodes], indent=2, ensure_ascii=False))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(nodes)} node(s)")
    for col in ("id", "kind", "time", "state", "summary"):
        table.add_column(col, overflow="fold")
    for n in nodes:
        table.add_row(n.id, n.kind, n.time.strftime("%Y-%m-%d %H:%M"), _state(n), _summary(n))
    Console(width=160).print(table)


@app.command()
def show(
    node_id: str = typer.Argument(..., help="Node id (invariants also by name)."),
    directory: Optional[Path] = DirOpt,
    as_json: bool = JsonOpt,
) -> None:
    """One node with all its fields and its edges."""
    with _graph(directory, readonly=True) as g:
        try:
            node = g.get(node_id)
        except MemoryGraphError:
            try:
                node = g.invariant(node_id)
            except MemoryGraphError:
                raise _fail(f"no node with id {node_id!r}; `amygdala memory list` shows the ids", 1) from None
        edges = g.edges(node.id)
    if as_json:
        typer.echo(json.dumps({"node": node.model_dump(mode="json"),
                               "edges": [e.model_dump(mode="json") for e in edges]}, indent=2, ensure_ascii=False))
        return
    typer.echo(f"{node.id} ({node.kind})")
    for field, value in node.model_dump(mode="json", exclude={"id", "kind"}).items():
        if isinstance(value, str) and "\n" in value:
            typer.echo(f"  {field}:")
            for line in value.splitlines():
                typer.echo(f"    | {line}")
        else:
            typer.echo(f"  {field}: {json.dumps(value, ensure_ascii=False)}")
    typer.echo(f"  edges ({len(edges)}):")
    for e in edges:
        arrow = f"-{e.kind}-> {e.target}" if e.source == node.id else f"<-{e.kind}- {e.source}"
        typer.echo(f"    {arrow}")


@app.command()
def stats(directory: Optional[Path] = DirOpt, as_json: bool = JsonOpt) -> None:
    """Counts by node kind, edge kind and correction status; journal size since the last snapshot."""
    with _graph(directory, readonly=True) as g:
        s = g.stats()
    if as_json:
        typer.echo(s.model_dump_json(indent=2))
        return
    typer.echo(f"memory graph at {s.directory}: {s.nodes} nodes, {s.edges} edges, seq {s.seq}")
    for title, counts in (("nodes", s.nodes_by_kind), ("edges", s.edges_by_kind), ("corrections", s.corrections_by_status)):
        typer.echo(f"  {title}: " + (", ".join(f"{k} {v}" for k, v in counts.items()) or "none"))
    typer.echo(f"  journal: {s.journal_records} record(s), {s.journal_bytes} bytes since the snapshot at seq {s.snapshot_seq}")


@app.command()
def export(
    fmt: str = typer.Option("node-link", "--format", help="node-link (networkx JSON), jsonl (one node or edge per "
                                                          "line) or training (JSONL for vectors and ORPO; needs --out)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="File (node-link, jsonl) or directory (training); "
                                                                 "default: stdout."),
    threshold: list[str] = typer.Option([], "--threshold", help="training: emotion=POSITIVE:NEGATIVE, '*' for every "
                                                                "emotion (repeatable), e.g. '*=0.6:0.2'."),
    missing: str = typer.Option("skip", help="training: an unscored emotion is 'skip' (left out) or 'zero' (negative)."),
    status: list[str] = typer.Option(["pending", "queued"], "--status", help="training: correction statuses to export."),
    directory: Optional[Path] = DirOpt,
) -> None:
    """Export the whole graph, or the training data extracted from it."""
    from networkx.readwrite import json_graph

    from .extract import extract_training_pairs, parse_threshold
    from amygdala.fsio import atomic_write

    if fmt not in ("node-link", "jsonl", "training"):
        raise _fail("--format must be node-link, jsonl or training", 2)
    with _graph(directory, readonly=True) as g:
        graph = g.to_networkx()
        nodes, edges = g.nodes(), g.edges()
    if fmt == "training":
        if out is None:
            raise _fail("--format training writes two files; give a directory with --out", 2)
        try:
            thresholds = dict(parse_threshold(t) for t in threshold)
        except ValueError as exc:
            raise _fail(str(exc), 2) from None
        bad = [s for s in status if s not in CORRECTION_STATUSES]
        if bad or missing not in ("skip", "zero"):
            raise _fail(f"--status must be among {', '.join(CORRECTION_STATUSES)} and --missing skip or zero", 2)
        try:
            result = extract_training_pairs(graph, thresholds, out, missing=missing, statuses=status)  # type: ignore[arg-type]
        except ValueError as exc:
            raise _fail(str(exc), 2) from None
        for w in result.warnings:
            typer.echo(f"warning: {w}", err=True)
        typer.echo(f"{len(result.examples)} emotion example(s) -> {result.example_path}")
        typer.echo(f"{len(result.triplets)} ORPO triplet(s) -> {result.triplet_path}")
        return
    if fmt == "node-link":
        text = json.dumps(json_graph.node_link_data(graph, edges="edges"), ensure_ascii=False) + "\n"
    else:
        lines = [json.dumps({"node": n.model_dump(mode="json")}, ensure_ascii=False) for n in nodes]
        lines += [json.dumps({"edge": e.model_dump(mode="json")}, ensure_ascii=False) for e in edges]
        text = "".join(line + "\n" for line in lines)
    if out is None:
        typer.echo(text, nl=False)
    else:
        atomic_write(out.expanduser(), text.encode("utf-8"))
        typer.echo(f"wrote {len(nodes)} nodes and {len(edges)} edges to {out}", err=True)


@app.command()
def repair(
    dry_run: bool = typer.Option(False, "--dry-run", help="Only say what would be rebuilt and lost."),
    directory: Optional[Path] = DirOpt,
    lock_timeout: float = LockOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Make a graph that refuses to load loadable again, keeping every intact write.

    Backs the files up into repair-backup-<time>/ first. Exit code 0: healthy or repaired with
    nothing lost; 1: repaired (or would be) but some lines or records could not be kept (listed).
    """
    from .repair import repair as run_repair

    try:
        report = run_repair(_dir(directory), dry_run=dry_run, lock_timeout=lock_timeout)
    except MemoryGraphError as exc:
        raise _fail(str(exc), 1) from None
    if as_json:
        typer.echo(json.dumps({"directory": str(report.directory), "healthy": report.healthy, "dry_run": report.dry_run,
                               "base": report.base, "backup": str(report.backup) if report.backup else None,
                               "seq": report.seq, "nodes": report.nodes, "edges": report.edges,
                               "replayed": report.replayed, "problems": report.problems, "lost": report.lost}, indent=2))
    else:
        typer.echo(report.summary())
    raise typer.Exit(1 if report.lost else 0)
