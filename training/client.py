"""The serving process's handle on the training worker: submit, status, wait, rollback, close.

Nothing here blocks on training: `submit` validates the ids against the served model and sends the
job (a ZeroMQ message); a listener thread receives the worker's events and keeps the status that
`status()` returns from memory. The same thread watches the worker process: if it dies, every job
it held is marked failed with the reason, `status().worker_alive` turns false with the exit code,
and the server keeps serving (the next `submit` restarts the worker when `auto_restart`).

The worker is always started from one long-lived thread the client owns (`_spawner`): the
worker's parent-death signal follows the thread that started it, and a request thread that
restarted the worker and then exited would take the worker with it.

Checkpoint sync asks `weights_version` and `changed_since(v)` (the tensors training wrote after
version v); after a checkpoint undo, `reload_from_checkpoint` makes the live weights equal to the
files again, in the worker (which owns the weights while it runs) or here if it is not running.

`on_job_finished` is a list of callables called (from the listener thread) with every finished
JobResult: done, failed, cancelled, dry runs too; a checkpoint-sync scheduler should act on
`result.steps_applied > 0`. They run before `wait()` returns that result, so they must be quick
(schedule work, don't do it). Exceptions in hooks are logged, never propagated.
"""

from __future__ import annotations

import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from amygdala.engine.config import Config
from amygdala.engine.model import LoadedModel

from .schemas import (JobRejected, JobResult, ModelLimits, RollbackResult, TrainExample, TrainJob, TrainRequest,
                      TrainSettings, TrainStatus, WorkerUnavailable, check_job)
from .trainer import trainable_parameters
from .worker import DirtyStamps, WeightsVersion, worker_main

log = logging.getLogger(__name__)

HISTORY = 1000  # finished job results kept for status and wait()


JobLike = TrainJob | TrainRequest | TrainExample


def as_job(job: JobLike) -> TrainJob:
    if isinstance(job, TrainRequest):
        return job.to_job()
    if isinstance(job, TrainJob):
        return job
    if isinstance(job, TrainExample):
        return TrainJob(examples=[job])
    raise TypeError(f"expected TrainJob, TrainRequest or TrainExample, got {type(job).__name__}")


class TrainingClient:
    """Starts the worker on `lm`'s weights (moved to shared memory) and talks to it."""

    def __init__(self, lm: LoadedModel, config: Config, settings: TrainSettings | None = None, *,
                 auto_restart: bool = True, start: bool = True, ready_timeout: float = 300.0):
        if lm.device.type != "cpu":
            raise WorkerUnavailable(f"the training worker shares weights through CPU shared memory; the model is on "
                                    f"{lm.device}. Serve on CPU (AMYGDALA_DEVICE=cpu) to train in place")
        self.lm = lm
        self.config = config
        self.settings = settings or TrainSettings()
        # Refuse bad targets here, with the valid module names, before a worker is spawned.
        self._trained, self._embedding_ids = trainable_parameters(lm.model, self.settings.train_embeddings,
                                                                  self.settings.targets)
        self.auto_restart = auto_restart
        self.ready_timeout = ready_timeout
        max_pos = getattr(lm.model.config, "max_position_embeddings", None) or config.max_tokens
        self.limits = ModelLimits(vocab_size=lm.vocab_size, max_tokens=min(config.max_tokens, int(max_pos)))
        self.on_job_finished: list[Callable[[JobResult], None]] = []

        import torch.multiprocessing as mp
        import zmq

        self._mp = mp.get_context("spawn")
        self._version = WeightsVersion(self._mp.Value("q", 0, lock=False))
        names = [n for n, _ in lm.model.named_parameters()]
        self._stamps = DirtyStamps(names, self._mp.Array("q", len(names), lock=False))
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="training-spawner")
        self._cond = threading.Condition(threading.RLock())
        self._send_lock = threading.Lock()
        self._jobs: OrderedDict[str, JobResult] = OrderedDict()
        self._queue: list[str] = []
        self._current: str | None = None
        self._step: int | None = None
        self._total: int | None = None
        self._loss: float | None = None
        self._last_error: str | None = None
        self._worker_error: str | None = "not started"
        self._finished = 0
        self._snapshots: list[str] = []
        self._replies: dict[str, dict] = {}
        self._optimizer = ""
        self._proc: Any = None
        self._stop_event: Any = None
        self._ready = False
        self._closed = False
        self._stopping = False

        self._dir = Path(tempfile.mkdtemp(prefix="amygdala-train-"))  # 0700: only this user can talk to the worker
        self._zmq = zmq.Context()
        self._commands = self._zmq.socket(zmq.PUSH)
        self._commands.setsockopt(zmq.LINGER, 0)
        self._commands.bind(f"ipc://{self._dir / 'commands'}")
        self._events = self._zmq.socket(zmq.PULL)
        self._events.setsockopt(zmq.LINGER, 0)
        self._events.bind(f"ipc://{self._dir / 'events'}")
        self._listener = threading.Thread(target=self._listen, name="training-events", daemon=True)
        self._listener.start()
        if start:
            self.start()

    # -- worker lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker (weights to shared memory first) and wait until it is ready."""
        with self._cond:
            if self._closed:
                raise WorkerUnavailable("the training client is closed")
            if self._proc is not None and self._proc.is_alive():
                return
            self._ready = False
            self._worker_error = "starting"
        boot = {"settings": self.settings.model_dump(), "commands_endpoint": f"ipc://{self._dir / 'commands'}",
                "events_endpoint": f"ipc://{self._dir / 'events'}", "state_root": str(self.config.optimizer_dir),
                "model_name": self.lm.name, "parent_pid": os.getpid(),
                "log_level": logging.getLevelName(logging.getLogger().getEffectiveLevel())}
        stop_event = self._mp.Event()
        proc = self._mp.Process(target=worker_main, name="amygdala-training-worker", daemon=True,
                                args=(self.lm.model, boot, self._version.shared, stop_event, self._stamps.shared))
        # Under the model lock: moving storage to shared memory must not race a forward pass, and the
        # model is pickled for the child with no forward hooks registered. Started from the spawner
        # thread, which lives as long as the client (see the module docstring).
        with self.lm.lock:
            self.lm.model.share_memory()
            self._spawner.submit(proc.start).result()
        deadline = time.monotonic() + self.ready_timeout
        with self._cond:
            self._proc, self._stop_event = proc, stop_event
            # Polled: a process that dies while importing sends no event to wake us.
            while not self._ready and self._worker_error == "starting" and proc.is_alive() and time.monotonic() < deadline:
                self._cond.wait(0.2)
            if not self._ready:
                if self._worker_error != "starting":
                    reason = self._worker_error
                elif not proc.is_alive():
                    reason = f"worker exited with code {proc.exitcode} before it was ready"
                else:
                    reason = f"not ready after {self.ready_timeout:.0f} s"
                self._worker_error = reason
        if not self._ready:
            self._terminate(proc)
            raise WorkerUnavailable(f"training worker failed to start: {reason}")

    def restart(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._stop_worker(timeout=30)
        self.start()

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive() and self._ready

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def weights_version(self) -> int:
        return self._version.value

    def changed_since(self, version: int) -> list[str]:
        """Parameter names training (a step, rollback or reload) wrote after weights version `version`."""
        return self._stamps.changed_since(version)

    def reload_from_checkpoint(self, names: list[str], timeout: float | None = 600.0) -> int:
        """Make the live weights equal to the checkpoint files for `names` and every trained tensor.

        For checkpoint undo (CheckpointSyncer(reload=...)). Runs in the worker after the jobs queued
        before it; if no worker runs, nobody else writes the weights and the copy is done here.
        Returns the weights version after the reload: the files and the live weights agree at it.
        """
        if self.lm.path is None:
            raise WorkerUnavailable("the served model has no directory on disk to reload from")
        wanted = sorted(set(names) | {n for n, _ in self._trained})
        if not self.alive:
            from .checkpoint.sync import reload_into

            with self._version.writing():
                self._stamps.mark(wanted, self._version.value)
                reload_into(self.lm.model, self.lm.path, wanted, lock=self.lm.lock)
            self.lm.invalidate_weights_hash()
            return self._version.value
        request_id = uuid.uuid4().hex
        self._send({"type": "reload", "request_id": request_id, "model_dir": str(self.lm.path), "names": wanted})
        with self._cond:
            if not self._cond.wait_for(lambda: request_id in self._replies or not self.alive, timeout=timeout):
                raise TimeoutError(f"reload from the checkpoint not done after {timeout} s (queued jobs run first)")
            reply = self._replies.pop(request_id, None)
        if reply is None:
            raise WorkerUnavailable(f"training worker died before reloading the checkpoint: {self._worker_error}")
        if reply.get("error"):
            raise WorkerUnavailable(f"the worker could not reload the checkpoint: {reply['error']}")
        self.lm.invalidate_weights_hash()
        return int(reply["weights_version"])

    # -- jobs -------------------------------------------------------------------------------------
    def check(self, job: JobLike) -> TrainJob:
        """Validate a job against the served model (ids in vocabulary, length); raises JobRejected."""
        job = as_job(job)
        check_job(job, self.limits)
        if job.targets is not None:
            from .targets import select

            trained = {id(p) for _, p in self._trained}
            body = [(n, p) for n, p in self._trained if id(p) not in self._embedding_ids]
            untrained = {id(p) for _, p in self.lm.model.named_parameters() if id(p) not in trained}
            select(self.lm.model, body, job.targets, exclude=self._embedding_ids | untrained, where="targets")
        return job

    def submit(self, job: JobLike) -> str:
        """Queue a job; returns its id at once. Raises JobRejected (bad input) or WorkerUnavailable."""
        job = self.check(job)
        if self._closed:
            raise WorkerUnavailable("the training client is closed")
        if not self.alive:
            if not self.auto_restart:
                raise WorkerUnavailable(f"training worker is not running ({self._worker_error}); restart it")
            log.warning("training worker not running (%s): restarting it", self._worker_error)
            self.restart()
        job_id = f"job-{uuid.uuid4().hex[:12]}"
        now = time.time()
        with self._cond:
            self._jobs[job_id] = JobResult(job_id=job_id, state="queued", dry_run=job.dry_run, label=job.label,
                                           examples=len(job.examples), submitted_at=now)
            self._queue.append(job_id)
            self._trim_history()
        try:
            self._send({"type": "job", "job_id": job_id, "job": job.model_dump(), "submitted_at": now})
        except WorkerUnavailable as exc:
            with self._cond:
                self._queue.remove(job_id)
                record = self._jobs[job_id]
                record.state, record.error, record.finished_at = "failed", str(exc), time.time()
                self._cond.notify_all()
            raise
        return job_id

    def job(self, job_id: str) -> JobResult:
        with self._cond:
            if job_id not in self._jobs:
                raise KeyError(f"unknown job id {job_id!r} (results of the last {HISTORY} jobs are kept)")
            return self._jobs[job_id].model_copy(deep=True)

    def wait(self, job_id: str, timeout: float | None = None) -> JobResult:
        """Block until the job finishes; raises TimeoutError (the job keeps running) or KeyError."""
        with self._cond:
            if job_id not in self._jobs:
                raise KeyError(f"unknown job id {job_id!r}")
            if not self._cond.wait_for(lambda: self._jobs[job_id].finished, timeout=timeout):
                raise TimeoutError(f"job {job_id} still {self._jobs[job_id].state} after {timeout} s")
            return self._jobs[job_id].model_copy(deep=True)

    def rollback(self, job_id: str, timeout: float | None = 300.0) -> RollbackResult:
        """Restore the weights and optimizer state from before `job_id` (undoing it and all later jobs).

        Runs in the worker after the jobs queued before it; blocks until done.
        """
        if not self.alive:
            raise WorkerUnavailable(f"training worker is not running ({self._worker_error}); its snapshots are gone")
        request_id = uuid.uuid4().hex
        self._send({"type": "rollback", "job_id": job_id, "request_id": request_id})
        with self._cond:
            if not self._cond.wait_for(lambda: request_id in self._replies or not self.alive, timeout=timeout):
                raise TimeoutError(f"rollback of {job_id} not done after {timeout} s (jobs queued before it run first)")
            reply = self._replies.pop(request_id, None)
        if reply is None:
            raise WorkerUnavailable(f"training worker died before rolling back {job_id}: {self._worker_error}")
        if reply.get("error"):
            raise JobRejected(reply["error"])
        return RollbackResult.model_validate(reply["result"])

    def status(self) -> TrainStatus:
        with self._cond:
            return TrainStatus(worker_alive=self.alive, worker_pid=self.pid if self.alive else None,
                               worker_error=None if self.alive else self._worker_error, queue=list(self._queue),
                               current_job=self._current, step=self._step, total_steps=self._total, loss=self._loss,
                               last_error=self._last_error, jobs_finished=self._finished,
                               weights_version=self._version.value, optimizer=self._optimizer,
                               rollback_available=list(self._snapshots))

    # -- shutdown -----------------------------------------------------------------------------------
    def close(self, timeout: float = 60.0) -> None:
        """Stop the worker between steps (never mid-step), cancel queued jobs, release sockets."""
        if self._closed:
            return
        self._stop_worker(timeout)
        with self._cond:
            self._cond.wait_for(lambda: self._current is None, timeout=2)  # the worker's last events, if any
            self._closed = True
            cancelled = self._fail_pending("cancelled", "training client closed")
        for res in cancelled:
            self._run_hooks(res)
        self._commit(cancelled)
        self._listener.join(timeout=5)
        self._commands.close()
        self._events.close()
        self._zmq.term()
        self._spawner.shutdown(wait=False)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "TrainingClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------------------
    def _send(self, message: dict) -> None:
        import zmq

        with self._send_lock:
            try:
                self._commands.send_json(message, flags=zmq.NOBLOCK)
            except zmq.Again:
                raise WorkerUnavailable("training worker is not accepting jobs (not connected); check status()") from None

    def _stop_worker(self, timeout: float) -> None:
        proc = self._proc
        if proc is None:
            return
        with self._cond:
            self._stopping = True
        if self._stop_event is not None:
            self._stop_event.set()  # checked between steps: the current step completes
        proc.join(timeout)
        self._terminate(proc)
        with self._cond:
            self._stopping = False
            self._ready = False
            self._worker_error = "stopped"
            if self._version.settle():  # it had to be killed inside a step
                self._last_error = (f"training worker did not stop within {timeout:.0f} s and was killed while writing "
                                    "weights: they are partly updated; reload the model from its checkpoint")

    @staticmethod
    def _terminate(proc: Any) -> None:
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join(5)

    def _trim_history(self) -> None:
        while len(self._jobs) > HISTORY:
            oldest = next(iter(self._jobs))
            if not self._jobs[oldest].finished:
                break
            del self._jobs[oldest]

    def _fail_pending(self, state: str, reason: str) -> list[JobResult]:
        """Finished copies of the running and queued jobs (committed by the caller after the hooks ran)."""
        failed = []
        for job_id in [*([self._current] if self._current else []), *self._queue]:
            res = self._jobs.get(job_id)
            if res is not None and not res.finished:
                res = res.model_copy(deep=True)
                res.state = state  # type: ignore[assignment]
                res.error = f"{reason} while the job was running" if job_id == self._current else f"{reason}; the job never ran"
                res.finished_at = time.time()
                failed.append(res)
        self._queue.clear()
        self._current = self._step = self._total = None
        return failed

    def _commit(self, results: list[JobResult]) -> None:
        """Publish finished results: only now do wait(), job() and status().jobs_finished see them, so
        hooks (which mark corrections trained) have already run when a caller sees a job as finished."""
        with self._cond:
            for res in results:
                self._jobs[res.job_id] = res
                self._finished += 1
            self._cond.notify_all()

    def _listen(self) -> None:
        import zmq

        while not self._closed:
            try:
                ready = self._events.poll(100)
            except zmq.ZMQError:
                return
            finished: list[JobResult] = []
            if ready:
                while True:
                    try:
                        msg = self._events.recv_json(flags=zmq.NOBLOCK)
                    except (zmq.Again, zmq.ZMQError):
                        break
                    done = self._handle(msg)
                    if done is not None:
                        finished.append(done)
            proc = self._proc
            if proc is not None and not proc.is_alive() and not self._stopping and self._ready:
                finished.extend(self._on_death(proc))
            for res in finished:
                self._run_hooks(res)
            self._commit(finished)

    def _on_death(self, proc: Any) -> list[JobResult]:
        with self._cond:
            self._ready = False
            reason = f"training worker (pid {proc.pid}) died with exit code {proc.exitcode}"
            self._worker_error = reason
            self._last_error = reason
            self._snapshots = []
            running = self._current
            failed = self._fail_pending("failed", reason)
            if self._version.settle():
                # Killed inside a step or rollback: some tensors hold new values, others old ones. The
                # version is made even again so the next worker's steps keep the odd = writing rule.
                self._last_error += (f"; it was writing weights (job {running or 'rollback'}): they are partly updated, "
                                     "reload the model from its checkpoint to be sure")
            elif running:
                self._last_error += f"; job {running} was running, between steps: weights are consistent"
            self._cond.notify_all()
        log.error(self._last_error)
        return failed

    def _handle(self, msg: dict) -> JobResult | None:
        kind = msg.get("type")
        with self._cond:
            try:
                if kind == "ready":
                    self._ready = True
                    self._worker_error = None
                    self._optimizer = msg.get("optimizer", "")
                    self._snapshots = []
                    if msg.get("warning"):
                        self._last_error = msg["warning"]
                elif kind == "fatal":
                    self._worker_error = msg.get("error", "unknown error")
                    self._last_error = f"training worker failed to start: {self._worker_error}"
                elif kind == "started":
                    job_id = msg["job_id"]
                    if job_id in self._queue:
                        self._queue.remove(job_id)
                    self._current, self._step, self._total, self._loss = job_id, 0, msg.get("total_steps"), None
                    res = self._jobs.get(job_id)
                    if res is not None:
                        res.state, res.started_at, res.total_steps = "running", msg.get("at"), msg.get("total_steps", 0)
                elif kind == "step":
                    step = msg["step"]
                    self._step, self._total = step["step"], msg.get("total_steps")
                    if step.get("loss") is not None:
                        self._loss = step["loss"]
                    if not step.get("applied") and step.get("reason"):
                        self._last_error = f"{msg['job_id']} step {step['step']} skipped: {step['reason']}"
                elif kind == "finished":
                    result = JobResult.model_validate(msg["result"])  # committed to _jobs after the hooks
                    if result.job_id in self._queue:
                        self._queue.remove(result.job_id)
                    if self._current == result.job_id:
                        self._current = self._step = self._total = None
                    self._snapshots = list(msg.get("snapshots", []))
                    if result.loss is not None:
                        self._loss = result.loss
                    if result.error:
                        self._last_error = f"{result.job_id}: {result.error}"
                    return result
                elif kind == "reload_done":
                    self._replies[msg["request_id"]] = msg
                    self._snapshots = list(msg.get("snapshots", []))
                elif kind == "rollback_done":
                    self._replies[msg["request_id"]] = msg
                    self._snapshots = list(msg.get("snapshots", []))
                    if msg.get("result"):
                        for job_id in msg["result"].get("undone_jobs", []):
                            if job_id in self._jobs:
                                self._jobs[job_id].rollback_available = False
                return None
            finally:
                self._cond.notify_all()

    def _run_hooks(self, result: JobResult) -> None:
        for hook in list(self.on_job_finished):
            try:
                hook(result)
            except Exception:  # noqa: BLE001: a hook must not take the listener down
                log.exception("on_job_finished hook %r failed", hook)
