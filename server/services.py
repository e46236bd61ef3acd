"""What the server owns for its whole life: model, readout, memory graph, training worker, scheduler.

Loaded once, before any transport starts, by the one process that serves; tools reach it through
the MCP lifespan context. The HTTP daemon is the only owner of the model, the worker and the graph,
so several agents share one model in memory and one single-writer graph.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from amygdala.engine.config import Config
from amygdala.engine.model import LoadedModel
from amygdala.engine.readout import ReadoutManager
from amygdala.memory_graph import MemoryGraph

from .limits import ServerLimits

log = logging.getLogger(__name__)


class ReadoutNotReady(RuntimeError):
    """The readout is still being built (first start on this model); the message says how long so far."""


@dataclass
class Services:
    config: Config
    lm: LoadedModel
    readout_manager: ReadoutManager | None  # None while a first-start build runs: use .readout
    graph: MemoryGraph
    limits: ServerLimits = field(default_factory=ServerLimits)
    trainer: Any | None = None  # training.client.TrainingClient (None: training disabled)
    scheduler: Any | None = None  # apscheduler BackgroundScheduler shared by sync and (later) the dream loop
    sync: Any | None = None  # training.checkpoint.schedule.SyncScheduler
    engine: Any | None = None  # server.engine_thread.EngineThread running all model work (None: worker threads)
    extras: dict[str, Any] = field(default_factory=dict)  # slots for later modules (dream loop, certificates)
    _closers: list[Callable[[], None]] = field(default_factory=list)

    _readout_started: float | None = None
    _readout_error: str | None = None

    @property
    def readout(self) -> ReadoutManager:
        """The emotion readout; raises ReadoutNotReady while a first-start build is running."""
        if self.readout_manager is None:
            raise ReadoutNotReady(self.readout_status())
        return self.readout_manager

    def readout_status(self) -> str:
        """'ready', or why the readout is not available yet (what the tools tell the agent)."""
        if self.readout_manager is not None:
            return "ready"
        if self._readout_error is not None:
            return (f"building the emotion readout failed: {self._readout_error}; fix it and restart, "
                    "or build it with `amygdala vectors train`")
        waited = 0 if self._readout_started is None else time.monotonic() - self._readout_started
        return (f"the emotion readout for {self.lm.name} is being built for the first time (running for "
                f"{waited / 60:.1f} min; a few minutes on 2 CPU cores); retry then. submit_correction "
                "and train_status already work.")

    @property
    def readout_ready(self) -> bool:
        return self.readout_manager is not None

    def on_close(self, fn: Callable[[], None], *, last: bool = False) -> None:
        """Register a shutdown step; steps run newest first, `last=True` ones after all others."""
        if last:
            self._closers.insert(0, fn)
        else:
            self._closers.append(fn)

    def close(self) -> None:
        """Clean shutdown, newest first: final checkpoint sync, worker stop, scheduler stop, graph close."""
        while self._closers:
            fn = self._closers.pop()
            try:
                fn()
            except Exception:  # shutdown must go on
                log.exception("error during shutdown")


def readout_exists(config: Config, lm: LoadedModel) -> bool:
    from amygdala.engine.readout import MANIFEST_FILE
    from amygdala.training.vectors.build import default_readout_dir

    return (default_readout_dir(config, lm) / MANIFEST_FILE).is_file()


def start_services(config: Config, echo: Callable[[str], None] = print, corpus_root: Any = None, **kwargs: Any) -> Services:
    """open_services on a dedicated engine thread that then runs every forward (see engine_thread).

    A missing readout is built on the engine thread after the server is up (first start on a
    model takes minutes): tools that need it answer with a clear "being built, retry" meanwhile.
    """
    from .engine_thread import EngineThread

    engine = EngineThread()
    try:
        services = engine.run(open_services, config, echo=echo, defer_readout=True, **kwargs)
    except BaseException:
        engine.close()
        raise
    services.engine = engine
    services.on_close(engine.close, last=True)
    if not services.readout_ready:
        services._readout_started = time.monotonic()
        engine.submit(build_readout_later, services, echo, corpus_root)
    return services


def build_readout_later(services: Services, echo: Callable[[str], None], corpus_root: Any = None) -> None:
    from amygdala.training.vectors.build import ensure_readout

    try:
        readout = ensure_readout(services.lm, services.config, echo=echo, corpus_root=corpus_root)
        readout.max_tokens = services.limits.max_text_tokens
        services.readout_manager = readout
        echo(f"amygdala: emotion readout ready ({len(readout.concepts)} concepts)")
    except Exception as exc:  # reported to every tool call that needs it
        log.exception("building the readout failed")
        services._readout_error = str(exc)


def open_services(config: Config, *, train: bool = True, limits: ServerLimits | None = None,
                  lm: LoadedModel | None = None, readout_path=None, echo: Callable[[str], None] = print,
                  train_settings: Any | None = None, sync_delay_s: float | None = None,
                  defer_readout: bool = False) -> Services:
    """Load everything once. With train=False no worker or scheduler is started (read-only server).

    With defer_readout, a readout that does not exist yet is not built here: the caller builds it
    later (`build_readout_later`) so the server can answer clients while it trains.
    """
    from amygdala.engine.model import load_model, resolve_model_path
    from amygdala.training.checkpoint.sync import recover
    from amygdala.training.vectors.build import ensure_readout

    if lm is None:
        # A sync killed mid-write leaves a journal: replay it before the weights are mapped, or the
        # server would serve the half-old file.
        rep = recover(resolve_model_path(config, echo=echo))
        if rep.status != "clean":
            echo(f"amygdala: checkpoint journal {rep.status} before loading the model")
        lm = load_model(config, echo=echo)
    limits = limits or ServerLimits(max_text_tokens=config.max_tokens)
    readout = None
    if not defer_readout or readout_path is not None or readout_exists(config, lm):
        readout = ensure_readout(lm, config, readout_path, echo=echo)
        readout.max_tokens = limits.max_text_tokens
    graph = MemoryGraph(config.memory_dir)
    services = Services(config=config, lm=lm, readout_manager=readout, graph=graph, limits=limits)
    services.on_close(graph.close)
    if train:
        _start_training(services, train_settings, sync_delay_s, echo)
    return services


def _start_training(services: Services, settings: Any | None, sync_delay_s: float | None,
                    echo: Callable[[str], None]) -> None:
    from apscheduler.schedulers.background import BackgroundScheduler

    from amygdala.training.checkpoint.sync import CheckpointSyncer
    from amygdala.training.client import TrainingClient
    from amygdala.training.checkpoint.schedule import SYNC_DELAY_S, SyncScheduler

    scheduler = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 3600})
    scheduler.start()
    services.scheduler = scheduler
    services.on_close(lambda: scheduler.shutdown(wait=True))  # closers run newest first: this one last
    trainer = TrainingClient(services.lm, services.config, settings)
    services.trainer = trainer
    trainer.on_job_finished.append(lambda result: services.lm.invalidate_weights_hash() if result.steps_applied > 0 else None)
    if services.lm.path is not None:
        syncer = CheckpointSyncer(services.lm.path, services.lm.model, lock=services.lm.lock,
                                  weights_version=lambda: trainer.weights_version)
        sync = SyncScheduler(scheduler, syncer.sync, delay_s=SYNC_DELAY_S if sync_delay_s is None else sync_delay_s)
        services.sync = sync
        trainer.on_job_finished.append(lambda result: sync.notify_training_finished() if result.steps_applied > 0 else None)
        services.on_close(sync.shutdown)  # final sync on clean shutdown, after the worker has stopped
    else:
        echo("amygdala: model has no directory on disk; checkpoint sync disabled")
    services.on_close(trainer.close)
