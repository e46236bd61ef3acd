"""One dream cycle: sample, respond on-policy, judge, build triplets, train, re-evaluate, keep or roll back.

    sample    invariants, their training-side cases (failing ones weighted up, replay interleaved),
              memories for template fills, model-written variations; pending corrections
    respond   several seeded samples per case at the temperature controller's temperature
    judge     each sample by its invariant's judge; the failure rate updates the controller
    triplets  failure -> (context, reference or best passing sample, the failing sample);
              corrections join (SFT when they have no rejected reply); held-out contexts refused
    baseline  held-out evaluation of every invariant + neutral perplexity (reused from the last
              cycle's final evaluation when the weights hash and the invariants are unchanged)
    train     ORPO through APOLLO on the training worker, one pass, within the step and time budget
    evaluate  the same evaluation on the trained weights
    decide    any invariant's held-out pass rate down by more than `tolerance`, or perplexity up by
              more than `max_perplexity_rise` -> roll back exactly (the worker's pre-job snapshot)
              and record why; otherwise sync the checkpoint and mark the corrections trained

Everything is recorded on a `cycle` node in the memory graph (memory_graph.models.DreamCycle): it
is written when the cycle starts and updated at every phase, so a cycle killed at any point leaves a
node saying where it was (phase, cases done, steps done, the job ids, the weights hashes), and the
next cycle closes it as `interrupted` and reports what it left. Each update is one journal record,
so the graph is consistent after a kill at any instant.

Kill safety of the weights: training runs in the worker process on the served weights; a killed
standalone cycle takes the trained weights with it (the worker exits with its parent), so the
checkpoint on disk is as before; a sync is atomic (redo journal), so the disk is as before or after.
A worker applies a step as one unit between two reads of the seqlock counter, so memory holds the
weights from before or after complete steps.

One cycle at a time per memory graph: a process-wide registry refuses a second start in this
process, and the graph's unfinished cycle (whose owner process is alive) refuses one from another
process; the refusal names the running cycle. Cancel with the `cancel` event: it is checked between
batches of cases, between training jobs (and inside one when the trainer can cancel a job), and
between phases; a cancelled cycle rolls back what it trained.
"""

from __future__ import annotations

import logging
import math
import os
import random
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from amygdala.engine.model import LoadedModel
from amygdala.memory_graph import Correction, DreamCycle, Invariant, MemoryGraph
from amygdala.memory_graph.models import utc_now
from amygdala.training.schemas import JobResult, RollbackResult, TrainJob

from . import invariants as inv_store
from .corrections import CorrectionLifecycle
from .curriculum import (Curriculum, build_pool, case_history, correction_boosts, memory_texts, sample_cases,
                         write_variations)
from .errors import DreamError
from .evaluate import (EvalSettings, Evaluation, EvaluationCancelled, eval_key, evaluate, held_out_contexts,
                       neutral_texts, preference_margins, regressions)
from .invariants import InvariantSpec
from .judges import JudgeContext, build_judge
from .respond import Responses, sample_responses
from .temperature import TemperatureController, TemperatureSettings, TemperatureState
from .triplets import (Judged, PreferredFrom, Triplet, check_not_held_out, correction_triplets, failure_triplets,
                       forced_choice_triplets, to_examples)

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int, str], None]  # (phase, done, total, message)


# -- settings and collaborators ------------------------------------------------------------------
class DreamSettings(BaseModel):
    """How a cycle runs. Defaults are sized for the embedded 270M model on 2 CPU cores (under 15 minutes)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    budget_steps: int = Field(10, ge=1, le=10_000, description="Most optimizer steps the cycle trains (measured on the embedded "
                              "model: one pass over ~80 triplets; a second pass over the same cases cost listen 7 points).")
    budget_minutes: float = Field(15.0, gt=0, le=24 * 60, description="Wall-clock budget of the whole cycle.")
    cases_per_invariant: int = Field(18, ge=1, le=1000, description="Training-side cases sampled per invariant.")
    template_cases: int = Field(6, ge=0, le=1000, description="Template fills added to each invariant's pool.")
    variations: int = Field(0, ge=0, le=100, description="Model-written rewordings added to each invariant's pool.")
    memories: int = Field(8, ge=0, le=1000, description="Memories drawn to fill {memory} placeholders.")
    replay_fraction: float = Field(0.25, ge=0, le=1, description="Share of each invariant's draw from cases that passed before.")
    samples_per_case: int = Field(2, ge=1, le=64, description="On-policy samples per case.")
    max_new_tokens: int = Field(32, ge=1, le=512, description="Tokens per on-policy sample (cut at the first newline).")
    batch_size: int = Field(16, ge=1, le=512, description="Rows per batched decode.")
    max_triplets_per_case: int = Field(2, ge=1, le=64)
    forced_choice: bool = Field(True, description="Also train (context, preferred, written rejected) for sampled cases "
                                                  "whose forced choice the model gets wrong (see dream/triplets.py).")
    rehearse: bool = Field(True, description="With forced_choice, also rehearse the written pair of sampled cases the "
                                             "model already gets right (interleaved replay; see dream/triplets.py).")
    on_policy_ratio: float | None = Field(None, ge=0, le=100, description="Most on-policy triplets per written-pair "
                                          "triplet (forced choice + rehearsal) of the same invariant; None: no cap "
                                          "(an experiment knob: at 0.5 it did not bind in the benchmark's cycle).")
    preferred: PreferredFrom = Field("reference", description="Preferred side of a failure triplet: the case's reference "
                                                             "reply, or its best passing on-policy sample ('best_sample').")
    max_corrections: int = Field(64, ge=0, le=10_000, description="Pending corrections joined per cycle, newest first.")
    lr: float | None = Field(1e-4, gt=0, le=1e-2, description="Learning rate of the cycle's jobs (None: the worker's, "
                             "1e-5). Measured on the embedded model: 1e-4 at batch 8 moved push-back's held-out pass rate "
                             "+27 points in 12 steps of written pairs; 5e-5 for 5 steps flipped none.")
    train_batch_size: int | None = Field(8, ge=1, le=256, description="Examples per step (None: the worker's).")
    train_chunks: int = Field(2, ge=1, le=16, description="Training jobs the steps are split into: the cycle checks "
                                                         "cancel and the clock between them.")
    tolerance: float = Field(0.05, ge=0, le=1, description="Largest allowed fall of any invariant's held-out pass rate.")
    max_perplexity_rise: float = Field(1.0, ge=0, description="Largest allowed rise of neutral perplexity (absolute).")
    reuse_baseline: bool = True
    temperature: TemperatureSettings = Field(default_factory=TemperatureSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    progress_every_s: float = Field(10.0, ge=0, description="Least time between progress writes to the graph "
                                                            "(phase changes are always written).")
    respond_share: float = Field(0.4, gt=0, le=1, description="Share of the time budget on-policy sampling may use.")
    train_share: float = Field(0.75, gt=0, le=1, description="Point of the budget after which no new training job starts.")


class Trainer(Protocol):
    """What the loop needs of the training worker's client (training.client.TrainingClient)."""

    def submit(self, job: TrainJob) -> str: ...
    def wait(self, job_id: str, timeout: float | None = None) -> JobResult: ...
    def rollback(self, job_id: str, timeout: float | None = ...) -> RollbackResult: ...
    def status(self) -> Any: ...


class Syncer(Protocol):
    """Writes the live weights to the checkpoint (standalone: CheckpointSyncer; daemon: its debounced sync)."""

    def sync(self) -> Any: ...


@dataclass
class DreamDeps:
    """The cycle's collaborators, handed in explicitly (dream never imports server)."""

    lm: LoadedModel
    graph: MemoryGraph
    lifecycle: CorrectionLifecycle
    trainer: Trainer | None = None  # None: only dry runs
    readout: Callable[[], Any] | None = None  # the emotion readout, for readout judges (None when there is none)
    syncer: Syncer | None = None
    sync_after_rollback: bool = False  # daemon: a debounced sync may have written the trained weights meanwhile
    neutral: Callable[[], list[str]] = neutral_texts
    on_progress: ProgressFn | None = None
    clock: Callable[[], datetime] = utc_now
    runner: str = "standalone"


# -- the report ----------------------------------------------------------------------------------------
class TrainingSummary(BaseModel):
    model_config = ConfigDict(extra="forbid")

    jobs: list[str] = Field(default_factory=list)
    examples: int = 0
    orpo: int = 0
    sft: int = 0
    planned_steps: int = 0
    steps_applied: int = 0
    steps_skipped: int = 0
    losses: list[float | None] = Field(default_factory=list)
    grad_norms: list[float | None] = Field(default_factory=list)
    seconds: float = 0.0
    stopped_early: str | None = None
    error: str | None = None
    rolled_back: bool = False
    restored_exactly: bool | None = None


class CycleReport(BaseModel):
    """What a cycle did, for the CLI (`--json`), the daemon's dream tools and the benchmark."""

    model_config = ConfigDict(extra="forbid")

    id: str
    outcome: str
    reason: str
    dry_run: bool = False
    started: datetime
    finished: datetime | None = None
    phase: str = "done"
    temperature: float | None = None
    next_temperature: float | None = None
    failure_rate: float | None = None
    counts: dict[str, int] = Field(default_factory=dict)
    before: Evaluation | None = None
    after: Evaluation | None = None
    regressions: list[str] = Field(default_factory=list)
    training: TrainingSummary = Field(default_factory=TrainingSummary)
    triplets: list[dict[str, Any]] = Field(default_factory=list)
    corrections: list[str] = Field(default_factory=list)
    timings: dict[str, float] = Field(default_factory=dict)
    weights_before: str | None = None
    weights_after: str | None = None
    weights_final: str | None = None
    previous: list[str] = Field(default_factory=list, description="What earlier, interrupted cycles left behind.")
    synced: bool = False

    @property
    def weights_changed(self) -> bool:
        return self.outcome == "kept"


class CycleBusy(DreamError):
    """A second cycle was started while one runs; the message names the running cycle."""

    def __init__(self, cycle_id: str, detail: str = ""):
        self.cycle_id = cycle_id
        super().__init__(f"refused: dream cycle {cycle_id} is running{detail}; one cycle runs at a time: wait for it "
                         "to finish or cancel it, then start again")


class _Cancelled(Exception):
    def __init__(self, phase: str):
        self.phase = phase
        super().__init__(f"cancelled in phase {phase}")


# -- one cycle at a time ----------------------------------------------------------------------------
_REGISTRY: dict[str, str] = {}
_REGISTRY_LOCK = threading.Lock()


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def owner_alive(cycle: DreamCycle) -> bool:
    """Whether the process that runs `cycle` is still running it (a reused pid does not count)."""
    if cycle.host and cycle.host != socket.gethostname():
        return True  # another machine's cycle: we cannot tell, so do not step on it
    if cycle.pid == os.getpid() and cycle.pid_start == _process_start(os.getpid()):
        with _REGISTRY_LOCK:
            return cycle.id in _REGISTRY.values()
    try:
        os.kill(cycle.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    start = _process_start(cycle.pid)
    return cycle.pid_start is None or start is None or start == cycle.pid_start


def new_cycle_id(now: datetime | None = None) -> str:
    now = now or utc_now()
    return f"cycle-{now.strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}"


def describe_interrupted(cycle: DreamCycle, weights_now: str | None) -> str:
    """'cycle X was interrupted in phase train after 3/8 steps; weights ...' (what the next cycle reports)."""
    p = cycle.progress or {}
    where = f"cycle {cycle.id} was interrupted in phase {cycle.phase}"
    if cycle.phase == "train" and p.get("steps_total"):
        where += f" after {p.get('steps_done', 0)}/{p.get('steps_total')} steps"
    elif cycle.phase in ("respond", "judge") and p.get("cases_total"):
        where += f" after {p.get('cases_done', 0)}/{p.get('cases_total')} cases"
    if weights_now is None:
        state = "weights not checked"
    elif weights_now == cycle.weights_before:
        state = f"weights are as before it (hash {weights_now}): nothing it trained was kept"
    elif cycle.weights_after is not None and weights_now == cycle.weights_after:
        state = f"weights are as after its training (hash {weights_now}), not yet judged by its evaluation"
    else:
        state = (f"weights (hash {weights_now}) match neither its start ({cycle.weights_before}) nor its trained "
                 f"weights ({cycle.weights_after or 'none'}): other training ran since")
    jobs = (cycle.training or {}).get("jobs") if isinstance(cycle.training, dict) else None
    extra = f"; its training jobs {', '.join(jobs)} are gone with its worker" if jobs else ""
    return f"{where}; {state}{extra}"


# -- the loop ---------------------------------------------------------------------------------------
@dataclass
class _Run:
    """Mutable state of the cycle in progress (what gets written to its node)."""

    id: str
    started: datetime
    t0: float
    deadline: float
    phase: str = "start"
    progress: dict[str, Any] = field(default_factory=dict)
    last_write: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    phase_t0: float = 0.0
    results: list[JobResult] = field(default_factory=list)  # finished training jobs, in order
    cases: list[dict[str, Any]] = field(default_factory=list)  # per-case verdict counts (the curriculum's history)


class DreamLoop:
    """Runs dream cycles on explicit collaborators; `run_cycle` is one cycle, start to record."""

    def __init__(self, deps: DreamDeps, settings: DreamSettings | None = None):
        self.deps = deps
        self.settings = settings or DreamSettings()

    # -- public ----------------------------------------------------------------------------------
    def run_cycle(self, cycle_id: str | None = None, *, dry_run: bool = False, budget_steps: int | None = None,
                  budget_minutes: float | None = None, seed: int | None = None,
                  cancel: threading.Event | None = None) -> CycleReport:
        """Run one cycle and return its report; CycleBusy when one is running already."""
        s = self.settings
        updates = {k: v for k, v in {"budget_steps": budget_steps, "budget_minutes": budget_minutes}.items()
                   if v is not None}
        if updates:
            s = DreamSettings.model_validate({**s.model_dump(), **updates})
        seed = int(seed) if seed is not None else random.SystemRandom().randrange(2**31)
        cycle_id = cycle_id or new_cycle_id(self.deps.clock())
        cancel = cancel or threading.Event()
        key = str(self.deps.graph.directory.resolve())
        with _REGISTRY_LOCK:
            if key in _REGISTRY:
                raise CycleBusy(_REGISTRY[key], " in this process")
            _REGISTRY[key] = cycle_id
        try:
            return self._run(cycle_id, s, seed, dry_run, cancel)
        finally:
            with _REGISTRY_LOCK:
                _REGISTRY.pop(key, None)

    # -- internals ------------------------------------------------------------------------------
    def _run(self, cycle_id: str, s: DreamSettings, seed: int, dry_run: bool, cancel: threading.Event) -> CycleReport:
        d = self.deps
        graph, lm = d.graph, d.lm
        if not dry_run and d.trainer is None:
            raise DreamError("this dream loop has no training worker, so it can only do dry runs; pass dry_run=True "
                             "(`amygdala dream --once --dry-run`) or run it where training is on")
        weights_before = lm.weights_hash(refresh=True)
        previous = self._close_interrupted(weights_before)
        now = d.clock()
        node = DreamCycle(id=cycle_id, time=now, pid=os.getpid(), pid_start=_process_start(os.getpid()),
                          host=socket.gethostname(), runner=d.runner, seed=seed, dry_run=dry_run,
                          settings=s.model_dump(mode="json"), weights_before=weights_before,
                          details={"previous": previous})
        stored, started = graph.start_cycle(node, is_running=owner_alive)
        if not started:
            raise CycleBusy(stored.id, f" (pid {stored.pid}, phase {stored.phase}, since {stored.time:%Y-%m-%d %H:%M:%S})")
        run = _Run(id=cycle_id, started=now, t0=time.monotonic(), deadline=time.monotonic() + 60 * s.budget_minutes)
        run.phase_t0 = run.t0
        report = CycleReport(id=cycle_id, outcome="failed", reason="", dry_run=dry_run, started=now,
                             weights_before=weights_before, previous=previous)
        first_job: str | None = None
        try:
            first_job = self._cycle(run, s, seed, dry_run, cancel, report)
        except _Cancelled as exc:
            report.outcome, report.reason = "interrupted", f"cancelled in phase {exc.phase}"
            if first_job is None:
                first_job = report.training.jobs[0] if report.training.jobs else None
            if first_job is not None and report.training.steps_applied > 0 and not report.training.rolled_back:
                self._rollback(run, report, first_job, f"cycle {cycle_id} was cancelled before its evaluation")
                report.reason += "; the weights were rolled back to before the cycle"
        except BaseException as exc:
            stopped = isinstance(exc, (KeyboardInterrupt, SystemExit))
            report.outcome = "interrupted" if stopped else "failed"
            report.reason = (f"stopped by {type(exc).__name__} in phase {run.phase}" if stopped
                             else f"{type(exc).__name__}: {exc}")
            jobs = report.training.jobs
            if jobs and report.training.steps_applied > 0 and not report.training.rolled_back and d.trainer is not None:
                try:
                    self._rollback(run, report, jobs[0], f"cycle {cycle_id} failed: {exc}")
                    report.reason += "; the weights were rolled back to before the cycle"
                except Exception:  # the original error is what matters
                    log.exception("rollback after a failed cycle failed too")
            self._finish(run, report)
            raise
        self._finish(run, report)
        return report

    def _close_interrupted(self, weights_now: str) -> list[str]:
        """Mark unfinished cycles whose owner is gone as interrupted; return what each one left."""
        out = []
        for cyc in self.deps.graph.nodes("cycle"):
            if not isinstance(cyc, DreamCycle) or cyc.finished is not None or owner_alive(cyc):
                continue
            text = describe_interrupted(cyc, weights_now)
            self.deps.graph.update_cycle(cyc.id, finished=self.deps.clock(), outcome="interrupted", reason=text)
            log.warning("%s", text)
            out.append(text)
        return out

    def _phase(self, run: _Run, phase: str, cancel: threading.Event, **fields: Any) -> None:
        now = time.monotonic()
        run.timings[run.phase] = round(run.timings.get(run.phase, 0.0) + now - run.phase_t0, 3)
        run.phase_t0 = now
        if cancel.is_set():
            raise _Cancelled(run.phase)
        run.phase = phase
        run.progress = {}
        self._write(run, force=True, phase=phase, timings=dict(run.timings), **fields)
        self._notify(phase, 0, 0, "")

    def _progress(self, run: _Run, what: str, done: int, total: int) -> None:
        run.progress.update({f"{what}_done": done, f"{what}_total": total})
        self._notify(run.phase, done, total, f"{what} {done}/{total}")
        self._write(run, force=False)

    def _notify(self, phase: str, done: int, total: int, message: str) -> None:
        if self.deps.on_progress is not None:
            try:
                self.deps.on_progress(phase, done, total, message)
            except Exception:  # a progress hook never stops a cycle
                log.exception("dream progress hook failed")

    def _write(self, run: _Run, *, force: bool, **fields: Any) -> None:
        now = time.monotonic()
        if not force and now - run.last_write < self.settings.progress_every_s:
            return
        run.last_write = now
        self.deps.graph.update_cycle(run.id, progress=dict(run.progress), **fields)

    # -- the phases -----------------------------------------------------------------------------
    def _cycle(self, run: _Run, s: DreamSettings, seed: int, dry_run: bool, cancel: threading.Event,
               report: CycleReport) -> str | None:
        d = self.deps
        graph, lm = d.graph, d.lm
        rng = random.Random(seed)

        # sample -------------------------------------------------------------------------------
        self._phase(run, "sample", cancel)
        specs = inv_store.active(graph)
        inv_nodes = {n.id: n.name for n in graph.nodes("invariant") if isinstance(n, Invariant) and not n.retired}
        pending = sorted((c for c in graph.nodes("correction") if isinstance(c, Correction) and c.status == "pending"),
                         key=lambda c: c.time, reverse=True)[: s.max_corrections]
        cycles = [c for c in graph.nodes("cycle") if isinstance(c, DreamCycle)]
        last = max((c for c in cycles if c.finished is not None and c.id != run.id), key=lambda c: c.time, default=None)
        controller = TemperatureController(s.temperature, _temperature_state(cycles, run.id))
        temperature = controller.temperature
        report.temperature = temperature
        curriculum = self._curriculum(specs, pending, inv_nodes, cycles, s, seed, rng)
        cases = curriculum.cases
        report.counts.update({"invariants": len(specs), "cases": len(cases), "corrections": len(pending),
                              "memories": curriculum.memories, "variations": curriculum.variations})
        self._write(run, force=True, temperature=temperature, counts=dict(report.counts))

        # respond ------------------------------------------------------------------------------
        self._phase(run, "respond", cancel)
        respond_deadline = run.t0 + s.respond_share * 60 * s.budget_minutes
        responses = sample_responses(lm, cases, temperature=temperature, samples_per_case=s.samples_per_case,
                                     max_new_tokens=s.max_new_tokens, seed=seed, batch_size=s.batch_size,
                                     deadline=respond_deadline, cancel=cancel,
                                     on_progress=lambda done, total: self._progress(run, "cases", done, total))
        if cancel.is_set():
            raise _Cancelled("respond")

        # judge --------------------------------------------------------------------------------
        self._phase(run, "judge", cancel)
        judged, case_records = self._judge(specs, responses, curriculum, cancel, run)
        failures = sum(not j.passed for j in judged)
        report.failure_rate = failures / len(judged) if judged else None
        controller.update(failures, len(judged))
        report.next_temperature = controller.temperature
        triplets = failure_triplets(judged, preferred=s.preferred, max_per_case=s.max_triplets_per_case)
        if s.forced_choice and cases:
            forced = forced_choice_triplets(cases, preference_margins(lm, cases), rehearse=s.rehearse)
            report.counts["forced_choice_failures"] = sum(t.source == "forced_choice" for t in forced)
            if s.on_policy_ratio is not None:
                triplets = _cap_on_policy(triplets, forced, s.on_policy_ratio)
            triplets = _merge_by_case(forced, triplets)
        if all(t.source == "rehearsal" for t in triplets):
            triplets = []  # nothing failed: rehearsal alone is no reason to change the weights
        triplets = _interleave_by_invariant(triplets)
        triplets = correction_triplets(pending, inv_nodes) + triplets
        report.counts.update({"samples": len(judged), "failed_samples": failures, "blank_samples": responses.blank,
                              "unsampled_cases": responses.unsampled,
                              "on_policy_triplets": sum(t.source == "on_policy" for t in triplets),
                              "forced_choice_triplets": sum(t.source == "forced_choice" for t in triplets),
                              "rehearsal_triplets": sum(t.source == "rehearsal" for t in triplets),
                              "correction_triplets": sum(t.source == "correction" for t in triplets)})
        held_contexts = held_out_contexts(specs, s.eval.held_out_templates)
        check_not_held_out(triplets, held_contexts)
        batch = s.train_batch_size or _trainer_batch_size(d.trainer) or 4
        planned_steps = min(s.budget_steps, math.ceil(len(triplets) / batch)) if triplets else 0
        train_triplets = triplets[: planned_steps * batch]
        report.counts["triplets_trained" if not dry_run else "triplets_would_train"] = len(train_triplets)
        report.triplets = [t.summary() for t in train_triplets]
        report.corrections = [t.correction_id for t in train_triplets if t.correction_id]
        run.cases = case_records  # written with the outcome: progress writes stay small (one journal line each)
        self._write(run, force=True, counts=dict(report.counts), failure_rate=report.failure_rate,
                    details={"previous": report.previous, "temperature_state": controller.state.model_dump(mode="json")},
                    links=[("about", nid) for nid in inv_nodes] + [("about", c) for c in report.corrections])

        # baseline -------------------------------------------------------------------------------
        self._phase(run, "baseline", cancel)
        before = self._baseline(specs, s, last, cancel, run)
        report.before = before
        if not train_triplets:
            report.outcome = "no_failures"
            report.reason = (f"all {len(judged)} on-policy samples passed and no correction is pending: nothing to train"
                             if judged else "no cases to sample and no pending corrections: nothing to train")
            report.weights_final = before.weights_hash
            return None
        if dry_run:
            report.outcome = "dry_run"
            report.reason = (f"dry run: would train {len(train_triplets)} triplet(s) in {planned_steps} step(s) "
                             f"({report.counts['on_policy_triplets']} from on-policy failures, "
                             f"{report.counts['correction_triplets']} from corrections); nothing was trained or synced")
            report.weights_final = before.weights_hash
            return None

        # train --------------------------------------------------------------------------------------
        # Held-out cases are never trained on: checked again on exactly what is submitted.
        check_not_held_out(train_triplets, held_out_contexts(specs, s.eval.held_out_templates))
        self._phase(run, "train", cancel)
        first_job = self._train(run, s, train_triplets, batch, planned_steps, cancel, report)
        tr = report.training
        lm.invalidate_weights_hash()
        report.weights_after = lm.weights_hash(refresh=True)
        self._write(run, force=True, weights_after=report.weights_after, training=tr.model_dump(mode="json"))
        if tr.steps_applied == 0:
            for result in run.results:  # nothing applied: the lifecycle returns the corrections to pending
                d.lifecycle.on_job_finished(result)
            report.outcome = "failed"
            report.reason = f"training applied no step: {tr.error or tr.stopped_early or 'every step was skipped'}"
            report.weights_final = report.weights_after
            return first_job

        # evaluate ---------------------------------------------------------------------------------
        self._phase(run, "evaluate", cancel)
        after = self._evaluate(specs, s, cancel, run)
        report.after = after
        regs = regressions(before, after, tolerance=s.tolerance, max_perplexity_rise=s.max_perplexity_rise)
        report.regressions = regs
        if regs:
            self._phase(run, "rollback", cancel)
            reason = "; ".join(regs)
            self._rollback(run, report, first_job, reason)  # type: ignore[arg-type]
            report.outcome = "rolled_back"
            report.reason = f"rolled back: {reason}"
            if d.sync_after_rollback and d.syncer is not None:
                d.syncer.sync()
            return first_job
        self._phase(run, "sync", cancel)
        if d.syncer is not None:
            d.syncer.sync()
            report.synced = True
        for result in run.results:  # queued -> trained (a no-op where the daemon's hook did it already)
            d.lifecycle.on_job_finished(result)
        report.outcome = "kept"
        report.reason = _kept_reason(before, after, tr)
        report.weights_final = report.weights_after
        return first_job

    def _curriculum(self, specs: Sequence[InvariantSpec], pending: Sequence[Correction], inv_nodes: dict[str, str],
                    cycles: Sequence[DreamCycle], s: DreamSettings, seed: int, rng: random.Random) -> Curriculum:
        d = self.deps
        history = case_history(c for c in cycles if c.finished is not None)
        memories = memory_texts(d.graph, s.memories, seed) if s.memories else []
        pools = {}
        n_var = 0
        for spec in specs:
            base = build_pool(spec, rng, templates=s.template_cases, memories=memories)
            variations = write_variations(d.lm, spec, base, s.variations, seed=seed) if s.variations else []
            n_var += len(variations)
            pools[spec.name] = build_pool(spec, random.Random(seed), templates=s.template_cases, memories=memories,
                                          variations=variations) if variations else base
        picks = sample_cases(pools, history, rng, per_invariant=s.cases_per_invariant,
                             replay_fraction=s.replay_fraction, boosts=correction_boosts(inv_nodes, pending))
        return Curriculum(picks=picks, pool_sizes={k: len(v) for k, v in pools.items()}, memories=len(memories),
                          variations=n_var)

    def _judge(self, specs: Sequence[InvariantSpec], responses: Responses, curriculum: Curriculum,
               cancel: threading.Event, run: _Run) -> tuple[list[Judged], list[dict[str, Any]]]:
        d = self.deps
        readout = self._readout(specs)
        by_name = {s.name: s for s in specs}
        judges: dict[str, Any] = {}
        judged: list[Judged] = []
        records: list[dict[str, Any]] = []
        picks = curriculum.picks
        for i, (pick, samples) in enumerate(zip(picks, responses.by_case)):
            if cancel.is_set():
                raise _Cancelled("judge")
            case = pick.case
            if case.invariant not in judges:
                judges[case.invariant] = build_judge(by_name[case.invariant],
                                                     JudgeContext(lm=d.lm, readout=readout, seed=0))
            verdicts = judges[case.invariant].judge_responses([(case, smp.text) for smp in samples]) if samples else []
            case_j = [Judged(smp, v.passed, float(v.score), v.reason) for smp, v in zip(samples, verdicts)]
            judged += case_j
            scores = [j.score for j in case_j]
            records.append({"id": case.id, "invariant": case.invariant, "source": case.source, "why": pick.why,
                            "samples": len(case_j), "failed": sum(not j.passed for j in case_j),
                            "best": max(scores) if scores else None, "worst": min(scores) if scores else None})
            self._progress(run, "cases", i + 1, len(picks))
        return judged, records

    def _readout(self, specs: Sequence[InvariantSpec]) -> Any:
        """The emotion readout, asked for only when a readout judge needs it (building one takes minutes)."""
        if self.deps.readout is None or not any(s.judge.kind == "readout" for s in specs):
            return None
        return self.deps.readout()

    def _baseline(self, specs: Sequence[InvariantSpec], s: DreamSettings, last: DreamCycle | None,
                  cancel: threading.Event, run: _Run) -> Evaluation:
        lm = self.deps.lm
        if s.reuse_baseline and last is not None:
            final = (last.details or {}).get("final_eval")
            if isinstance(final, dict):
                try:
                    prev = Evaluation.model_validate(final)
                except Exception:  # noqa: BLE001 - an old or damaged record is simply not reused
                    prev = None
                if prev is not None and prev.key == eval_key(lm.weights_hash(), specs, s.eval):
                    return prev.model_copy(update={"reused_from": last.id})
        return self._evaluate(specs, s, cancel, run)

    def _evaluate(self, specs: Sequence[InvariantSpec], s: DreamSettings, cancel: threading.Event,
                  run: _Run) -> Evaluation:
        d = self.deps
        try:
            return evaluate(d.lm, specs, d.neutral() if s.eval.perplexity_texts else [], s.eval,
                            readout=self._readout(specs), cancel=cancel, weights_hash=d.lm.weights_hash(),
                            on_progress=lambda done, total: self._progress(run, "parts", done, total))
        except EvaluationCancelled:
            raise _Cancelled(run.phase) from None

    def _train(self, run: _Run, s: DreamSettings, triplets: list[Triplet], batch: int, planned_steps: int,
               cancel: threading.Event, report: CycleReport) -> str | None:
        d = self.deps
        trainer = d.trainer
        assert trainer is not None
        tr = report.training
        examples = to_examples(d.lm.tokenizer, triplets)
        tr.examples, tr.planned_steps = len(examples), planned_steps
        tr.orpo = sum(e.loss == "orpo" for e in examples)
        tr.sft = tr.examples - tr.orpo
        keep = _trainer_keep_snapshots(trainer)
        if keep == 0:
            raise DreamError("the training worker keeps no snapshots (keep_snapshots=0), so a regression could not be "
                             "rolled back; start it with keep_snapshots >= 1")
        n_chunks = max(1, min(s.train_chunks, planned_steps, keep or s.train_chunks))
        bounds = [round(i * planned_steps / n_chunks) for i in range(n_chunks + 1)]
        train_deadline = run.t0 + s.train_share * 60 * s.budget_minutes
        t0 = time.monotonic()
        first: str | None = None
        done_steps = 0
        corrections = [t.correction_id for t in triplets if t.correction_id]
        for ci in range(n_chunks):
            lo, hi = bounds[ci] * batch, bounds[ci + 1] * batch
            chunk = examples[lo:hi]
            if not chunk:
                continue
            if cancel.is_set():
                tr.stopped_early = f"cancelled after {done_steps}/{planned_steps} steps"
                break
            if ci > 0:
                per_step = (time.monotonic() - t0) / max(1, done_steps)
                if time.monotonic() + per_step * (bounds[ci + 1] - bounds[ci]) > train_deadline:
                    tr.stopped_early = (f"time budget: stopped after {done_steps}/{planned_steps} steps "
                                        f"({per_step:.1f} s/step)")
                    break
            job = TrainJob(examples=chunk, lr=s.lr, epochs=1, batch_size=batch, label=f"{run.id} part {ci + 1}/{n_chunks}")
            job_id = trainer.submit(job)
            tr.jobs.append(job_id)
            if first is None:
                first = job_id
                chunk_corr = [c for c in corrections if c]
                if chunk_corr:
                    d.lifecycle.mark_queued(chunk_corr, job_id)
            self._write(run, force=True, training=tr.model_dump(mode="json"))
            result = self._wait(run, trainer, job_id, done_steps, planned_steps, cancel)
            run.results.append(result)
            tr.steps_applied += result.steps_applied
            tr.steps_skipped += result.steps_skipped
            tr.losses += [st.loss for st in result.steps]
            tr.grad_norms += [st.grad_norm for st in result.steps]
            done_steps += len(result.steps)
            if result.state != "done":
                tr.error = result.error or f"job {job_id} {result.state}"
                break
            self._progress(run, "steps", done_steps, planned_steps)
        tr.seconds = round(time.monotonic() - t0, 3)
        if cancel.is_set():
            raise _Cancelled("train")
        return first

    def _wait(self, run: _Run, trainer: Trainer, job_id: str, done: int, total: int,
              cancel: threading.Event) -> JobResult:
        cancel_asked = False
        while True:
            try:
                return trainer.wait(job_id, timeout=0.5)
            except TimeoutError:
                pass
            if cancel.is_set() and not cancel_asked and hasattr(trainer, "cancel"):
                trainer.cancel(job_id)  # type: ignore[attr-defined]
                cancel_asked = True
            try:
                st = trainer.status()
                step = st.step if getattr(st, "current_job", None) == job_id and st.step is not None else 0
            except Exception:  # noqa: BLE001 - progress only
                step = 0
            self._progress(run, "steps", done + int(step), total)

    def _rollback(self, run: _Run, report: CycleReport, first_job: str, reason: str) -> RollbackResult:
        d = self.deps
        assert d.trainer is not None
        result = d.trainer.rollback(first_job)
        for job in run.results:  # queued -> trained first (standalone has no hook), so the rollback moves them on
            d.lifecycle.on_job_finished(job)
        d.lifecycle.on_rollback(result, reason=f"dream cycle {run.id}: {reason}")
        d.lm.invalidate_weights_hash()
        report.weights_final = d.lm.weights_hash(refresh=True)
        report.training.rolled_back = True
        report.training.restored_exactly = report.weights_final == report.weights_before
        if not report.training.restored_exactly:
            log.error("rollback of %s did not restore the weights hash (%s != %s): other training ran meanwhile?",
                      first_job, report.weights_final, report.weights_before)
        return result

    def _finish(self, run: _Run, report: CycleReport) -> None:
        """The final write: outcome, measurements, final evaluation (the next cycle's baseline)."""
        now = time.monotonic()
        run.timings[run.phase] = round(run.timings.get(run.phase, 0.0) + now - run.phase_t0, 3)
        run.timings["total"] = round(now - run.t0, 3)
        report.timings = dict(run.timings)
        report.finished = self.deps.clock()
        report.phase = run.phase if report.outcome in ("interrupted", "failed") else "done"
        if report.weights_final is None:
            self.deps.lm.invalidate_weights_hash()
            report.weights_final = self.deps.lm.weights_hash(refresh=True)
        final = report.after if report.outcome == "kept" else report.before
        if final is not None and final.weights_hash != report.weights_final:
            final = None  # e.g. rolled back while other training ran: no valid baseline to hand on
        current = self.deps.graph.get(run.id)
        details = dict(current.details) if isinstance(current, DreamCycle) else {}
        details.update({"final_eval": final.model_dump(mode="json") if final is not None else None,
                        "before": report.before.model_dump(mode="json") if report.before else None,
                        "regressions": report.regressions, "synced": report.synced,
                        "next_temperature": report.next_temperature, "corrections": report.corrections})
        per_inv: dict[str, Any] = {}
        for name, b in (report.before.invariants.items() if report.before else []):
            a = report.after.invariants.get(name) if report.after else None
            per_inv[name] = {"before": {"pass_rate": b.pass_rate, "mean_margin": b.mean_margin, "cases": b.cases},
                             "after": ({"pass_rate": a.pass_rate, "mean_margin": a.mean_margin, "cases": a.cases}
                                       if a else None)}
        ppl = {"before": report.before.perplexity if report.before else None,
               "after": report.after.perplexity if report.after else None}
        self.deps.graph.update_cycle(
            run.id, finished=report.finished, phase=report.phase, outcome=report.outcome, reason=report.reason,
            progress=dict(run.progress), temperature=report.temperature, failure_rate=report.failure_rate,
            counts=dict(report.counts), invariants=per_inv, perplexity=ppl,
            training=report.training.model_dump(mode="json"), timings=report.timings,
            weights_after=report.weights_after, weights_final=report.weights_final, details=details,
            triplets=report.triplets, cases=run.cases)
        self._notify("done", 1, 1, f"{report.outcome}: {report.reason}")


# -- helpers ------------------------------------------------------------------------------------------
def _temperature_state(cycles: Sequence[DreamCycle], current: str) -> TemperatureState | None:
    """The controller state the last cycle that measured a failure rate left (None: start fresh)."""
    for cyc in sorted(cycles, key=lambda c: c.time, reverse=True):
        if cyc.id == current:
            continue
        raw = (cyc.details or {}).get("temperature_state")
        if isinstance(raw, dict):
            try:
                return TemperatureState.model_validate(raw)
            except Exception:  # noqa: BLE001 - a state that no longer validates restarts the controller
                log.warning("dream cycle %s: stored temperature state is invalid; starting the controller afresh", cyc.id)
                return None
    return None


def _merge_by_case(first: list[Triplet], rest: list[Triplet]) -> list[Triplet]:
    """Each case's triplets together, `first`'s before `rest`'s, cases in order of first appearance."""
    order: dict[str | None, list[Triplet]] = {}
    for t in [*first, *rest]:
        order.setdefault(t.case_id, []).append(t)
    return [t for group in order.values() for t in group]


def _cap_on_policy(on_policy: list[Triplet], written: list[Triplet], ratio: float) -> list[Triplet]:
    """At most `ratio` on-policy triplets per written-pair triplet of each invariant, lowest scores first.

    Why: the shipped pair fails asymmetrically (push-back's on-policy samples fail far more often), so
    an uncapped list can tilt towards "object here" triplets and teach objecting everywhere.
    """
    per_inv: dict[str | None, int] = {}
    for t in written:
        per_inv[t.invariant] = per_inv.get(t.invariant, 0) + 1
    ranked = sorted(range(len(on_policy)), key=lambda i: (on_policy[i].score if on_policy[i].score is not None else 0.0, i))
    used: dict[str | None, int] = {}
    keep: set[int] = set()
    for i in ranked:
        inv = on_policy[i].invariant
        if used.get(inv, 0) < math.floor(ratio * per_inv.get(inv, 0)):
            used[inv] = used.get(inv, 0) + 1
            keep.add(i)
    return [t for i, t in enumerate(on_policy) if i in keep]


def _interleave_by_invariant(triplets: list[Triplet]) -> list[Triplet]:
    """Round-robin over invariants, so a step budget that cuts the list keeps every invariant in it."""
    groups: dict[str | None, list[Triplet]] = {}
    for t in triplets:
        groups.setdefault(t.invariant, []).append(t)
    out: list[Triplet] = []
    lists = list(groups.values())
    for i in range(max((len(g) for g in lists), default=0)):
        out += [g[i] for g in lists if i < len(g)]
    return out


def _trainer_batch_size(trainer: Any) -> int | None:
    settings = getattr(trainer, "settings", None)
    return getattr(settings, "batch_size", None)


def _trainer_keep_snapshots(trainer: Any) -> int | None:
    settings = getattr(trainer, "settings", None)
    return getattr(settings, "keep_snapshots", None)


def _kept_reason(before: Evaluation, after: Evaluation, tr: TrainingSummary) -> str:
    parts = []
    for name, b in before.invariants.items():
        a = after.invariants.get(name)
        if a is not None:
            parts.append(f"{name} {b.pass_rate:.2f}->{a.pass_rate:.2f} (margin {b.mean_margin:+.3f}->{a.mean_margin:+.3f})")
    if before.perplexity is not None and after.perplexity is not None:
        parts.append(f"perplexity {before.perplexity:.2f}->{after.perplexity:.2f}")
    return f"kept {tr.steps_applied} step(s): no invariant regressed; " + ", ".join(parts)
