"""When to sync: 10 minutes after the last training job (debounced), on demand, and at clean shutdown.

The serving process owns one APScheduler BackgroundScheduler (the dream loop will share it). The
debounce is one date-triggered job under a fixed id, re-added with replace_existing=True by every
"training finished" notification, so a burst of jobs yields one sync `delay_s` after the last.
The job lives in its own MemoryJobStore: it syncs this process's live weights, which do not survive
a restart, and the bound method it calls could not be pickled into a persistent store anyway.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

from apscheduler.jobstores.base import JobLookupError
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.schedulers.base import BaseScheduler

log = logging.getLogger(__name__)

SYNC_DELAY_S = 600.0
JOB_ID = "amygdala-checkpoint-sync"
JOBSTORE = "amygdala-sync"


class SyncScheduler:
    """Debounced, serialised checkpoint syncs on a shared APScheduler.

    `sync_fn` performs one sync and returns its report (e.g. `CheckpointSyncer(...).sync`). Only one
    sync runs at a time, whatever triggered it. With `syncer` (the CheckpointSyncer behind sync_fn),
    `undo_to`, `undo_last` and `sync_points` reach its undo log, serialised with the syncs.
    """

    def __init__(self, scheduler: BaseScheduler, sync_fn: Callable[[], Any], delay_s: float = SYNC_DELAY_S,
                 job_id: str = JOB_ID, syncer: Any = None):
        if delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, got {delay_s}")
        self.scheduler = scheduler
        self.sync_fn = sync_fn
        self.delay_s = delay_s
        self.job_id = job_id
        self.syncer = syncer
        self.last_report: Any = None
        self.last_error: str | None = None
        self._run_lock = threading.Lock()
        self._closed = False
        try:
            scheduler.add_jobstore(MemoryJobStore(), alias=JOBSTORE)
        except ValueError:
            pass  # another SyncScheduler on this scheduler added it already

    @property
    def next_run_time(self) -> datetime | None:
        """When the pending debounced sync will run, or None."""
        job = self.scheduler.get_job(self.job_id, jobstore=JOBSTORE)
        return getattr(job, "next_run_time", None) if job else None

    def notify_training_finished(self, _result: object = None) -> datetime | None:
        """(Re)arm the sync for `delay_s` from now; returns the planned time (None after shutdown).

        Takes (and ignores) one argument so it can be registered directly as a job-finished hook.
        """
        if self._closed:
            log.info("training finished after sync shutdown; the shutdown sync covered it or the next start will")
            return None
        run_at = datetime.now(timezone.utc) + timedelta(seconds=self.delay_s)
        self.scheduler.add_job(self._scheduled, trigger="date", run_date=run_at, id=self.job_id, jobstore=JOBSTORE,
                               name="checkpoint sync", replace_existing=True, coalesce=True, max_instances=1,
                               misfire_grace_time=None)  # a late sync is still wanted: never skip it
        return run_at

    def _cancel_pending(self) -> None:
        try:
            self.scheduler.remove_job(self.job_id, jobstore=JOBSTORE)
        except JobLookupError:
            pass

    def _run(self) -> Any:
        with self._run_lock:
            try:
                report = self.sync_fn()
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                raise
            self.last_report, self.last_error = report, None
            return report

    def _scheduled(self) -> None:
        try:
            self._run()
        except Exception:
            log.exception("scheduled checkpoint sync failed; the next training job or POST /checkpoint retries")

    def sync_now(self) -> Any:
        """Sync immediately (POST /checkpoint) and return the report; errors propagate to the caller.

        The pending debounced sync is cancelled first: this sync covers every weight change so far,
        and a job finishing meanwhile re-arms it.
        """
        self._cancel_pending()
        return self._run()

    def shutdown(self) -> Any:
        """Final sync on clean shutdown; later notifications are ignored. Does not stop the scheduler."""
        self._closed = True
        self._cancel_pending()
        return self._run()

    # -- undo log (the dream loop rolls back a regression that was already synced) ----------------
    def _need_syncer(self) -> Any:
        if self.syncer is None:
            raise RuntimeError("this SyncScheduler was built without its CheckpointSyncer (syncer=...); no undo log")
        return self.syncer

    def undo_to(self, sync_id: int | None) -> Any:
        """Checkpoint and live weights back to sync point `sync_id` (None: before the newest kept sync)."""
        syncer = self._need_syncer()
        with self._run_lock:
            self._cancel_pending()  # the live weights will equal the files: nothing left to sync
            return syncer.undo_to(sync_id)

    def undo_last(self) -> Any:
        return self.undo_to(None)

    def sync_points(self) -> Any:
        return self._need_syncer().sync_points()
