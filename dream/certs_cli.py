"""`amygdala certify INVARIANT` and `amygdala certificates list|show|verify|review|report`.

Reading (list, show, verify, report) opens the graph read-only, which is safe beside a running
daemon; staleness is then judged against the weights files as they stand (`served_from_files`,
cached), since the daemon's memory cannot be seen from here. Writing (certify, review) is refused
while a daemon owns the home: the daemon is the graph's one writer (use its /certify API or the
review page at /review instead). `review` is the operator's: no MCP tool offers it.

The report is the review page as one self-contained HTML file; its renderer lives with the page
templates in the server package and is handed in through the CLI context (dream never imports server).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

from amygdala.engine.cli import HomeOpt, ModelOpt, ThreadsOpt, make_config
from amygdala.engine.config import Config
from amygdala.memory_graph import MemoryGraph
from amygdala.memory_graph.errors import MemoryGraphError

from .errors import DreamError

certificates_app = typer.Typer(help="Behavioural certificates: list, show, verify, review (operator), report.",
                               no_args_is_help=True)


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _err(message: str) -> None:
    typer.echo(message, err=True)


def _refuse_beside_daemon(config: Config, doing: str, instead: str) -> None:
    holder = config.home_lock().holder()
    if holder is None:
        return
    where = f", serving {holder['url']}" if holder.get("url") else ""
    raise _fail(f"cannot {doing}: {config.home} is owned by a running {holder.get('what', 'amygdala daemon')} "
                f"(pid {holder.get('pid', '?')}{where}), the memory graph's one writer. Stop it, or {instead}", 1)


@contextmanager
def _graph(config: Config, *, readonly: bool) -> Iterator[MemoryGraph]:
    try:
        graph = MemoryGraph(config.memory_dir, readonly=readonly, create=not readonly)
    except MemoryGraphError as exc:
        raise _fail(str(exc)) from None
    try:
        yield graph
    except DreamError as exc:
        raise _fail(str(exc), 2) from None
    except MemoryGraphError as exc:
        raise _fail(str(exc)) from None
    finally:
        graph.close()


def _load_model(config: Config):
    from amygdala.engine.model import ModelError, load_model

    try:
        return load_model(config, echo=_err)
    except ModelError as exc:
        raise _fail(str(exc), 2) from None


def _load_readout(config: Config, lm: Any, required: bool):
    """The home's readout for this model if it exists; None otherwise (fatal only when `required`)."""
    from amygdala.engine.readout import MANIFEST_FILE, ReadoutManager
    from amygdala.training.vectors.build import default_readout_dir

    directory = default_readout_dir(config, lm)
    if not (directory / MANIFEST_FILE).is_file():
        if required:
            raise _fail(f"this judge needs the emotion readout and there is none at {directory}; build it with "
                        "`amygdala vectors train`", 2)
        return None
    return ReadoutManager.from_file(directory, model=lm)


def _served_from_files(config: Config):
    from amygdala.dream.certificates import served_from_files

    try:
        return served_from_files(config, echo=_err)
    except Exception as exc:  # listing still works; it just cannot say what is stale
        _err(f"warning: cannot tell which certificates are stale ({exc})")
        return None


def _dump(model: Any) -> str:
    return model.model_dump_json(indent=2)


# ------------------------------------------------------------------------------------------------ certify

def certify_cmd(
    invariant: str = typer.Argument(..., help="Name of an active invariant (`amygdala invariants list`)."),
    n: int | None = typer.Option(None, "--n", min=1, help="Fixed n: cases to judge (default 60); with --sequential "
                                                             "the most cases allowed (default 200)."),
    sequential: bool = typer.Option(False, "--sequential", help="Stop at the first decision of the anytime-valid test."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the case draw and the judge."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole certificate as JSON."),
    home: HomeOpt = None, model: ModelOpt = None, threads: ThreadsOpt = None,
    token: str | None = typer.Option(None, "--token", envvar="AMYGDALA_TOKEN",
                                        help="Bearer token of the running daemon (when it was started with one)."),
) -> None:
    """Judge fresh held-out cases of INVARIANT on the model and store a certificate (exact or sequential bound).

    With a daemon running, the daemon certifies on the weights it serves (never beside a dream cycle)."""
    from amygdala.home import HomeBusy

    from .certify import CertifySettings, certify
    from .daemon_client import DaemonRequestFailed, daemon_for
    from .invariants import load

    config = make_config(home, model, threads=threads)
    client = daemon_for(config.home_lock().holder(), token)
    if client is not None:
        try:
            summary = client.certify(invariant, n=n, sequential=sequential, seed=seed)
        except DaemonRequestFailed as exc:
            raise _fail(str(exc), 2 if exc.status in (409, 422, 404) else 1) from None
        if as_json:
            from .certificates import get_certificate

            typer.echo(_dump(get_certificate(config, summary["id"])))
            return
        typer.echo(f"{summary['id']}  {summary['invariant']}: {summary['summary']} (certified by the daemon at {client.url})")
        typer.echo(f"  review: `amygdala certificates review {summary['id']} --approve|--reject --reason '...'` "
                   "or the daemon's /review page")
        return
    _refuse_beside_daemon(config, f"certify {invariant!r}",
                          f"ask it: POST /certify/{invariant} (the daemon certifies on the weights it serves)")
    lock = config.home_lock()
    try:
        lock.acquire("amygdala certify")
    except HomeBusy as exc:
        raise _fail(str(exc)) from None
    try:
        with _graph(config, readonly=False) as graph:
            spec = load(graph, invariant)
            lm = _load_model(config)
            readout = _load_readout(config, lm, required=spec.judge.kind == "readout")
            settings = CertifySettings(n=n, sequential=sequential, seed=seed)
            record = certify(graph, config, lm, invariant, readout=readout, settings=settings,
                             show_progress=sys.stderr.isatty())
    finally:
        lock.release()
    if as_json:
        typer.echo(_dump(record))
        return
    r = record.result
    typer.echo(f"{record.id}  {record.invariant}: {r.summary}")
    failed = [c for c in record.cases if not c.passed]
    typer.echo(f"  {len(failed)} of {r.n} cases failed; weights {record.weights_sha256[:16]}; "
               f"file {config.certificates_dir / (record.id + '.json')}")
    typer.echo(f"  review: `amygdala certificates review {record.id} --approve|--reject --reason '...'` "
               "or the daemon's /review page")


# ------------------------------------------------------------------------------------------------ reading

@certificates_app.command("list")
def list_cmd(
    invariant: str | None = typer.Option(None, "--invariant", help="Only this invariant's certificates."),
    status: str | None = typer.Option(None, "--status", help="certified, refuted, inconclusive, stale, approved, "
                                                                "rejected or revoked."),
    check: bool = typer.Option(True, "--check/--no-check", help="Mark stale ones (hashes the weights files once; "
                                                                "cached until they change)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    home: HomeOpt = None, model: ModelOpt = None,
) -> None:
    """Certificates, newest first, with their status (stale once the served weights changed)."""
    from .certificates import list_certificates

    config = make_config(home, model)
    if not (config.memory_dir / "journal.log").exists():
        typer.echo("[]" if as_json else "no certificates yet (no memory graph in this home)")
        return
    served = _served_from_files(config) if check else None
    with _graph(config, readonly=True) as graph:
        rows = list_certificates(graph, config, invariant=invariant, status=status, served=served)
    if as_json:
        typer.echo(json.dumps([r.model_dump(mode="json") for r in rows], indent=2))
        return
    if not rows:
        typer.echo("no certificates" + (f" with status {status}" if status else ""))
        return
    for r in rows:
        line = (f"{r.id}  {r.invariant:<20} {r.status:<12} {r.passes:>4}/{r.n:<4} lower {r.lower:.3f} "
                f"(threshold {r.threshold:g})  {r.created:%Y-%m-%d %H:%M}")
        typer.echo(line)
        if r.stale:
            since = f" since {r.stale_since:%Y-%m-%d %H:%M}" if r.stale_since else ""
            typer.echo(f"    stale{since}: {'; '.join(r.stale_reasons)}")
        if r.latest_review is not None:
            rv = r.latest_review
            typer.echo(f"    {rv.decision}d by {rv.operator} at {rv.time:%Y-%m-%d %H:%M}: {rv.reason}")


@certificates_app.command("show")
def show_cmd(
    certificate_id: str = typer.Argument(..., metavar="ID"),
    as_json: bool = typer.Option(False, "--json", help="Print the whole record as JSON."),
    cases: int = typer.Option(10, "--cases", min=0, help="How many cases to print (failures first)."),
    home: HomeOpt = None,
) -> None:
    """One certificate: the decision, what it is about, its reviews and its cases (failures first)."""
    from .certificates import certificate_node, load_record, summarize

    config = make_config(home)
    with _graph(config, readonly=True) as graph:
        node = certificate_node(graph, certificate_id)
        record = load_record(config, certificate_id)
        summary = summarize(graph, node, None)
    if as_json:
        typer.echo(_dump(record))
        return
    r = record.result
    typer.echo(f"{record.id}  {record.invariant}  ({summary.status})")
    typer.echo(f"  {r.summary}")
    typer.echo(f"  model {record.model}; weights {record.weights_sha256}; readout {record.readout_sha256 or '-'}")
    typer.echo(f"  spec {record.spec_sha256}; judge {record.judge.kind} {json.dumps(record.judge.params)} "
               f"seed {record.judge.seed}; draw seed {record.seed}; pool {record.pool_size}")
    typer.echo(f"  made {record.created:%Y-%m-%d %H:%M:%S} UTC in {record.duration_s:.1f} s; amygdala "
               f"{record.package_version}" + (f"; cycle {record.cycle_id}" if record.cycle_id else ""))
    for rv in summary.reviews:
        typer.echo(f"  {rv.decision}d by {rv.operator} at {rv.time:%Y-%m-%d %H:%M} ({rv.via}): {rv.reason}")
    for c in sorted(record.cases, key=lambda c: (c.passed, c.score, c.index))[:cases]:
        flag = "pass" if c.passed else "FAIL"
        typer.echo(f"  [{c.index:>3}] {flag} {c.score:+.4f}  {' '.join(c.context.split())[:90]}")
        if c.response is not None:
            typer.echo(f"        response: {' '.join(c.response.split())[:100]}")
        typer.echo(f"        {c.reason}")


@certificates_app.command("verify")
def verify_cmd(
    certificate_id: str = typer.Argument(..., metavar="ID"),
    sample: int = typer.Option(5, "--sample", min=0, help="Recorded cases to judge again (0: skip the re-run)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the re-run sample."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    home: HomeOpt = None, model: ModelOpt = None, threads: ThreadsOpt = None,
) -> None:
    """Recompute the statistics, check integrity and hashes, re-run a sample; exit 1 when anything fails."""
    from .certificates import certificate_node, load_record, served_state
    from .verify import verify_certificate

    config = make_config(home, model, threads=threads)
    with _graph(config, readonly=True) as graph:
        certificate_node(graph, certificate_id)
        lm = readout = None
        if sample > 0:
            lm = _load_model(config)
            try:
                record = load_record(config, certificate_id)
                needs_readout = record.readout_sha256 is not None or record.judge.kind == "readout"
            except DreamError:
                needs_readout = False
            readout = _load_readout(config, lm, required=False) if needs_readout else None
            served = served_state(config, lm, readout)
        else:
            served = _served_from_files(config)
        report = verify_certificate(graph, config, certificate_id, served=served, lm=lm, readout=readout,
                                    sample=sample, seed=seed)
    if as_json:
        typer.echo(_dump(report))
    else:
        for c in report.checks:
            typer.echo(f"{'ok    ' if c.ok else 'FAILED'}  {c.name:<10} {c.detail}")
        for rr in report.rerun:
            mark = "same" if rr.same else "DIFFERS"
            typer.echo(f"        cases[{rr.index}] {mark}: passed {rr.recorded_passed}->{rr.rerun_passed}, score "
                       f"{rr.recorded_score:.6g}->{rr.rerun_score:.6g}"
                       + ("" if rr.recorded_response == rr.rerun_response else "; response differs"))
        typer.echo(("verified: " if report.ok else "NOT verified: ") + certificate_id
                   + ("" if report.ok else f" (fields: {', '.join(report.failed_fields) or '-'})"))
    if not report.ok:
        raise typer.Exit(1)


# ------------------------------------------------------------------------------------------------ operator

@certificates_app.command("review")
def review_cmd(
    certificate_id: str = typer.Argument(..., metavar="ID"),
    approve: bool = typer.Option(False, "--approve", help="Approve: the certificate's claim is accepted."),
    reject: bool = typer.Option(False, "--reject", help="Reject it."),
    reason: str = typer.Option(..., "--reason", help="Why (kept with the decision)."),
    operator: str | None = typer.Option(None, "--operator", envvar="AMYGDALA_OPERATOR",
                                           help="Your name (default: $USER)."),
    home: HomeOpt = None, model: ModelOpt = None,
) -> None:
    """Record the operator's decision on a certificate (appended to its history; the agent cannot do this)."""
    import getpass

    from .review import ReviewRefused, review

    if approve == reject:
        raise _fail("give exactly one of --approve or --reject", 2)
    config = make_config(home, model)
    _refuse_beside_daemon(config, f"review {certificate_id}",
                          "use its review page at /review (the login URL `amygdala serve` printed)")
    who = operator or getpass.getuser()
    served = _served_from_files(config)
    with _graph(config, readonly=False) as graph:
        try:
            node = review(graph, config, certificate_id, "approve" if approve else "reject", reason=reason,
                          operator=who, via="cli", served=served)
        except ReviewRefused as exc:
            raise _fail(str(exc), 2) from None
    last = node.reviews[-1]
    typer.echo(f"{certificate_id}: {last.decision}d by {last.operator} at {last.time:%Y-%m-%d %H:%M:%S} UTC "
               f"({len(node.reviews)} decision(s) in its history)")


@certificates_app.command("report")
def report_cmd(
    ctx: typer.Context,
    certificate_id: str = typer.Argument(..., metavar="ID"),
    out: Path = typer.Option(..., "--out", help="The HTML file to write (one self-contained file)."),
    check: bool = typer.Option(True, "--check/--no-check", help="Show staleness against the weights files."),
    home: HomeOpt = None, model: ModelOpt = None,
) -> None:
    """Write the certificate's review page as one self-contained HTML file, for archiving."""
    from amygdala.fsio import atomic_write_text

    render = getattr(ctx.obj, "certificate_html", None)
    if render is None:
        raise _fail("no report renderer: run this through the `amygdala` command", 2)
    config = make_config(home, model)
    served = _served_from_files(config) if check else None
    with _graph(config, readonly=True) as graph:
        html = render(graph, config, certificate_id, served, standalone=True)
    out = out.expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, html)
    typer.echo(f"wrote {out} ({len(html.encode()) / 1024:.0f} KiB)")


__all__ = ["certificates_app", "certify_cmd"]
