"""One dream cycle without the daemon (`amygdala dream --once`): load, train, and never leave weights in memory only.

The daemon owns a home for its whole life (`daemon.lock`); a standalone cycle takes the same lock
for its run, so it never trains next to a daemon (two workers on one checkpoint would overwrite
each other). It then does what the daemon would have set up: replays an interrupted checkpoint
sync, loads the model, opens the graph, returns corrections whose job died with an earlier process
to pending, starts a training worker on the loaded weights and a checkpoint syncer on the model
directory, installs the shipped invariants into a graph that never had them, and runs one
`DreamLoop.run_cycle`.

The rule that makes this safe to run from cron: the process never exits with trained weights only
in memory. The loop syncs a kept cycle itself; on every other way out (an error, Ctrl-C, SIGTERM,
a failed rollback) `finally` compares the live weights with those the cycle started from and syncs
if they differ. A cycle that was rolled back has nothing to sync (its weights equal the start).
Only SIGKILL skips this, and then the trained weights die with the process and its worker: the
checkpoint on disk is as it was before the cycle (a sync is atomic, see training/checkpoint).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from amygdala.engine.config import Config
from amygdala.home import HomeBusy

from .corrections import CorrectionLifecycle
from .errors import DreamError
from .invariants import install_shipped
from .loop import CycleReport, DreamDeps, DreamLoop, DreamSettings, ProgressFn

log = logging.getLogger(__name__)

Echo = Callable[[str], None]


class DaemonOwnsHome(DreamError):
    """A daemon (or another standalone cycle) owns the home; the message names it."""


def run_standalone(config: Config, settings: DreamSettings | None = None, *, dry_run: bool = False,
                   seed: int | None = None, budget_steps: int | None = None, budget_minutes: float | None = None,
                   train_settings: Any = None, echo: Echo = print, on_progress: ProgressFn | None = None,
                   cancel: threading.Event | None = None, handle_signals: bool = True) -> CycleReport:
    """Run one cycle on `config`'s home and model; the checkpoint holds whatever the cycle kept when this returns."""
    from amygdala.engine.model import load_model, resolve_model_path
    from amygdala.memory_graph import MemoryGraph
    from amygdala.training.checkpoint.sync import CheckpointSyncer, recover

    lock = config.home_lock()
    try:
        lock.acquire("amygdala dream --once")
    except HomeBusy as exc:
        raise DaemonOwnsHome(f"{exc}. With a daemon running, start a cycle through it (the run_dream_now tool) "
                             "instead of `amygdala dream --once`") from None
    cancel = cancel or threading.Event()
    restore = _install_signals(cancel) if handle_signals else None
    client = syncer = graph = lm = None
    start_hash: str | None = None
    try:
        model_dir = resolve_model_path(config, echo=echo)
        rep = recover(model_dir)
        if rep.status != "clean":
            echo(f"amygdala dream: checkpoint journal {rep.status} before loading the model")
        lm = load_model(config, echo=echo)
        graph = MemoryGraph(config.memory_dir)
        installed = install_shipped(graph)  # idempotent; never re-adds one an operator removed
        if installed:
            echo(f"amygdala dream: installed the shipped invariants {', '.join(installed)}")
        lifecycle = CorrectionLifecycle(graph, lm.tokenizer)
        returned = lifecycle.reconcile()  # no worker survives its process: a queued correction's job is gone
        if returned:
            echo(f"amygdala dream: {len(returned)} correction(s) left queued by a stopped process are pending again")
        if not dry_run:
            from amygdala.training.client import TrainingClient
            from amygdala.training.schemas import TrainSettings

            # The serving side is idle while the worker trains: let the worker use every core.
            ts = train_settings or TrainSettings(threads=config.threads or os.cpu_count() or 1)
            client = TrainingClient(lm, config, ts)
            syncer = CheckpointSyncer(lm.path, lm.model, lock=lm.lock,
                                      weights_version=lambda: client.weights_version) if lm.path is not None else None
        start_hash = lm.weights_hash(refresh=True)
        readout_fn = _readout_provider(lm, config, echo)
        deps = DreamDeps(lm=lm, graph=graph, lifecycle=lifecycle, trainer=client, readout=readout_fn, syncer=syncer,
                         on_progress=on_progress, runner="standalone")
        loop = DreamLoop(deps, settings)
        return loop.run_cycle(dry_run=dry_run, seed=seed, budget_steps=budget_steps, budget_minutes=budget_minutes,
                              cancel=cancel)
    finally:
        try:
            if client is not None:
                client.close()  # stops between steps: whatever is in memory now is complete steps
            if lm is not None and start_hash is not None and syncer is not None:
                lm.invalidate_weights_hash()
                if lm.weights_hash(refresh=True) != start_hash:
                    report = syncer.sync()  # a no-op write when the loop synced a kept cycle already
                    log.info("final checkpoint sync: %s", report.summary())
        finally:
            if graph is not None:
                graph.close()
            lock.release()
            if restore is not None:
                restore()


def _readout_provider(lm: Any, config: Config, echo: Echo) -> Callable[[], Any]:
    """Load (or build once) the emotion readout the first time a readout judge asks for it."""
    cache: list[Any] = []

    def get() -> Any:
        if not cache:
            from amygdala.training.vectors.build import ensure_readout

            cache.append(ensure_readout(lm, config, echo=echo))
        return cache[0]

    return get


def _install_signals(cancel: threading.Event) -> Callable[[], None] | None:
    """First SIGINT/SIGTERM cancels the cycle (it rolls back and records); a second one stops at once."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()
        log.warning("signal %d: cancelling the dream cycle (again to stop now; weights are synced or rolled back)",
                    signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for s, h in old.items():
            signal.signal(s, h)

    return restore
