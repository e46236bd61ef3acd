"""The daemon's one scheduler: the nightly dream, re-certification after it, and the checkpoint sync.

One APScheduler 3.11 `BackgroundScheduler`, owned by the process that holds the home lock (the
daemon, `amygdala/home.py`): two schedulers on one job store would each run the nightly job, which
is exactly the double training the lock exists to prevent. It has two kinds of job store:

- `default`: a persistent `SQLAlchemyJobStore` (SQLite at `Config.scheduler_db`) for the jobs that
  must outlive a restart: the nightly dream (cron, default 03:00 local time) and the re-certification
  queued after a cycle that kept trained weights. A daemon restarted at 03:20 still dreams at 03:20.
- `amygdala-sync`: an in-memory store the checkpoint sync adds for itself
  (`training/checkpoint/schedule.py`): it syncs this process's live weights, so a sync pending at a
  kill has nothing to do after a restart (the next training job re-arms it).

The rules for the persistent jobs, each for a reason:
- explicit ids and `replace_existing=True`: a restart updates the job instead of adding another;
- `coalesce=True`: a daemon down for three nights dreams once on restart, not three times;
- `max_instances=1`, and the runner's own gate: never two cycles at once;
- `misfire_grace_time` of 6 hours: APScheduler's default of one second silently skips a nightly run
  whose time passed while the daemon was restarting or busy; six hours still dreams after a
  morning restart but not in the middle of the next day's work.
- job functions are module-level and take only the home's path: they find the live runner in
  `REGISTRY`, so the pickled job never holds a live object (a model, a thread, a lock).
- a restart keeps the stored nightly job as it is when its schedule did not change, so a run
  missed while the daemon was down is still due (re-adding it would compute a fresh next run time
  and silently drop the missed one).

"Run now" does not go through the job store: the caller (a tool, the HTTP API, the CLI) must get
the cycle id or the refusal in its answer, and a "now" that survived a restart would not mean now.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from datetime import datetime, time, timedelta, timezone
from pathlib import Path
from typing import Any

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger

from .errors import DreamError
from .runner import Activity, CycleSummary, DreamRequest, DreamRunner

log = logging.getLogger(__name__)

NIGHTLY_JOB_ID = "amygdala-dream-nightly"
RECERTIFY_JOB_ID = "amygdala-recertify"
MISFIRE_GRACE_S = 6 * 3600
RECERTIFY_FALLBACK_S = 3600  # the stored re-certification job: only a daemon that died before it ran needs it
DEFAULT_DREAM_AT = time(3, 0)
PERSISTENT = "default"

# home (resolved path, as str) -> the live runner of the daemon owning that home. Job functions look
# their runner up here: the job store pickles only the key.
REGISTRY: dict[str, DreamRunner] = {}


def home_key(home: Path | str) -> str:
    return str(Path(home).expanduser().resolve())


def parse_dream_at(text: str) -> time:
    """'HH:MM' (24-hour, local time) -> time; the error says the format."""
    m = re.fullmatch(r"\s*(\d{1,2}):(\d{2})\s*", text or "")
    if not m or int(m.group(1)) > 23 or int(m.group(2)) > 59:
        raise DreamError(f"--dream-at: {text!r} is not a time of day; write HH:MM in 24-hour local time, e.g. 03:00 "
                         "(or pass --no-dream to switch the nightly dream off)")
    return time(int(m.group(1)), int(m.group(2)))


def job_defaults(misfire_grace_s: int = MISFIRE_GRACE_S) -> dict[str, Any]:
    return {"coalesce": True, "max_instances": 1, "misfire_grace_time": misfire_grace_s}


def new_scheduler(db_path: Path | None = None, *, misfire_grace_s: int = MISFIRE_GRACE_S,
                  tz: Any = None) -> BackgroundScheduler:
    """A BackgroundScheduler, not started: persistent default store at `db_path`, or in memory when None."""
    jobstores: dict[str, Any] = {}
    if db_path is not None:
        from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore

        Path(db_path).parent.mkdir(parents=True, exist_ok=True)
        jobstores[PERSISTENT] = SQLAlchemyJobStore(url=f"sqlite:///{db_path}")
    kwargs: dict[str, Any] = {"jobstores": jobstores, "job_defaults": job_defaults(misfire_grace_s)}
    if tz is not None:
        kwargs["timezone"] = tz
    return BackgroundScheduler(**kwargs)


def owns_home(home: Path) -> bool:
    """Whether this process holds the home lock (so may run the home's persistent jobs)."""
    from amygdala.home import HomeLock

    holder = HomeLock(home).holder()
    return holder is not None and holder.get("pid") == os.getpid()


class NotTheOwner(DreamError):
    """A persistent scheduler opened by a process that does not hold the home lock."""


# -- job functions (module-level: the job store stores their import path and the home key) ---------
def nightly_dream(home: str) -> None:
    """The nightly job: start a cycle on the home's runner; a busy runner records the skip."""
    runner = REGISTRY.get(home)
    if runner is None:
        log.warning("nightly dream for %s: no runner registered (the daemon is starting or stopping)", home)
        return
    try:
        runner.start(DreamRequest(trigger="nightly", requested_by="nightly schedule"))
    except DreamError as exc:
        runner.note(f"nightly dream not started: {exc}")


def recertify_stale(home: str, after_cycle: str | None = None) -> None:
    """Re-certify certificates the last kept training made stale (queued behind a running cycle)."""
    runner = REGISTRY.get(home)
    if runner is None:
        log.warning("re-certification for %s: no runner registered", home)
        return
    runner.recertify(after_cycle)


@dataclass(frozen=True)
class ScheduleInfo:
    enabled: bool
    dream_at: str | None  # "03:00" (local time), None when disabled or a custom trigger
    next_run: datetime | None
    timezone: str
    misfire_grace_s: int
    pending_recertify: datetime | None


class DreamScheduler:
    """The home owner's scheduler: nightly dream, re-certification, and the store the sync shares.

    `scheduler` is the BackgroundScheduler the checkpoint sync registers on (services hands it to
    `SyncScheduler`). Start it with `start(runner)` once the runner exists; `shutdown()` stops it.
    """

    def __init__(self, home: Path, db_path: Path | None, *, dream_at: time | None = DEFAULT_DREAM_AT,
                 trigger: BaseTrigger | None = None, misfire_grace_s: int = MISFIRE_GRACE_S, tz: Any = None,
                 require_owner: bool = True):
        if db_path is not None and require_owner and not owns_home(home):
            raise NotTheOwner(f"the dream schedule of {home} lives in {db_path} and only the process holding "
                              f"{home}/daemon.lock may run it (pid {os.getpid()} does not); talk to the running "
                              "daemon instead (`amygdala dream --once` does when one runs), or stop it first")
        self.home = Path(home)
        self.key = home_key(home)
        self.persistent = db_path is not None
        self.misfire_grace_s = misfire_grace_s
        self.scheduler = new_scheduler(db_path, misfire_grace_s=misfire_grace_s, tz=tz)
        self.dream_at = dream_at if trigger is None else None
        self._trigger = trigger
        self.enabled = trigger is not None or dream_at is not None
        self.runner: DreamRunner | None = None

    # -- lifetime -----------------------------------------------------------------------------
    def nightly_trigger(self) -> BaseTrigger | None:
        if self._trigger is not None:
            return self._trigger
        if self.dream_at is None:
            return None
        return CronTrigger(hour=self.dream_at.hour, minute=self.dream_at.minute, timezone=self.scheduler.timezone)

    def start(self, runner: DreamRunner | None) -> None:
        """Start the scheduler; with a runner, (re)install the nightly job and serve the job functions.

        Starts paused, fixes the stored jobs, then resumes: a missed nightly run fires after the
        fix-up, once (coalesced), and only if within the grace.
        """
        self.runner = runner
        if runner is not None:
            REGISTRY[self.key] = runner
            runner.on_cycle_done.append(self._after_cycle)
            runner.on_recertify_done.append(lambda _summary: self.remove_recertify())
        self.scheduler.add_listener(self._on_event, EVENT_JOB_MISSED | EVENT_JOB_ERROR)
        self.scheduler.start(paused=True)
        try:
            self._install_nightly(runner)
        finally:
            self.scheduler.resume()

    def _install_nightly(self, runner: DreamRunner | None) -> None:
        stored = self.scheduler.get_job(NIGHTLY_JOB_ID, jobstore=PERSISTENT)
        trigger = self.nightly_trigger() if runner is not None else None
        if trigger is None:
            if stored is not None and runner is not None:  # --no-dream: the nightly dream is off until started without it
                self.scheduler.remove_job(NIGHTLY_JOB_ID, jobstore=PERSISTENT)
                log.info("nightly dream disabled; removed the stored nightly job")
            return
        args = [self.key]
        if stored is not None and repr(stored.trigger) == repr(trigger) and list(stored.args) == args:
            return  # unchanged: keep its next run time, which may be a run missed while we were down
        extra: dict[str, Any] = {}
        if stored is not None and stored.next_run_time is not None and stored.next_run_time <= datetime.now(timezone.utc):
            extra["next_run_time"] = stored.next_run_time  # a missed run stays due under the new schedule
        self.scheduler.add_job(nightly_dream, trigger, args=args, id=NIGHTLY_JOB_ID, name="nightly dream",
                               jobstore=PERSISTENT, replace_existing=True, coalesce=True, max_instances=1,
                               misfire_grace_time=self.misfire_grace_s, **extra)

    def shutdown(self, wait: bool = True) -> None:
        """Stop the scheduler (the runner is closed by its owner); the persistent jobs stay stored."""
        if REGISTRY.get(self.key) is self.runner:
            REGISTRY.pop(self.key, None)
        if self.scheduler.running:
            # APScheduler 3.11's main loop makes one more pass over the job stores after shutdown()
            # has stopped the executors: a job due right then fails to submit and is still moved on
            # (a cron job to its next time, a date job removed), i.e. silently skipped for good.
            # Detaching the persistent store first keeps that pass away from the stored jobs.
            self.scheduler.pause()
            try:
                self.scheduler.remove_jobstore(PERSISTENT, shutdown=True)
            except KeyError:
                pass
            self.scheduler.shutdown(wait=wait)

    # -- hooks --------------------------------------------------------------------------------
    def _after_cycle(self, summary: CycleSummary) -> None:
        """A cycle kept trained weights: re-certify right after it, with a stored job as the safety net.

        The runner chains the re-certification behind the cycle (nothing can start in between); the
        persistent job, an hour out, only runs if the daemon dies first (after a restart it is due,
        within the grace). A finished re-certification removes it.
        """
        if summary.weights_changed and not summary.dry_run:
            self.schedule_recertify(summary.cycle_id, delay_s=RECERTIFY_FALLBACK_S)
            if self.runner is not None:
                self.runner.recertify(summary.cycle_id)

    def schedule_recertify(self, after_cycle: str | None, delay_s: float = 0.0) -> datetime:
        """Queue re-certification of stale certificates (persistent: done after a restart too)."""
        run_at = datetime.now(timezone.utc) + timedelta(seconds=delay_s)
        self.scheduler.add_job(recertify_stale, "date", run_date=run_at, args=[self.key, after_cycle],
                               id=RECERTIFY_JOB_ID, name="re-certify stale certificates", replace_existing=True,
                               coalesce=True, max_instances=1, misfire_grace_time=self.misfire_grace_s,
                               jobstore=PERSISTENT)
        return run_at

    def _on_event(self, event: JobExecutionEvent) -> None:
        if event.job_id not in (NIGHTLY_JOB_ID, RECERTIFY_JOB_ID) or self.runner is None:
            return
        when = event.scheduled_run_time
        if event.code == EVENT_JOB_MISSED:
            late = datetime.now(timezone.utc) - when
            self.runner.note(f"{event.job_id} scheduled at {when.isoformat(timespec='minutes')} was missed by "
                             f"{_hours(late)} (beyond the grace of {self.misfire_grace_s // 3600} h): not run; "
                             "the next one runs on schedule, or start one now")
        elif event.code == EVENT_JOB_ERROR:
            self.runner.note(f"{event.job_id} at {when.isoformat(timespec='minutes')} failed: {event.exception!r}")

    # -- control ------------------------------------------------------------------------------
    def run_now(self, request: DreamRequest) -> Activity:
        """Start a cycle now (refused with DreamBusy naming the running one)."""
        if self.runner is None:
            raise DreamError("the dream runner is not running in this server (started without training, or "
                             "--no-dream); start `amygdala serve` with training on to dream")
        return self.runner.start(request)

    def info(self) -> ScheduleInfo:
        nightly = recert = None
        if self.scheduler.running:
            job = self.scheduler.get_job(NIGHTLY_JOB_ID, jobstore=PERSISTENT)
            nightly = job.next_run_time if job is not None else None
            rj = self.scheduler.get_job(RECERTIFY_JOB_ID, jobstore=PERSISTENT)
            recert = rj.next_run_time if rj is not None else None
        return ScheduleInfo(enabled=self.enabled and self.runner is not None,
                            dream_at=self.dream_at.strftime("%H:%M") if self.dream_at and self._trigger is None else None,
                            next_run=nightly, timezone=str(self.scheduler.timezone), misfire_grace_s=self.misfire_grace_s,
                            pending_recertify=recert)

    def remove_recertify(self) -> None:
        try:
            self.scheduler.remove_job(RECERTIFY_JOB_ID, jobstore=PERSISTENT)
        except (JobLookupError, KeyError):  # KeyError: the store is detached (shutting down)
            pass


def _hours(delta: timedelta) -> str:
    s = int(delta.total_seconds())
    return f"{s // 3600} h {s % 3600 // 60} min" if s >= 3600 else f"{s // 60} min {s % 60} s"
