"""The training worker: a long-lived process that owns the optimizer and updates the served weights in place.

Why a process and not a thread: a training step holds the GIL for long stretches of Python (autograd,
optimizer bookkeeping) and competes for the same cores; in a separate process the serving process's
event loop and readouts keep their own interpreter. Why shared weights and not a copy: the served
model's parameters are moved to shared memory (`Module.share_memory()`, done by the client before
it starts the worker) and the model object is handed to the worker through torch.multiprocessing's
spawn pickler, which maps the *same* storage instead of copying it. The worker's in-place optimizer
updates are therefore what the server's next forward pass reads: no reload, no second copy of 1 GB.

HOGWILD, and what a reader can see. Training never takes the serving process's `lm.lock` (it could
not: that lock lives in another process) and readouts keep running during a job. A forward pass in
the server that overlaps an optimizer step can see, for each weight tensor, either its pre-step or
post-step value, or (while that tensor's single in-place `add_` runs) a mix of both elementwise:
every float is one or the other, never a torn value (aligned 4-byte stores). Since one step moves a
weight by about lr (1e-5) relative, such a forward is as if a slightly different step size had been
applied to some layers; readouts do not need to care. Forwards that run between steps see one
consistent set of weights. Code that needs to know can read the weights version, a seqlock counter
in shared memory: odd while a step (or a rollback) writes weights, even otherwise; if it is even and
unchanged across a forward, that forward saw consistent weights.

Dirty stamps: next to the version, a shared int64 per model parameter holds the (odd) weights
version of the last write to it. A step stamps the tensors it is about to change inside its guard,
before writing, so even a worker killed mid-step leaves them marked. Checkpoint sync reads the
stamps (`changed_since(v)`: tensors written after version v) and compares only those.

The worker never outlives its parent: at start it asks Linux for SIGKILL when the parent dies
(prctl PR_SET_PDEATHSIG), and a watchdog thread exits the process if its parent pid changes (the
fallback elsewhere, and for the instant before prctl took effect). An orphan would otherwise
finish its job against weights nobody serves and then save optimizer state over a newer worker's.
PR_SET_PDEATHSIG fires when the parent *thread* that started the worker exits, so the client
starts workers from one long-lived thread of its own, never from a short-lived request thread.

Jobs travel over ZeroMQ: the client binds a PUSH socket (commands) and a PULL socket (events) on
ipc:// endpoints in a private temporary directory; the worker connects both. Commands: job,
rollback, reload, stop. Events: ready, fatal, started, step, finished, rollback_done, reload_done.
All messages are JSON.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

EVENT_POLL_MS = 200
WATCHDOG_S = 0.5
PR_SET_PDEATHSIG = 1


class WeightsVersion:
    """Seqlock counter over a shared int64: odd while weights are being written."""

    def __init__(self, value: Any) -> None:  # a multiprocessing Value('q', lock=False)
        self._value = value

    @property
    def value(self) -> int:
        return int(self._value.value)

    @property
    def writing_now(self) -> bool:
        return self.value % 2 == 1

    @property
    def shared(self) -> Any:
        """The underlying shared value, to hand to the worker process."""
        return self._value

    def settle(self) -> bool:
        """After the writer died: make the counter even again. True if it died mid-write (weights torn)."""
        if self.writing_now:
            self._value.value += 1
            return True
        return False

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        self._value.value += 1
        try:
            yield
        finally:
            self._value.value += 1


class DirtyStamps:
    """Per-parameter 'last written at weights version' stamps over a shared int64 array.

    `names` is the model's `named_parameters()` order, the same in the serving process and in the
    worker (it receives a pickled copy of the same module). Unknown names are ignored.
    """

    def __init__(self, names: list[str], array: Any) -> None:  # a multiprocessing Array('q', len(names), lock=False)
        if len(array) != len(names):
            raise ValueError(f"{len(array)} stamps for {len(names)} parameters")
        self.names = list(names)
        self._array = array
        self._index = {n: i for i, n in enumerate(self.names)}

    @property
    def shared(self) -> Any:
        return self._array

    def mark(self, names: Iterable[str], version: int) -> None:
        for n in names:
            i = self._index.get(n)
            if i is not None:
                self._array[i] = version

    def changed_since(self, version: int) -> list[str]:
        """Parameters written by a step (or rollback, or reload) whose version is above `version`."""
        return [n for n, v in zip(self.names, self._array[:]) if v > version]


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies (Linux), and a watchdog thread that exits if it has died already."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
                logging.getLogger(__name__).warning("prctl(PR_SET_PDEATHSIG) failed (errno %d); relying on the "
                                                    "parent-pid watchdog", ctypes.get_errno())
        except (OSError, AttributeError):
            logging.getLogger(__name__).warning("no prctl here; relying on the parent-pid watchdog")

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                logging.getLogger(__name__).error("the serving process (pid %d) is gone: training worker exiting "
                                                  "without saving anything", parent_pid)
                os._exit(3)  # no cleanup: nothing of an orphan's may reach the disk
            time.sleep(WATCHDOG_S)

    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(3)
    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _emit(sock: Any, message: dict) -> None:
    import zmq

    try:
        sock.send_json(message, flags=zmq.NOBLOCK)
    except zmq.Again:  # the client is gone or not reading: nothing useful to do with the event
        logging.getLogger(__name__).warning("dropped worker event %s", message.get("type"))


def worker_main(model: Any, boot: dict, version_value: Any, stop_event: Any, stamps_array: Any = None) -> None:
    """Entry point of the spawned worker process (picklable by name)."""
    die_with_parent(boot["parent_pid"])
    import torch
    import zmq

    from .schemas import JobRejected, TrainJob, TrainSettings
    from .trainer import ContextFrozenTrainer

    logging.basicConfig(level=boot.get("log_level", "WARNING"), format="%(levelname)s training-worker: %(message)s")
    log = logging.getLogger("amygdala.training.worker")
    settings = TrainSettings.model_validate(boot["settings"])
    torch.set_num_threads(settings.threads or max(1, (os.cpu_count() or 2) // 2))
    parent = boot["parent_pid"]

    ctx = zmq.Context()
    commands = ctx.socket(zmq.PULL)
    commands.connect(boot["commands_endpoint"])
    events = ctx.socket(zmq.PUSH)
    events.setsockopt(zmq.LINGER, 2000)
    events.connect(boot["events_endpoint"])
    version = WeightsVersion(version_value)
    stamps = DirtyStamps([n for n, _ in model.named_parameters()], stamps_array) if stamps_array is not None else None
    try:
        try:
            model.eval()
            trainer = ContextFrozenTrainer(model, settings, model_name=boot["model_name"],
                                           state_root=Path(boot["state_root"]) if boot.get("state_root") else None,
                                           apply_guard=version.writing,
                                           mark_changed=(lambda names: stamps.mark(names, version.value)) if stamps else None)
            trainer.load_state()
        except Exception as exc:  # noqa: BLE001: reported to the client, which keeps serving
            log.exception("worker failed to start")
            _emit(events, {"type": "fatal", "error": f"{type(exc).__name__}: {exc}"})
            return
        _emit(events, {"type": "ready", "pid": os.getpid(), "resumed": trainer.resumed, "jobs_trained": trainer.jobs_trained,
                       "optimizer": describe(trainer), "warning": trainer.state_warning})
        while not stop_event.is_set() and os.getppid() == parent:
            if not commands.poll(EVENT_POLL_MS):
                continue
            msg = commands.recv_json()
            kind = msg.get("type")
            if kind == "stop":
                break
            if kind == "job":
                job_id = msg["job_id"]
                job = TrainJob.model_validate(msg["job"])
                _emit(events, {"type": "started", "job_id": job_id, "total_steps": trainer.total_steps(job), "at": time.time()})

                def on_step(report: Any, total: int, job_id: str = job_id) -> None:
                    _emit(events, {"type": "step", "job_id": job_id, "step": report.model_dump(), "total_steps": total})

                result = trainer.run(job, job_id, on_step=on_step, should_stop=stop_event.is_set)
                result.submitted_at = msg.get("submitted_at")
                _emit(events, {"type": "finished", "result": result.model_dump(), "snapshots": list(trainer.snapshots)})
            elif kind == "rollback":
                reply: dict = {"type": "rollback_done", "request_id": msg["request_id"]}
                try:
                    res = trainer.rollback(msg["job_id"])
                    res.weights_version = version.value
                    reply["result"] = res.model_dump()
                except JobRejected as exc:
                    reply["error"] = str(exc)
                except Exception as exc:  # noqa: BLE001
                    log.exception("rollback failed")
                    reply["error"] = f"{type(exc).__name__}: {exc}"
                reply["snapshots"] = list(trainer.snapshots)
                _emit(events, reply)
            elif kind == "reload":
                reply = {"type": "reload_done", "request_id": msg["request_id"]}
                try:
                    reply["copied"] = trainer.reload_from(Path(msg["model_dir"]), list(msg.get("names", [])))
                    reply["weights_version"] = version.value
                except Exception as exc:  # reported to the caller
                    log.exception("reload from the checkpoint failed")
                    reply["error"] = f"{type(exc).__name__}: {exc}"
                reply["snapshots"] = list(trainer.snapshots)
                _emit(events, reply)
            else:
                log.warning("unknown command %r ignored", kind)
    finally:
        commands.close(linger=0)
        events.close()
        ctx.term()


def describe(trainer: Any) -> str:
    s = trainer.settings
    kind = {"apollo": f"APOLLO rank {s.rank}", "apollo-mini": "APOLLO-Mini (rank 1)", "adamw": "AdamW"}[s.optimizer]
    n = sum(p.numel() for _, p in trainer.named)
    return f"{kind}, {len(trainer.named)} tensors / {n / 1e6:.1f}M parameters trained, lr {s.lr:g}"
