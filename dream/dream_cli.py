"""`amygdala dream --once`: one dream cycle from a shell, without the daemon.

Prints a summary table (or the whole report with --json) and exits 0 for every outcome the loop
reached on purpose (kept, rolled_back, no_failures, dry_run), 1 for failed or interrupted cycles
and 2 for a refusal (the home belongs to a running daemon, a cycle is running, bad settings).
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Optional

import typer

from amygdala.engine.cli import HomeOpt, ModelOpt, echo_err, make_config

from .errors import DreamError

if TYPE_CHECKING:  # the loop pulls in torch: imported when the command runs, so `--help` stays fast
    from .loop import CycleReport


def dream_cmd(
    once: bool = typer.Option(False, "--once", help="Run one cycle now and exit (the daemon runs the nightly ones)."),
    budget_steps: Optional[int] = typer.Option(None, "--budget-steps", min=1, help="Most optimizer steps (default 10)."),
    budget_minutes: Optional[float] = typer.Option(None, "--budget-minutes", min=0.1,
                                                   help="Wall-clock budget of the cycle (default 15)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Sample, judge and report what would be trained; train and sync nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole cycle report as JSON."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the sampling (default: a fresh one, recorded)."),
    home: HomeOpt = None, model: ModelOpt = None,
    token: Optional[str] = typer.Option(None, "--token", envvar="AMYGDALA_TOKEN",
                                        help="Bearer token of the running daemon (when it was started with one)."),
) -> None:
    """Run a dream cycle (in the running daemon when there is one): on-policy failures of the invariants and pending corrections become ORPO triplets,
    trained through APOLLO, kept only if no invariant's held-out pass rate and not the neutral perplexity regressed."""
    if not once:
        echo_err("error: pass --once to run one cycle now; nightly cycles are run by the daemon (`amygdala serve`)")
        raise typer.Exit(2)
    from .loop import CycleBusy
    from .standalone import DaemonOwnsHome, run_standalone

    config = make_config(home, model)
    from .daemon_client import daemon_for

    client = daemon_for(config.home_lock().holder(), token)
    if client is not None:  # the daemon owns model, worker and graph: it runs the cycle
        raise typer.Exit(_once_through_daemon(client, dry_run=dry_run, seed=seed, budget_steps=budget_steps,
                                              budget_minutes=budget_minutes, as_json=as_json))
    try:
        report = run_standalone(config, dry_run=dry_run, seed=seed, budget_steps=budget_steps,
                                budget_minutes=budget_minutes, echo=echo_err,
                                on_progress=None if as_json else _progress_line)
    except (DaemonOwnsHome, CycleBusy) as exc:
        echo_err(f"error: {exc}")
        raise typer.Exit(2) from None
    except DreamError as exc:
        echo_err(f"error: {exc}")
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(report.model_dump_json(indent=2))
    else:
        typer.echo(render(report))
    raise typer.Exit(1 if report.outcome in ("failed", "interrupted") else 0)


def _once_through_daemon(client, *, dry_run: bool, seed: int | None, budget_steps: int | None,
                         budget_minutes: float | None, as_json: bool) -> int:
    """Start the cycle in the daemon, follow its progress, print its report; the exit code as standalone."""
    from .daemon_client import DaemonRequestFailed
    from .loop import CycleReport

    try:
        started = client.run_dream(dry_run=dry_run, budget_steps=budget_steps, budget_minutes=budget_minutes, seed=seed)
    except DaemonRequestFailed as exc:
        echo_err(f"error: {exc}")
        return 2 if exc.status in (409, 422, None) else 1
    cycle_id = started["cycle_id"]
    echo_err(f"dream: cycle {cycle_id} started in the daemon at {client.url}")

    def show(running: dict) -> None:
        if not as_json:
            counts = f" {running['done']}/{running['total']}" if running.get("total") else ""
            echo_err(f"dream: {running.get('phase')}{counts}")

    try:
        detail = client.wait_cycle(cycle_id, on_progress=show)
    except DaemonRequestFailed as exc:
        echo_err(f"error: {exc}")
        return 1
    report = detail.get("report")
    if as_json:
        typer.echo(json.dumps(report if report is not None else detail, indent=2))
    elif report is not None:
        typer.echo(render(CycleReport.model_validate(report)))
    else:
        c = detail["cycle"]
        typer.echo(f"dream cycle {c['cycle_id']}: {c['outcome']}\n  {c['reason']}")
    return 1 if detail["cycle"]["outcome"] in ("failed", "interrupted") else 0


def _progress_line(phase: str, done: int, total: int, message: str) -> None:
    if not total and not message:
        print(f"dream: {phase}", file=sys.stderr)


def render(report: CycleReport) -> str:
    """A short human summary: outcome, per-invariant before/after, perplexity, training, time per phase."""
    lines = [f"dream cycle {report.id}: {report.outcome}", f"  {report.reason}"]
    for text in report.previous:
        lines.append(f"  earlier: {text}")
    if report.temperature is not None:
        fr = f"{report.failure_rate:.2f}" if report.failure_rate is not None else "n/a"
        nxt = f"{report.next_temperature:.3f}" if report.next_temperature is not None else "n/a"
        lines.append(f"  temperature {report.temperature:.3f} -> {nxt}, on-policy failure rate {fr}")
    if report.before is not None:
        lines.append(f"  {'invariant':<16} {'pass before':>11} {'pass after':>10} {'margin before':>13} {'margin after':>12}")
        for name, b in report.before.invariants.items():
            a = report.after.invariants.get(name) if report.after else None
            lines.append(f"  {name:<16} {b.pass_rate:>11.3f} {a.pass_rate if a else float('nan'):>10.3f} "
                         f"{b.mean_margin:>+13.4f} {a.mean_margin if a else float('nan'):>+12.4f}")
        pb = report.before.perplexity
        pa = report.after.perplexity if report.after else None
        if pb is not None:
            lines.append(f"  neutral perplexity {pb:.3f}" + (f" -> {pa:.3f} ({100 * (pa / pb - 1):+.2f}%)" if pa else ""))
    tr = report.training
    if tr.jobs:
        lines.append(f"  trained {tr.steps_applied}/{tr.planned_steps} step(s) on {tr.examples} example(s) "
                     f"({tr.orpo} ORPO, {tr.sft} SFT) in {tr.seconds:.1f} s" + (", rolled back" if tr.rolled_back else ""))
    counts = report.counts
    if counts:
        lines.append("  " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if report.timings:
        lines.append("  time: " + ", ".join(f"{k} {v:.1f}s" for k, v in report.timings.items()))
    return "\n".join(lines)
