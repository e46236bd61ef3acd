"""`amygdala invariants add|list|show|remove`: behavioural rules for the dream loop, from a shell.

The graph lives at ``$AMYGDALA_HOME/memory``. Reading (list, show) opens it read-only, which is
safe beside a running daemon. Writing (add, remove) is refused while a daemon owns the home: the
daemon is the graph's one writer in normal operation, and an invariant added behind its back
would not be seen by a dream cycle already running. `_daemon_url_or_none` is where a future
version talks to the daemon over HTTP instead of refusing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import typer

from amygdala.engine.cli import HomeOpt, make_config
from amygdala.engine.config import Config
from amygdala.memory_graph import Invariant, MemoryGraph
from amygdala.memory_graph.errors import MemoryGraphError

from .errors import InvalidInvariant

invariants_app = typer.Typer(help="Behavioural invariants the dream loop tests, trains and certifies.",
                             no_args_is_help=True)

JsonOpt = typer.Option(False, "--json", help="Print JSON instead of text.")


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _home_holder(config: Config) -> dict[str, Any] | None:
    """The note of the process that owns this home (pid, what, since, url), or None when nobody does."""
    return config.home_lock().holder()


def _daemon_url_or_none(config: Config) -> str | None:
    """The URL of the daemon that owns this home (its lock note's), or None when none serves one.

    Writes go to that daemon over HTTP (dream/daemon_client.py); an owner without a URL (a stdio
    server, a standalone dream cycle) cannot take them, so they are refused.
    """
    holder = _home_holder(config)
    if holder is None:
        return None
    url = holder.get("url")
    return str(url) if url else None


def _refuse_beside_daemon(config: Config, doing: str) -> None:
    holder = _home_holder(config)
    if holder is None:
        return
    url = _daemon_url_or_none(config)
    where = f", serving {url}" if url else ""
    what = holder.get("what", "amygdala daemon")
    raise _fail(f"cannot {doing}: {config.home} is owned by a running {what} (pid {holder.get('pid', '?')}{where}), "
                "which is the memory graph's writer. Stop it, or use its add_invariant tool", 1)


TokenOpt = typer.Option(None, "--token", envvar="AMYGDALA_TOKEN",
                        help="Bearer token of the running daemon (when it was started with one).")


def _through_daemon(config: Config, doing: str, call: Any, token: str | None) -> Any | None:
    """Send a write to the daemon that owns the home; None when no daemon serves it (write locally).

    Refusals keep the daemon's message (it names the field or the running cycle); a daemon that
    does not answer is reported with who it is, as the refusal beside it used to be.
    """
    from .daemon_client import DaemonClient, DaemonRequestFailed

    url = _daemon_url_or_none(config)
    if url is None:
        return None
    try:
        return call(DaemonClient(url, token=token))
    except DaemonRequestFailed as exc:
        if exc.status is None:
            holder = _home_holder(config) or {}
            raise _fail(f"cannot {doing}: {config.home} is owned by a running {holder.get('what', 'amygdala daemon')} "
                        f"(pid {holder.get('pid', '?')}, serving {url}), which is the memory graph's writer, and it "
                        f"did not answer ({exc}). Retry when it is up, stop it, or use its add_invariant tool", 1) from None
        raise _fail(str(exc), 2 if exc.status in (409, 422) else 1) from None


@contextmanager
def _graph(config: Config, *, readonly: bool) -> Iterator[MemoryGraph | None]:
    """The home's graph; read-only opens of a home that has none yield None (nothing stored yet)."""
    directory = config.memory_dir
    if readonly and not (directory / "journal.log").exists():
        yield None
        return
    try:
        graph = MemoryGraph(directory, readonly=readonly)
    except MemoryGraphError as exc:
        raise _fail(str(exc), 1) from None
    try:
        yield graph
    except InvalidInvariant as exc:
        raise _fail(str(exc), 2) from None
    except MemoryGraphError as exc:
        raise _fail(str(exc), 1) from None
    finally:
        graph.close()


def known_concepts(config: Config) -> list[str] | None:
    """Concept names a readout judge may bound: those of the readouts in this home, else the
    shipped corpus's emotions (what a readout is built from); None when neither can be read."""
    names: set[str] = set()
    for manifest in sorted(config.readouts_dir.glob("*/readout.json")):
        try:
            names.update(json.loads(manifest.read_text()).get("concepts", []))
        except (OSError, ValueError):
            continue
    if names:
        return sorted(names)
    try:
        from amygdala.corpus.manifest import load_manifest

        return list(load_manifest().ids)
    except (OSError, ValueError):
        return None


def _summary(node: Invariant) -> dict[str, Any]:
    from .cases import split
    from .invariants import spec_of, spec_sha256

    row: dict[str, Any] = {"name": node.name, "id": node.id, "judge": node.judge.kind, "threshold": node.threshold,
                           "confidence": node.confidence, "retired": node.retired, "added": node.time.isoformat()}
    try:
        spec = spec_of(node)
    except InvalidInvariant:
        row.update(cases=0, held_out=0, templates=len(node.templates), sha256=None)
        return row
    train, held = split(spec)
    row.update(cases=len(spec.cases), held_out=len(held), train=len(train), templates=len(spec.templates),
               sha256=spec_sha256(spec))
    return row


def _nodes(graph: MemoryGraph | None) -> Sequence[Invariant]:
    if graph is None:
        return []
    return [n for n in graph.nodes("invariant") if isinstance(n, Invariant)]


@invariants_app.command("add")
def add_cmd(
    file: Path = typer.Argument(..., help="Invariant JSON file (name, description, threshold, judge, cases)."),
    replace: bool = typer.Option(False, "--replace", help="Retire the active invariant of that name, store this."),
    as_json: bool = JsonOpt,
    home: HomeOpt = None,
    token: Optional[str] = TokenOpt,
) -> None:
    """Validate an invariant file and store it (through the daemon when one runs); a bad file stores nothing."""
    from .cases import split
    from .invariants import active_node, parse_spec, spec_json, store

    config = make_config(home)
    try:
        spec = parse_spec(file, concepts=known_concepts(config))
    except InvalidInvariant as exc:
        raise _fail(str(exc), 2) from None
    sent = _through_daemon(config, f"add invariant {spec.name!r}",
                           lambda c: c.add_invariant(spec_json(spec), replace=replace), token)
    if sent is not None:
        typer.echo(json.dumps(sent, indent=2) if as_json else f"{sent['message']} (through the daemon at "
                   f"{_daemon_url_or_none(config)})")
        return
    _refuse_beside_daemon(config, f"add invariant {spec.name!r}")
    with _graph(config, readonly=False) as graph:
        assert graph is not None
        before = active_node(graph, spec.name)
        node = store(graph, spec, replace=replace)
        outcome = "unchanged" if before is not None and before.id == node.id else (
            "replaced" if before is not None else "stored")
        train, held = split(spec)
        if as_json:
            typer.echo(json.dumps({"outcome": outcome, **_summary(node),
                                   **({"replaced": before.id} if outcome == "replaced" and before else {})}, indent=2))
            return
        extra = f", retired {before.id}" if outcome == "replaced" and before is not None else ""
        typer.echo(f"{outcome} invariant {spec.name} ({node.id}{extra}): {len(spec.cases)} cases ({len(train)} train, "
                   f"{len(held)} held out), {len(spec.templates)} template(s), judge {spec.judge.kind}, "
                   f"threshold {spec.threshold:g} at confidence {spec.confidence:g}")


@invariants_app.command("list")
def list_cmd(
    include_retired: bool = typer.Option(False, "--all", help="Include retired (removed or replaced) invariants."),
    as_json: bool = JsonOpt,
    home: HomeOpt = None,
) -> None:
    """List the invariants (active ones unless --all)."""
    config = make_config(home)
    with _graph(config, readonly=True) as graph:
        rows = [_summary(n) for n in _nodes(graph) if include_retired or not n.retired]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("no invariants yet; add one with `amygdala invariants add FILE`")
        return
    for r in rows:
        state = " [retired]" if r["retired"] else ""
        typer.echo(f"{r['name']:<24} {r['judge']:<10} {r['cases']:>4} cases ({r['held_out']} held out) "
                   f"{r['templates']:>2} templates  threshold {r['threshold']:g}  {r['id']}{state}")


@invariants_app.command("show")
def show_cmd(
    name: str = typer.Argument(..., help="Invariant name (or id, for a retired one)."),
    as_json: bool = JsonOpt,
    home: HomeOpt = None,
) -> None:
    """Show one invariant: its rule, judge and cases, with the held-out ones marked."""
    from .cases import written_cases
    from .invariants import active_node, spec_json, spec_of

    config = make_config(home)
    with _graph(config, readonly=True) as graph:
        node = active_node(graph, name) if graph is not None else None
        if node is None:
            node = next((n for n in _nodes(graph) if n.id == name), None)
        if node is None:
            names = sorted(n.name for n in _nodes(graph) if not n.retired)
            known = f"active invariants: {', '.join(names)}" if names else "there are no active invariants"
            raise _fail(f"no active invariant named {name!r}; {known}", 2)
        summary = _summary(node)
        try:
            spec = spec_of(node)
        except InvalidInvariant as exc:
            if as_json:
                typer.echo(json.dumps({**summary, "spec": None, "note": str(exc)}, indent=2))
                return
            raise _fail(str(exc), 2) from None
    cases = written_cases(spec)
    if as_json:
        typer.echo(json.dumps({**summary, "held_out_cases": [i for i, c in enumerate(cases) if c.held_out],
                               "spec": spec_json(spec)}, indent=2))
        return
    typer.echo(f"{spec.name} ({node.id}){' [retired]' if node.retired else ''}: {spec.description}")
    typer.echo(f"judge {spec.judge.kind} {json.dumps(spec.judge.params)}; threshold {spec.threshold:g} at "
               f"confidence {spec.confidence:g}; sha256 {summary['sha256']}")
    for i, c in enumerate(cases):
        mark = "held out" if c.held_out else "train"
        typer.echo(f"  cases[{i}] ({mark}) {json.dumps(c.context[-70:])}")
        typer.echo(f"      preferred {json.dumps(c.preferred[:70])}")
        typer.echo(f"      rejected  {json.dumps(c.rejected[:70])}")
    for i, t in enumerate(spec.templates):
        sizes = ", ".join(f"{k}: {len(v)}" for k, v in t.variables.items())
        typer.echo(f"  templates[{i}] {json.dumps(t.template[-70:])} ({sizes})")


@invariants_app.command("remove")
def remove_cmd(
    name: str = typer.Argument(..., help="Name of the active invariant to retire."),
    home: HomeOpt = None,
    token: Optional[str] = TokenOpt,
) -> None:
    """Retire an invariant: the graph keeps it and its certificates; the dream loop no longer uses it."""
    from .invariants import active_node, remove

    config = make_config(home)
    sent = _through_daemon(config, f"remove invariant {name!r}", lambda c: c.remove_invariant(name), token)
    if sent is not None:
        typer.echo(f"{sent['message']} ({sent['id']}) through the daemon; `amygdala invariants list --all` still shows it")
        return
    _refuse_beside_daemon(config, f"remove invariant {name!r}")
    if not (config.memory_dir / "journal.log").exists():
        raise _fail(f"no active invariant named {name!r}; there are no invariants in {config.memory_dir} yet", 2)
    with _graph(config, readonly=False) as graph:
        assert graph is not None
        node = active_node(graph, name)
        remove(graph, name)
        typer.echo(f"retired invariant {name} ({node.id if node else '?'}); `amygdala invariants list --all` still "
                   "shows it")
