"""Subprocess for the kill test: own a home, keep rewriting the persistent nightly job until SIGKILLed.

argv: home, db path. Prints "ready <iso next run>" once the first job is stored, then reschedules the
nightly job to a new future time in a tight loop (each a SQLite write) so the kill lands mid-write.
"""

from __future__ import annotations

import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from amygdala.dream.runner import CycleSummary, DreamRunner
from amygdala.dream.scheduler import NIGHTLY_JOB_ID, PERSISTENT, DreamScheduler
from apscheduler.triggers.cron import CronTrigger

from amygdala.home import HomeLock


def main() -> None:
    home, db = Path(sys.argv[1]), Path(sys.argv[2])
    lock = HomeLock(home).acquire("kill test")
    ds = DreamScheduler(home, db, trigger=CronTrigger(hour=3, minute=0, timezone="UTC"), tz="UTC")
    ds.start(DreamRunner(lambda cid, req, prog: CycleSummary(cid, "kept", "fake", False)))
    base = datetime.now(timezone.utc) + timedelta(days=2)
    job = ds.scheduler.get_job(NIGHTLY_JOB_ID, jobstore=PERSISTENT)
    print("ready", job.next_run_time.isoformat(), flush=True)
    i = 0
    while True:
        i += 1
        ds.scheduler.modify_job(NIGHTLY_JOB_ID, jobstore=PERSISTENT, next_run_time=base + timedelta(seconds=i))
        if i == 1:
            print("writing", flush=True)
    lock.release()  # never reached


if __name__ == "__main__":
    main()
