"""The nightly scheduler and the dream runner: missed runs, coalescing, one cycle at a time, kill safety."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time as _time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from amygdala.dream.errors import DreamError
from amygdala.dream.runner import (
    CycleSummary,
    DreamBusy,
    DreamRequest,
    DreamRunner,
    RecertifySummary,
)
from amygdala.dream.scheduler import (
    NIGHTLY_JOB_ID,
    PERSISTENT,
    RECERTIFY_JOB_ID,
    REGISTRY,
    DreamScheduler,
    NotTheOwner,
    nightly_dream,
    parse_dream_at,
)
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from amygdala.home import HomeLock

REPO = Path(__file__).resolve().parent.parent


class FakeCycle:
    """A cycle function that counts runs, can block until released, and keeps or discards weights."""

    def __init__(self, block: bool = False, weights_changed: bool = False, fail: bool = False):
        self.runs: list[tuple[str, DreamRequest]] = []
        self.release = threading.Event()
        self.entered = threading.Event()
        if not block:
            self.release.set()
        self.weights_changed = weights_changed
        self.fail = fail

    def __call__(self, cycle_id, request, progress):
        self.runs.append((cycle_id, request))
        progress("sample", 0, 4, "choosing cases")
        self.entered.set()
        while not self.release.wait(0.01):
            if progress.cancelled:
                return CycleSummary(cycle_id, "cancelled", "cancelled on request", False)
        progress("train", 3, 4)
        if self.fail:
            raise RuntimeError("worker died")
        return CycleSummary(cycle_id, "kept" if self.weights_changed else "nothing_to_train", "fake cycle",
                            self.weights_changed, temperature=0.8, failure_rate=0.25)


def wait_for(pred, timeout: float = 10.0) -> bool:
    end = _time.monotonic() + timeout
    while _time.monotonic() < end:
        if pred():
            return True
        _time.sleep(0.02)
    return pred()


@pytest.fixture
def home(tmp_path):
    h = tmp_path / "home"
    lock = HomeLock(h).acquire("test daemon")
    yield h
    lock.release()


def open_sched(home: Path, trigger, runner, **kw) -> DreamScheduler:
    ds = DreamScheduler(home, home / "scheduler.sqlite", trigger=trigger, tz="UTC", **kw)
    ds.start(runner)
    return ds


def in_seconds(s: float) -> datetime:
    return datetime.now(timezone.utc) + timedelta(seconds=s)


def cron_at(t: datetime) -> CronTrigger:
    return CronTrigger(hour=t.hour, minute=t.minute, second=t.second, timezone="UTC")


# -- the nightly job across restarts ------------------------------------------------------------------
def test_a_run_missed_while_down_runs_once_after_restart_and_never_twice(home):
    at = in_seconds(2).replace(microsecond=0) + timedelta(seconds=1)
    trig = cron_at(at)
    first = FakeCycle()
    ds = open_sched(home, trig, DreamRunner(first))
    stored = ds.scheduler.get_job(NIGHTLY_JOB_ID, jobstore=PERSISTENT).next_run_time
    assert stored == at
    ds.shutdown()  # the daemon goes down before the nightly time
    assert wait_for(lambda: datetime.now(timezone.utc) > at + timedelta(seconds=1), 10)
    assert first.runs == []

    second = FakeCycle()
    runner = DreamRunner(second)
    ds = open_sched(home, cron_at(at), runner)  # restart, after the time: the stored job is still due
    try:
        assert wait_for(lambda: len(second.runs) == 1 and not runner.busy)
        _time.sleep(1.5)
        assert len(second.runs) == 1, "a missed nightly run runs once"
        assert second.runs[0][1].trigger == "nightly"
        assert runner.status().last.outcome == "nothing_to_train" and runner.status().last.trigger == "nightly"
        nxt = ds.info().next_run
        assert nxt is not None and timedelta(hours=23) < nxt - at <= timedelta(days=1)
    finally:
        ds.shutdown()

    third = FakeCycle()
    ds = open_sched(home, cron_at(at), DreamRunner(third))  # a second restart: nothing is due any more
    try:
        _time.sleep(1.5)
        assert third.runs == []
        assert ds.scheduler.get_job(NIGHTLY_JOB_ID, jobstore=PERSISTENT).next_run_time == nxt
    finally:
        ds.shutdown()


def test_a_nightly_run_due_at_shutdown_is_not_skipped(home):
    """APScheduler makes one more pass after shutdown with its executors gone: it must not see our jobs."""
    trig = CronTrigger(hour=3, minute=0, timezone="UTC")
    ds = open_sched(home, trig, DreamRunner(FakeCycle()))
    ds.scheduler.pause()  # the job becomes due just as the daemon stops
    ds.scheduler.modify_job(NIGHTLY_JOB_ID, jobstore=PERSISTENT, next_run_time=in_seconds(-1))
    ds.shutdown()
    cyc = FakeCycle()
    runner = DreamRunner(cyc)
    ds = open_sched(home, trig, runner)
    try:
        assert wait_for(lambda: len(cyc.runs) == 1 and not runner.busy)
    finally:
        ds.shutdown()


def test_a_run_missed_beyond_the_grace_is_reported_not_run(home):
    at = in_seconds(1).replace(microsecond=0) + timedelta(seconds=1)
    ds = open_sched(home, cron_at(at), DreamRunner(FakeCycle()), misfire_grace_s=1)
    ds.shutdown()
    assert wait_for(lambda: datetime.now(timezone.utc) > at + timedelta(seconds=3), 10)
    cyc = FakeCycle()
    runner = DreamRunner(cyc)
    ds = open_sched(home, cron_at(at), runner, misfire_grace_s=1)
    try:
        assert wait_for(lambda: any("missed by" in n for n in runner.status().notes))
        note = next(n for n in runner.status().notes if "missed by" in n)
        assert NIGHTLY_JOB_ID in note and "grace" in note
        assert cyc.runs == []
    finally:
        ds.shutdown()


def test_default_grace_is_six_hours_and_the_job_is_stored_with_it(home):
    ds = DreamScheduler(home, home / "scheduler.sqlite", tz="UTC")  # 03:00 nightly
    ds.start(DreamRunner(FakeCycle()))
    try:
        job = ds.scheduler.get_job(NIGHTLY_JOB_ID, jobstore=PERSISTENT)
        assert job.misfire_grace_time == 6 * 3600 and job.coalesce and job.max_instances == 1
        assert job.next_run_time.hour == 3 and job.next_run_time.minute == 0
        assert job.args == (str(home.resolve()),)  # the pickled job holds the home key, not a live object
        assert ds.info().dream_at == "03:00"
    finally:
        ds.shutdown()


def test_missed_runs_coalesce_into_one(home):
    start = in_seconds(1).replace(microsecond=0) + timedelta(seconds=1)
    trig = IntervalTrigger(seconds=1, start_date=start, end_date=start + timedelta(seconds=3.5), timezone="UTC")
    ds = open_sched(home, trig, DreamRunner(FakeCycle()))
    ds.shutdown()
    assert wait_for(lambda: datetime.now(timezone.utc) > start + timedelta(seconds=4.5), 10)  # 4 fire times missed
    cyc = FakeCycle()
    runner = DreamRunner(cyc)
    ds = open_sched(home, trig, runner)
    try:
        assert wait_for(lambda: len(cyc.runs) >= 1 and not runner.busy)
        _time.sleep(1.0)
        assert len(cyc.runs) == 1, "four missed fire times ran as one"
        assert ds.scheduler.get_job(NIGHTLY_JOB_ID, jobstore=PERSISTENT) is None  # past its end: finished
    finally:
        ds.shutdown()


def test_a_changed_dream_time_replaces_the_job_and_no_dream_removes_it(home):
    ds = DreamScheduler(home, home / "scheduler.sqlite", tz="UTC")
    ds.start(DreamRunner(FakeCycle()))
    ds.shutdown()
    ds = DreamScheduler(home, home / "scheduler.sqlite", dream_at=parse_dream_at("22:15"), tz="UTC")
    ds.start(DreamRunner(FakeCycle()))
    try:
        job = ds.scheduler.get_job(NIGHTLY_JOB_ID, jobstore=PERSISTENT)
        assert (job.next_run_time.hour, job.next_run_time.minute) == (22, 15)
        assert len(ds.scheduler.get_jobs(jobstore=PERSISTENT)) == 1
    finally:
        ds.shutdown()
    ds = DreamScheduler(home, home / "scheduler.sqlite", dream_at=None, tz="UTC")  # --no-dream
    ds.start(DreamRunner(FakeCycle()))
    try:
        assert ds.scheduler.get_job(NIGHTLY_JOB_ID, jobstore=PERSISTENT) is None and not ds.info().enabled
    finally:
        ds.shutdown()


@pytest.mark.parametrize("text", ["3am", "24:00", "03:60", "", "3:0"])
def test_bad_dream_times_say_the_format(text):
    with pytest.raises(DreamError, match="HH:MM"):
        parse_dream_at(text)


def test_only_the_home_owner_opens_the_persistent_store(tmp_path):
    with pytest.raises(NotTheOwner, match="daemon.lock"):
        DreamScheduler(tmp_path / "h", tmp_path / "h" / "scheduler.sqlite")


# -- one cycle at a time ------------------------------------------------------------------------------
def test_run_now_while_a_cycle_runs_is_refused_naming_it(home):
    cyc = FakeCycle(block=True)
    runner = DreamRunner(cyc)
    ds = open_sched(home, CronTrigger(hour=3, minute=0, timezone="UTC"), runner)
    try:
        first = ds.run_now(DreamRequest(trigger="now", requested_by="agent"))
        assert cyc.entered.wait(5)
        with pytest.raises(DreamBusy) as err:
            ds.run_now(DreamRequest(trigger="cli", budget_steps=3))
        msg = str(err.value)
        assert first.cycle_id in msg and "phase sample, 0/4" in msg and "wait for it" in msg, msg
        assert isinstance(err.value, DreamError)  # the tools turn it into a fix-your-call message
        nightly_dream(str(home.resolve()))  # the nightly job firing meanwhile: skipped and said so
        assert any("nightly dream not started" in n and first.cycle_id in n for n in runner.status().notes)
        st = runner.status()
        assert st.current.cycle_id == first.cycle_id and st.current.phase == "sample"
        cyc.release.set()
        assert runner.wait(5)
        assert len(cyc.runs) == 1 and runner.status().last.cycle_id == first.cycle_id
        again = ds.run_now(DreamRequest())
        assert again.cycle_id != first.cycle_id and runner.wait(5) and len(cyc.runs) == 2
    finally:
        ds.shutdown()
        runner.close()


def test_concurrent_starts_run_exactly_one(home):
    cyc = FakeCycle(block=True)
    runner = DreamRunner(cyc)
    results: list[object] = []
    barrier = threading.Barrier(8)

    def go():
        barrier.wait()
        try:
            results.append(runner.start(DreamRequest()))
        except DreamBusy as exc:
            results.append(exc)

    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    started = [r for r in results if not isinstance(r, DreamBusy)]
    assert len(started) == 1 and len(results) == 8
    cyc.release.set()
    assert runner.wait(5) and len(cyc.runs) == 1


def test_a_failing_cycle_is_recorded_and_the_next_one_starts(home):
    runner = DreamRunner(FakeCycle(fail=True))
    a = runner.start(DreamRequest())
    assert runner.wait(5)
    last = runner.status().last
    assert last.cycle_id == a.cycle_id and last.outcome == "failed" and "worker died" in last.reason
    runner.start(DreamRequest())
    assert runner.wait(5) and runner.status().cycles_run == 2


def test_cancel_and_close(home):
    cyc = FakeCycle(block=True)
    runner = DreamRunner(cyc)
    runner.start(DreamRequest())
    assert cyc.entered.wait(5)
    assert runner.cancel().cancel_requested
    assert runner.wait(5) and runner.status().last.outcome == "cancelled"
    runner.start(DreamRequest())
    assert cyc.entered.wait(5)
    assert runner.close(5) and runner.status().last.outcome == "cancelled"
    with pytest.raises(DreamError, match="shutting down"):
        runner.start(DreamRequest())


# -- re-certification after a kept cycle ------------------------------------------------------------
def test_a_cycle_that_kept_weights_is_recertified_right_after_with_a_stored_safety_net(home):
    entered, release = threading.Event(), threading.Event()
    calls: list[str | None] = []
    fail = {"now": False}

    def recert(after, progress):
        progress("certify", 1, 2)
        calls.append(after)
        entered.set()
        assert release.wait(10)
        if fail["now"]:
            raise RuntimeError("judge crashed")
        return RecertifySummary(after_cycle=after, attempted=2, certified=1, failed=["push-back: bound 0.7 < 0.8"])

    runner = DreamRunner(FakeCycle(weights_changed=True), recertify=recert)
    ds = open_sched(home, CronTrigger(hour=3, minute=0, timezone="UTC"), runner)
    try:
        a = ds.run_now(DreamRequest())
        assert entered.wait(10)  # chained behind the cycle: the runner never went idle in between
        assert not runner.wait(0.05) and runner.status().current.kind == "recertify"
        with pytest.raises(DreamBusy, match="re-certification"):
            runner.start(DreamRequest())
        job = ds.scheduler.get_job(RECERTIFY_JOB_ID, jobstore=PERSISTENT)
        assert job is not None and job.args == (str(home.resolve()), a.cycle_id)
        assert job.next_run_time > in_seconds(50 * 60)  # only a daemon that dies first needs it
        release.set()
        assert runner.wait(5) and calls == [a.cycle_id]
        rs = runner.status().last_recertify
        assert rs.attempted == 2 and rs.certified == 1 and rs.after_cycle == a.cycle_id
        assert ds.scheduler.get_job(RECERTIFY_JOB_ID, jobstore=PERSISTENT) is None  # done: the safety net goes

        fail["now"] = True  # a pass that fails keeps the stored job, so it is tried again
        entered.clear()
        b = ds.run_now(DreamRequest())
        assert entered.wait(10) and runner.wait(5)
        assert ds.scheduler.get_job(RECERTIFY_JOB_ID, jobstore=PERSISTENT).args[1] == b.cycle_id
        assert any("judge crashed" in n for n in runner.status().notes)
        ds.remove_recertify()

        nothing = DreamRunner(FakeCycle(weights_changed=False), recertify=recert)
        ds.runner = nothing  # a cycle that kept nothing queues nothing
        nothing.on_cycle_done.append(ds._after_cycle)
        nothing.start(DreamRequest())
        assert nothing.wait(5)
        _time.sleep(0.3)
        assert calls == [a.cycle_id, b.cycle_id] and ds.scheduler.get_job(RECERTIFY_JOB_ID, jobstore=PERSISTENT) is None
    finally:
        ds.shutdown()


def test_a_queued_recertification_survives_a_restart(home):
    ds = open_sched(home, CronTrigger(hour=3, minute=0, timezone="UTC"), DreamRunner(FakeCycle()))
    ds.scheduler.pause()  # the daemon dies before the job runs
    ds.schedule_recertify("cycle-x")
    ds.shutdown(wait=False)
    got: list[str | None] = []
    runner = DreamRunner(FakeCycle(), recertify=lambda after, p: got.append(after) or RecertifySummary(after, 0, 0))
    ds = open_sched(home, CronTrigger(hour=3, minute=0, timezone="UTC"), runner)
    try:
        assert wait_for(lambda: got == ["cycle-x"] and ds.scheduler.get_job(RECERTIFY_JOB_ID, jobstore=PERSISTENT) is None)
    finally:
        ds.shutdown()


def test_recertification_asked_for_during_a_cycle_runs_after_it(home):
    cyc = FakeCycle(block=True)
    order: list[str] = []
    runner = DreamRunner(cyc, recertify=lambda after, p: order.append("recert") or RecertifySummary(after, 0, 0))
    runner.on_cycle_done.append(lambda s: order.append("cycle"))
    runner.start(DreamRequest())
    assert cyc.entered.wait(5)
    assert runner.recertify("cycle-y") is None  # queued behind the cycle
    with pytest.raises(DreamBusy):
        runner.start(DreamRequest())
    cyc.release.set()
    assert wait_for(lambda: order == ["cycle", "recert"]) and runner.wait(5)
    assert not runner.busy


# -- the checkpoint sync lives on the same scheduler ------------------------------------------------
def test_the_checkpoint_sync_shares_the_owner_scheduler_in_memory(home):
    from amygdala.training.checkpoint.schedule import JOBSTORE, SyncScheduler

    ds = open_sched(home, CronTrigger(hour=3, minute=0, timezone="UTC"), DreamRunner(FakeCycle()))
    try:
        calls = []
        sync = SyncScheduler(ds.scheduler, lambda: calls.append(1) or {"ok": True}, delay_s=0.05)
        sync.notify_training_finished()
        assert wait_for(lambda: calls == [1])
        assert [j.id for j in ds.scheduler.get_jobs(jobstore=PERSISTENT)] == [NIGHTLY_JOB_ID]
        assert ds.scheduler.get_jobs(jobstore=JOBSTORE) == []
    finally:
        ds.shutdown()
    assert str(home.resolve()) not in REGISTRY


# -- kill safety ------------------------------------------------------------------------------------
def test_the_job_store_survives_a_kill(tmp_path):
    home = tmp_path / "home"
    db = home / "scheduler.sqlite"
    env = dict(os.environ)
    p = subprocess.Popen([sys.executable, str(REPO / "tests" / "scheduler_kill_worker.py"), str(home), str(db)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(REPO))
    try:
        first = p.stdout.readline().split()
        assert first[:1] == ["ready"], p.stderr.read()
        assert p.stdout.readline().strip() == "writing"
        _time.sleep(0.4)  # mid-rewrite
        p.send_signal(signal.SIGKILL)
        p.wait(10)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == -signal.SIGKILL
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        rows = conn.execute("SELECT id FROM apscheduler_jobs").fetchall()
    assert rows == [(NIGHTLY_JOB_ID,)]
    lock = HomeLock(home).acquire("restarted daemon")  # the kernel dropped the killed owner's lock
    try:
        cyc = FakeCycle()
        ds = open_sched(home, CronTrigger(hour=3, minute=0, timezone="UTC"), DreamRunner(cyc))
        try:
            job = ds.scheduler.get_job(NIGHTLY_JOB_ID, jobstore=PERSISTENT)
            assert job is not None and job.next_run_time > datetime.now(timezone.utc) + timedelta(days=1)
            assert job.args == (str(home.resolve()),)
            _time.sleep(0.5)
            assert cyc.runs == []  # what was stored was a future time: nothing fires by mistake
        finally:
            ds.shutdown()
    finally:
        lock.release()


def test_certifying_on_request_takes_the_same_slot(home):
    cyc = FakeCycle(block=True)
    runner = DreamRunner(cyc)
    runner.start(DreamRequest())
    assert cyc.entered.wait(5)
    with pytest.raises(DreamBusy, match="dream cycle"):
        runner.exclusive("certify", lambda p: "never", subject="listen")
    cyc.release.set()
    assert runner.wait(5)
    seen = []

    def work(progress):
        progress("certify", 1, 3, "judging")
        seen.append(runner.status().current)
        with pytest.raises(DreamBusy, match="certification of invariant 'listen'"):
            runner.start(DreamRequest())
        return "record"

    assert runner.exclusive("certify", work, subject="listen") == "record"
    assert seen[0].kind == "certify" and seen[0].done == 1 and not runner.busy
