"""The one owner of a correction's lifecycle: submit -> training job -> status.

A correction is stored durably first (the memory graph fsyncs before returning), then, on request,
becomes a training job. Its status follows the job, and only this module moves it:

    pending --train_now / dream cycle--> queued(job_id) --job done, steps applied--> trained
                                                      \\--job failed / cancelled / lost--> pending
    trained --rollback of its job (or a later one)--> rolled_back

Why one owner: the steps used to be spread over the MCP tool, the training client and a lambda,
and a correction never left `queued`. Here every transition is a compare-and-set on the graph
(`expect=`), so a late or repeated event cannot move a correction twice, and `reconcile()` at
start-up returns to `pending` any correction whose job died with an earlier daemon (kill -9
during a job left corrections `queued` forever). The dream loop extends this class rather than
writing statuses itself.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from amygdala.memory_graph import Correction, MemoryGraph
from amygdala.training.examples import tokenize_example
from amygdala.training.schemas import JobRejected, JobResult, LossKind, RollbackResult, TrainJob, WorkerUnavailable

log = logging.getLogger(__name__)


class TrainerPort(Protocol):
    """What the lifecycle needs from the training worker's client (training.client.TrainingClient)."""

    on_job_finished: list[Callable[[JobResult], None]]

    def submit(self, job: TrainJob) -> str: ...
    def job(self, job_id: str) -> JobResult: ...
    def rollback(self, job_id: str, timeout: float | None = ...) -> RollbackResult: ...


@dataclass(frozen=True)
class SubmitOutcome:
    correction: Correction
    created: bool  # False: an earlier call with the same idempotency key stored it
    job_id: str | None = None  # the job queued by this call
    loss: LossKind | None = None
    message: str = ""


class CorrectionLifecycle:
    """Submit corrections, queue them as training jobs, and keep their status true to the jobs."""

    def __init__(self, graph: MemoryGraph, tokenizer: Any, trainer: TrainerPort | None = None):
        self.graph = graph
        self.tokenizer = tokenizer
        self.trainer: TrainerPort | None = None
        self._queue_lock = threading.Lock()  # one check-then-queue at a time: a correction gets one job
        # A job can finish before mark_queued records who it holds (trainer.submit returns first, and a
        # one-example job on a small model takes milliseconds). Its outcome waits here for mark_queued;
        # this lock, never held across submit, orders the two.
        self._finish_lock = threading.Lock()
        self._unclaimed: dict[str, JobResult] = {}
        if trainer is not None:
            self.attach(trainer)

    # -- wiring ------------------------------------------------------------------------------------
    def attach(self, trainer: TrainerPort) -> list[str]:
        """Follow `trainer`'s jobs from now on; returns the corrections reconcile() returned to pending."""
        self.trainer = trainer
        trainer.on_job_finished.append(self.on_job_finished)
        return self.reconcile()

    # -- submit ------------------------------------------------------------------------------------
    def submit(self, context: str, preferred: str, rejected: str | None = None, *, invariant: str | None = None,
               note: str | None = None, idempotency_key: str | None = None, train_now: bool = False,
               label: str | None = None) -> SubmitOutcome:
        """Store a correction durably; with train_now also queue it (ORPO with rejected, SFT without).

        A retry with the same idempotency key returns the stored correction and queues a job only
        if none holds it yet (the first attempt's queueing may have failed).
        """
        if rejected is not None and not rejected.strip():
            rejected = None
        if train_now and self.trainer is None:
            raise WorkerUnavailable("train_now needs the training worker, which this server runs without "
                                    "(started with --no-train); submit without train_now and the dream loop will pick it up")
        corr, created = self.graph.add_correction(context, preferred, rejected, invariant, note, idempotency_key)
        message = ("stored durably; the nightly dream loop will train on it" if created
                   else "already stored under this idempotency_key; nothing new was written")
        if not train_now:
            return SubmitOutcome(corr, created, message=message)
        try:
            corr, job_id, loss = self.queue(corr.id, label=label)
        except (JobRejected, WorkerUnavailable) as exc:
            return SubmitOutcome(self.graph.get(corr.id), created,  # type: ignore[arg-type]
                                 message=f"stored durably, but the training job was not queued: {exc}")
        if job_id is None:
            return SubmitOutcome(corr, created, job_id=corr.job_id,
                                 message=f"{message}; it is already {corr.status}"
                                         + (f" (job {corr.job_id})" if corr.job_id else ""))
        return SubmitOutcome(corr, created, job_id=job_id, loss=loss,
                             message=f"stored durably and queued as {loss.upper()} job {job_id}; follow it with train_status")

    def queue(self, correction_id: str, *, label: str | None = None) -> tuple[Correction, str | None, LossKind | None]:
        """Queue one pending correction as its own job: (correction, job id or None if not pending, loss)."""
        if self.trainer is None:
            raise WorkerUnavailable("no training worker: the server runs with --no-train")
        with self._queue_lock:
            corr = self._correction(correction_id)
            if corr.status != "pending":
                return corr, None, None
            example = tokenize_example(self.tokenizer, corr.context, corr.preferred, corr.rejected)
            job_id = self.trainer.submit(TrainJob(examples=[example], label=label or corr.id))
            corr = self.mark_queued([corr.id], job_id)[0]
            return corr, job_id, example.loss

    def mark_queued(self, correction_ids: list[str], job_id: str) -> list[Correction]:
        """Record that `job_id` holds these pending corrections (the dream loop batches many into one job)."""
        with self._finish_lock:
            out = [self.graph.set_correction_status(cid, "queued", job_id=job_id, expect="pending",
                                                    note=f"training job {job_id}") for cid in correction_ids]
            early = self._unclaimed.pop(job_id, None)
            if early is not None:  # it finished before we got here: apply its outcome now
                self._apply(early, out)
                out = [self._correction(c.id) for c in out]
        return out

    # -- events ------------------------------------------------------------------------------------
    def on_job_finished(self, result: JobResult) -> None:
        """queued -> trained (steps applied) or back to pending (failed, cancelled, dry run, nothing applied)."""
        if result.dry_run:
            return
        with self._finish_lock:
            held = self._held_by(result.job_id)
            if held:
                self._apply(result, held)
                return
            self._unclaimed[result.job_id] = result
            while len(self._unclaimed) > 256:  # jobs nobody will claim (not correction jobs): keep it bounded
                del self._unclaimed[next(iter(self._unclaimed))]

    def _apply(self, result: JobResult, held: list[Correction]) -> None:
        for corr in held:
            if result.state == "done" and result.steps_applied > 0:
                self.graph.set_correction_status(corr.id, "trained", expect="queued", job_id=result.job_id,
                                                 note=f"job {result.job_id}: {result.steps_applied} step(s) applied, "
                                                      f"loss {result.loss if result.loss is not None else 'n/a'}")
            else:
                why = result.error or f"job {result.state} with {result.steps_applied} step(s) applied"
                self.graph.set_correction_status(corr.id, "pending", expect="queued",
                                                 note=f"job {result.job_id} did not train it: {why}")

    def rollback(self, job_id: str) -> RollbackResult:
        """Undo a job (and every later one) in the worker and mark their corrections rolled_back."""
        if self.trainer is None:
            raise WorkerUnavailable("no training worker: the server runs with --no-train")
        result = self.trainer.rollback(job_id)
        self.on_rollback(result)
        return result

    def on_rollback(self, result: RollbackResult, reason: str | None = None) -> list[Correction]:
        undone = set(result.undone_jobs)
        out = []
        for corr in self.graph.nodes("correction"):
            assert isinstance(corr, Correction)
            if corr.status == "trained" and corr.job_id in undone:
                note = f"job {corr.job_id} rolled back" + (f": {reason}" if reason else f" (rollback to before {result.job_id})")
                out.append(self.graph.set_correction_status(corr.id, "rolled_back", expect="trained", note=note))
        return out

    def reconcile(self) -> list[str]:
        """Queued corrections whose job no live worker knows (it died with an earlier daemon) go back to pending."""
        returned = []
        for corr in self.graph.nodes("correction"):
            assert isinstance(corr, Correction)
            if corr.status != "queued":
                continue
            if self.trainer is not None and corr.job_id is not None:
                try:
                    job = self.trainer.job(corr.job_id)
                except KeyError:
                    job = None
                if job is not None:
                    if job.finished:  # finished while nobody listened: apply the outcome now
                        self.on_job_finished(job)
                    continue
            self.graph.set_correction_status(corr.id, "pending", expect="queued",
                                             note=f"job {corr.job_id or '?'} was lost (the daemon stopped before it "
                                                  "finished); back to pending for the next dream cycle or train_now")
            returned.append(corr.id)
        if returned:
            log.warning("%d correction(s) left queued by a lost job are pending again: %s", len(returned), ", ".join(returned))
        return returned

    # -- reads -------------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        return dict(self.graph.stats().corrections_by_status)

    def _held_by(self, job_id: str) -> list[Correction]:
        return [c for c in self.graph.nodes("correction")
                if isinstance(c, Correction) and c.status == "queued" and c.job_id == job_id]

    def _correction(self, correction_id: str) -> Correction:
        node = self.graph.get(correction_id)
        if not isinstance(node, Correction):
            raise JobRejected(f"{correction_id} is a {node.kind}, not a correction")
        return node
