"""The composition root: what the serving process owns for its whole life, typed, built in one place.

Model, readout, memory graph, scheduler, correction lifecycle, and (when training is on) the
training worker's client and the checkpoint sync. Loaded once, before any transport starts, by the
one process that serves; tools reach it through the MCP lifespan context. The HTTP daemon is the
only owner of the model, the worker and the graph, so several agents share one model in memory and
one single-writer graph. Packages below (dream, training, engine) receive what they need from here
explicitly and never import this module.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import time as dt_time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from apscheduler.schedulers.background import BackgroundScheduler

from amygdala.dream.corrections import CorrectionLifecycle
from amygdala.dream.runner import DreamRunner
from amygdala.dream.scheduler import DEFAULT_DREAM_AT, DreamScheduler, owns_home
from amygdala.engine.config import Config
from amygdala.engine.model import LoadedModel
from amygdala.engine.readout import ReadoutManager
from amygdala.memory_graph import MemoryGraph

from .engine_thread import EngineThread
from .limits import ServerLimits

if TYPE_CHECKING:  # heavy or process-spawning modules: imported when training is switched on
    from amygdala.dream.loop import DreamSettings
    from amygdala.engine.drift import DriftMonitor
    from amygdala.training.checkpoint.schedule import SyncScheduler
    from amygdala.training.client import TrainingClient
    from amygdala.training.schemas import TrainSettings

log = logging.getLogger(__name__)

Echo = Callable[[str], None]


class ReadoutNotReady(RuntimeError):
    """The readout is still being built (first start on this model); the message says how long so far."""


def new_scheduler() -> BackgroundScheduler:
    """An in-memory scheduler, not yet started (Services built by hand, e.g. in tests).

    The serving process's scheduler is its DreamScheduler's (dream/scheduler.py: persistent nightly
    dream and re-certification, the checkpoint sync's own memory store); the same job defaults.
    """
    from amygdala.dream.scheduler import new_scheduler as dream_new_scheduler

    return dream_new_scheduler()


@dataclass(frozen=True)
class ConceptMeta:
    name: str
    family: str
    valence: float
    arousal: float
    note: str


@dataclass
class Services:
    config: Config
    lm: LoadedModel
    graph: MemoryGraph
    readout_manager: ReadoutManager | None  # None while a first-start build runs: use .readout
    limits: ServerLimits = field(default_factory=ServerLimits)
    scheduler: BackgroundScheduler = field(default_factory=new_scheduler)
    corrections: CorrectionLifecycle = field(init=False)
    trainer: TrainingClient | None = None  # None: training disabled (--no-train)
    sync: SyncScheduler | None = None  # None: no training, or the model has no directory on disk
    engine: EngineThread | None = None  # the thread running all model work (None: worker threads)
    dream: DreamRunner | None = None  # None: no training worker, so no dream cycles
    dream_scheduler: DreamScheduler | None = None  # owns `scheduler` in a serving process
    _closers: list[Callable[[], None]] = field(default_factory=list, repr=False)
    _readout_started: float | None = None
    _readout_error: str | None = None
    _concepts: list[ConceptMeta] | None = field(default=None, repr=False)
    _drift: DriftMonitor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.corrections = CorrectionLifecycle(self.graph, self.lm.tokenizer)
        if self.trainer is not None:
            self.attach_trainer(self.trainer)

    # -- readout ----------------------------------------------------------------------------------
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

    def readout_drift(self) -> str | None:
        """How far the served weights drifted from the readout's (None: not at all, or unknown).

        Runs a small forward (the readout's probe texts) once per weights version: call it on the
        engine thread.
        """
        if self.readout_manager is None:
            return None
        if self._drift is None or self._drift.readout is not self.readout_manager:
            from amygdala.engine.drift import DriftMonitor

            self._drift = DriftMonitor(self.readout_manager,
                                       lambda: self.trainer.weights_version if self.trainer is not None else 0)
        return self._drift.note()

    def concept_meta(self) -> list[ConceptMeta]:
        """Readout concepts with the corpus manifest's metadata (computed once per server)."""
        if self._concepts is None:
            from amygdala.corpus import load_manifest

            meta = load_manifest().by_id
            out = []
            for c, fam in zip(self.readout.concepts, self.readout.manifest.families):
                e = meta.get(c)
                out.append(ConceptMeta(name=e.name if e else c, family=fam, valence=e.valence if e else 0.0,
                                       arousal=e.arousal if e else 0.0, note=e.note if e else ""))
            self._concepts = out
        return self._concepts

    # -- training ---------------------------------------------------------------------------------
    def attach_trainer(self, trainer: TrainingClient) -> None:
        """Serve with this training worker: jobs change the weights hash and move corrections along."""
        self.trainer = trainer
        trainer.on_job_finished.append(
            lambda result: self.lm.invalidate_weights_hash() if result.steps_applied > 0 else None)
        self.corrections.attach(trainer)

    # -- lifetime ---------------------------------------------------------------------------------
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


def start_services(config: Config, *, train: bool = True, readout_path: Path | None = None,
                   train_settings: TrainSettings | None = None, sync_delay_s: float | None = None,
                   limits: ServerLimits | None = None, echo: Echo = print,
                   corpus_root: Path | None = None, dream_at: dt_time | None = DEFAULT_DREAM_AT) -> Services:
    """open_services on a dedicated engine thread that then runs every forward (see engine_thread).

    A missing readout is built on the engine thread after the server is up (first start on a
    model takes minutes): tools that need it answer with a clear "being built, retry" meanwhile.
    """
    engine = EngineThread()
    try:
        services = engine.run(open_services, config, train=train, readout_path=readout_path,
                              train_settings=train_settings, sync_delay_s=sync_delay_s, limits=limits, echo=echo,
                              defer_readout=True, dream_at=dream_at)
    except BaseException:
        engine.close()
        raise
    services.engine = engine
    services.on_close(engine.close, last=True)
    if not services.readout_ready:
        services._readout_started = time.monotonic()
        engine.submit(build_readout_later, services, echo, corpus_root)
    return services


def build_readout_later(services: Services, echo: Echo, corpus_root: Path | None = None) -> None:
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
                  lm: LoadedModel | None = None, readout_path: Path | None = None, echo: Echo = print,
                  train_settings: TrainSettings | None = None, sync_delay_s: float | None = None,
                  defer_readout: bool = False, dream_at: dt_time | None = DEFAULT_DREAM_AT) -> Services:
    """Load everything once. With train=False no worker or checkpoint sync is started (read-only model).

    The scheduler is persistent (nightly dream at `dream_at`, None: none) only in the process that
    holds the home lock; any other gets an in-memory one and no nightly job.

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
    owner = owns_home(config.home)
    dream_sched = DreamScheduler(config.home, config.scheduler_db if owner else None,
                                 dream_at=dream_at if owner else None, require_owner=False)
    services = Services(config=config, lm=lm, readout_manager=readout, graph=graph, limits=limits,
                        scheduler=dream_sched.scheduler, dream_scheduler=dream_sched)
    services.on_close(graph.close)
    services.on_close(lambda: dream_sched.shutdown(wait=True))  # closers run newest first: after the sync
    if train:
        _start_training(services, train_settings, sync_delay_s, echo)
    else:
        returned = services.corrections.reconcile()  # nothing will finish jobs queued by an earlier daemon
        if returned:
            echo(f"amygdala: {len(returned)} correction(s) left queued by a stopped daemon are pending again")
    start_dream(services, shipped=True, echo=echo)
    return services


def start_dream(services: Services, settings: DreamSettings | None = None, *, shipped: bool = False,
                echo: Echo = print) -> DreamRunner | None:
    """The dream runner (when training is on) and the start of the scheduler that serves it.

    Called once the trainer and the checkpoint sync exist. The runner is closed before the
    trainer (closers run newest first): a cycle cancelled at shutdown still has the worker to roll
    back with. Without a DreamScheduler (Services built by hand) a memory one is made. With
    `shipped`, the shipped invariants (listen, push-back) are installed first, as `amygdala dream
    --once` does (idempotent; one an operator removed stays removed).
    """
    from amygdala.dream.daemon import DaemonSyncer, last_recorded_cycle, loop_cycle_fn, recertify_fn
    from amygdala.dream.loop import DreamDeps

    if services.dream_scheduler is None:
        services.dream_scheduler = DreamScheduler(services.config.home, None, dream_at=None)
        services.scheduler = services.dream_scheduler.scheduler
        services.on_close(lambda: services.dream_scheduler.shutdown(wait=True) if services.dream_scheduler else None)
    runner = None
    if services.trainer is not None:
        if shipped:
            from amygdala.dream.invariants import install_shipped

            installed = install_shipped(services.graph)
            if installed:
                echo(f"amygdala: installed the shipped invariants {', '.join(installed)}")

        def make_deps(on_progress):
            return DreamDeps(lm=services.lm, graph=services.graph, lifecycle=services.corrections,
                             trainer=services.trainer, readout=lambda: services.readout_manager,
                             syncer=DaemonSyncer(services.sync) if services.sync is not None else None,
                             sync_after_rollback=True, on_progress=on_progress, runner="daemon")

        def recertify(cycle_id, progress):
            from amygdala.dream.daemon import certify_after_cycle

            return certify_after_cycle(services.graph, services.config, services.lm, services.readout_manager,
                                       cycle_id, progress)

        runner = DreamRunner(loop_cycle_fn(make_deps, settings), recertify=recertify_fn(recertify),
                             history=lambda: last_recorded_cycle(services.graph))
        services.dream = runner
        services.on_close(lambda: runner.close(timeout=60) or log.warning("the dream cycle did not stop in time"))
    services.dream_scheduler.start(runner)
    return runner


def _start_training(services: Services, settings: TrainSettings | None, sync_delay_s: float | None,
                    echo: Echo) -> None:
    from amygdala.training.checkpoint.schedule import SYNC_DELAY_S, SyncScheduler
    from amygdala.training.checkpoint.sync import CheckpointSyncer
    from amygdala.training.client import TrainingClient

    trainer = TrainingClient(services.lm, services.config, settings)
    try:
        if services.lm.path is not None:
            syncer = CheckpointSyncer(services.lm.path, services.lm.model, lock=services.lm.lock,
                                      weights_version=lambda: trainer.weights_version,
                                      changed_since=trainer.changed_since, reload=trainer.reload_from_checkpoint)
            sync = SyncScheduler(services.scheduler, syncer.sync, syncer=syncer,
                                 delay_s=SYNC_DELAY_S if sync_delay_s is None else sync_delay_s)
            services.sync = sync
            trainer.on_job_finished.append(
                lambda result: sync.notify_training_finished() if result.steps_applied > 0 else None)
            services.on_close(sync.shutdown)  # registered before trainer.close, so it runs after the worker stopped
        else:
            echo("amygdala: model has no directory on disk; checkpoint sync disabled")
    except BaseException:
        trainer.close()
        raise
    services.on_close(trainer.close)
    services.attach_trainer(trainer)
