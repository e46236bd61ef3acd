"""What the daemon's runner runs: the dream loop as a cycle function, re-certification, the recorded past.

The runner (`dream/runner.py`) and the scheduler (`dream/scheduler.py`) know nothing of the loop's
internals; this module adapts the loop (`DreamLoop.run_cycle` -> `CycleReport`) and the certificates
(`certify.recertify_stale` -> `RecertifyReport`) to them, and reads the last cycle the graph recorded
so a daemon that just started still reports the night before. The server builds the collaborators
(`DreamDeps`) from its services and hands them in: dream never imports server.

Where the cycle's model work runs: on the runner's thread, not the server's engine thread. A cycle
takes minutes; queued as one job on the engine thread it would hold up every agent call for all of
that time. The loop takes `lm.lock` per batch instead, so the agent's readouts run between a cycle's
batches (and during training, which happens in the worker process on the shared weights).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from amygdala.memory_graph import DreamCycle, MemoryGraph

from .errors import DreamError
from .loop import CycleReport, DreamDeps, DreamLoop, DreamSettings
from .runner import (
    CycleFn,
    CycleSummary,
    DreamRequest,
    Progress,
    RecertifyFn,
    RecertifySummary,
)

log = logging.getLogger(__name__)

DepsFactory = Callable[[Callable[[str, int, int, str], None]], DreamDeps]  # on_progress -> deps


def summary_from_report(report: CycleReport, request: DreamRequest) -> CycleSummary:
    return CycleSummary(
        cycle_id=report.id, outcome=report.outcome, reason=report.reason, weights_changed=report.weights_changed,
        trigger=request.trigger, dry_run=report.dry_run, temperature=report.temperature,
        next_temperature=report.next_temperature, failure_rate=report.failure_rate,
        steps=report.training.steps_applied, started_at=report.started, finished_at=report.finished,
        details=report.model_dump(mode="json", exclude={"triplets"}))


def summary_from_node(node: DreamCycle) -> CycleSummary:
    """A cycle recorded in the graph (by this daemon before a restart, or by `amygdala dream --once`)."""
    details = node.details or {}
    nxt = details.get("next_temperature")
    trigger = str(details.get("trigger") or ("cli" if node.runner == "standalone" else "unknown"))
    return CycleSummary(
        cycle_id=node.id, outcome=node.outcome or ("running" if node.finished is None else "unknown"),
        reason=node.reason or "", weights_changed=node.outcome == "kept", trigger=trigger,
        dry_run=node.dry_run, temperature=node.temperature,
        next_temperature=float(nxt) if isinstance(nxt, (int, float)) else None, failure_rate=node.failure_rate,
        steps=int((node.training or {}).get("steps_applied") or 0) if isinstance(node.training, dict) else 0,
        started_at=node.time, finished_at=node.finished,
        details={"runner": node.runner, "counts": dict(node.counts), "timings": dict(node.timings)})


def recorded_cycles(graph: MemoryGraph) -> list[DreamCycle]:
    """Every cycle node, oldest first."""
    return sorted((c for c in graph.nodes("cycle") if isinstance(c, DreamCycle)), key=lambda c: (c.time, c.id))


def last_recorded_cycle(graph: MemoryGraph) -> CycleSummary | None:
    """The newest finished cycle in the graph, or None."""
    done = [c for c in recorded_cycles(graph) if c.finished is not None]
    return summary_from_node(done[-1]) if done else None


def next_temperature(graph: MemoryGraph) -> float | None:
    """The temperature the next cycle samples at: the controller state the newest cycle left."""
    from .temperature import TemperatureState

    for cyc in reversed(recorded_cycles(graph)):
        raw = (cyc.details or {}).get("temperature_state")
        if isinstance(raw, dict):
            try:
                return TemperatureState.model_validate(raw).temperature
            except Exception:  # noqa: BLE001 - an old record: the loop restarts its controller too
                return None
    return None


def loop_cycle_fn(make_deps: DepsFactory, settings: DreamSettings | None = None) -> CycleFn:
    """The runner's cycle function: one `DreamLoop.run_cycle` under the runner's cycle id and cancel event."""

    def run(cycle_id: str, request: DreamRequest, progress: Progress) -> CycleSummary:
        deps = make_deps(lambda phase, done, total, message: progress(phase, done, total, message))
        loop = DreamLoop(deps, settings)
        report = loop.run_cycle(cycle_id, dry_run=request.dry_run, budget_steps=request.budget_steps,
                                budget_minutes=request.budget_minutes, seed=request.seed,
                                cancel=progress.cancel_event)
        try:  # who started it, for dream_status after a restart
            details = dict(deps.graph.get(report.id).details or {})
            deps.graph.update_cycle(report.id, allow_finished=True,
                                    details={**details, "trigger": request.trigger, "requested_by": request.requested_by})
        except Exception:
            log.exception("recording the trigger of cycle %s failed", report.id)
        return summary_from_report(report, request)

    return run


class CertifyPort(Protocol):
    def __call__(self, cycle_id: str | None, progress: Callable[[int, int, str], None]) -> Any: ...


def recertify_fn(recertify: CertifyPort) -> RecertifyFn:
    """The runner's re-certification: `recertify(cycle_id, progress) -> certify.RecertifyReport`."""

    def run(after_cycle: str | None, progress: Progress) -> RecertifySummary:
        report = recertify(after_cycle, lambda done, total, message: progress("certify", done, total, message))
        return RecertifySummary(after_cycle=after_cycle, attempted=len(report.stale), certified=len(report.certified),
                                failed=list(report.not_certified), certificate_ids=list(report.certificate_ids))

    return run


def certify_after_cycle(graph: MemoryGraph, config: Any, lm: Any, readout: Any, cycle_id: str | None,
                        progress: Callable[[int, int, str], None]) -> Any:
    """After a cycle kept trained weights: every active invariant gets a certificate on the new weights.

    Those whose newest certificate went stale are certified again (`certify.recertify_stale`), and
    those never certified are certified for the first time, so the operator's review page has a
    current certificate for each rule the weights were trained against.
    """
    from .certificates import certificate_nodes
    from .certify import certify, recertify_stale
    from .invariants import active

    report = recertify_stale(graph, config, lm, readout=readout, cycle_id=cycle_id, progress=progress)
    never = [spec.name for spec in active(graph) if not certificate_nodes(graph, spec.name)]
    for i, name in enumerate(never):
        progress(i, len(never), f"certifying {name} (first certificate)")
        try:
            rec = certify(graph, config, lm, name, readout=readout, cycle_id=cycle_id)
        except DreamError as exc:
            report.not_certified.append(f"{name}: {exc}")
            continue
        report.certificate_ids.append(rec.id)
        if rec.verdict == "certified":
            report.certified.append(name)
        else:
            report.not_certified.append(f"{name}: {rec.verdict} ({rec.result.passes}/{rec.result.n})")
    return report


class SyncNow(Protocol):
    def sync_now(self) -> Any: ...


class DaemonSyncer:
    """The loop's Syncer in the daemon: sync now through the debounced sync (which cancels its pending one).

    A kept cycle is a natural checkpoint, and going through `SyncScheduler.sync_now` serialises this
    sync with the debounced ones, so two never write the model files at once.
    """

    def __init__(self, sync: SyncNow):
        self._sync = sync

    def sync(self) -> Any:
        return self._sync.sync_now()
