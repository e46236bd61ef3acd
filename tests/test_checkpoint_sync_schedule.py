"""Sync scheduling: debounced after training, on demand, at shutdown; on a shared APScheduler."""

from __future__ import annotations

import shutil
import threading
import time

import pytest
import torch
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from safetensors.torch import load_file

from amygdala.training.checkpoint.sync import CheckpointSyncer
from amygdala.training.checkpoint.schedule import JOBSTORE, SyncScheduler


class Counter:
    def __init__(self, fail: bool = False):
        self.calls = 0
        self.fail = fail
        self.ran = threading.Event()

    def __call__(self) -> dict:
        self.calls += 1
        self.ran.set()
        if self.fail:
            raise RuntimeError("disk full")
        return {"n": self.calls}


@pytest.fixture
def scheduler():
    s = BackgroundScheduler(timezone="UTC")
    s.start()
    yield s
    s.shutdown(wait=False)


def wait_for(pred, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def test_several_jobs_one_sync_after_the_last(scheduler):
    fn = Counter()
    ss = SyncScheduler(scheduler, fn, delay_s=1.0)
    planned = []
    for _ in range(3):
        planned.append(ss.notify_training_finished())
        assert len(scheduler.get_jobs(jobstore=JOBSTORE)) == 1  # re-armed, not added
        time.sleep(0.1)
    assert planned == sorted(planned) and planned[0] < planned[-1]
    assert abs((ss.next_run_time - planned[-1]).total_seconds()) < 1e-3  # debounced to the last job
    assert fn.calls == 0
    assert wait_for(lambda: fn.calls == 1)
    time.sleep(0.6)
    assert fn.calls == 1 and ss.next_run_time is None and ss.last_report == {"n": 1}


def test_sync_now_cancels_the_pending_sync(scheduler):
    fn = Counter()
    ss = SyncScheduler(scheduler, fn, delay_s=0.3)
    ss.notify_training_finished()
    assert ss.sync_now() == {"n": 1} and ss.next_run_time is None
    time.sleep(0.6)
    assert fn.calls == 1


def test_shutdown_syncs_once_more_and_ignores_later_jobs(scheduler):
    fn = Counter()
    ss = SyncScheduler(scheduler, fn, delay_s=600)
    ss.notify_training_finished()
    assert ss.shutdown() == {"n": 1} and ss.next_run_time is None
    assert ss.notify_training_finished() is None and ss.next_run_time is None
    assert fn.calls == 1


def test_a_failed_scheduled_sync_is_recorded_not_lost(scheduler):
    fn = Counter(fail=True)
    ss = SyncScheduler(scheduler, fn, delay_s=0.05)
    ss.notify_training_finished()
    assert fn.ran.wait(10)
    assert wait_for(lambda: ss.last_error is not None)
    assert "disk full" in ss.last_error and scheduler.running
    with pytest.raises(RuntimeError, match="disk full"):
        ss.sync_now()


def test_shares_a_scheduler_with_a_persistent_default_store(tmp_path):
    s = BackgroundScheduler(jobstores={"default": SQLAlchemyJobStore(url=f"sqlite:///{tmp_path / 'jobs.sqlite'}")},
                            timezone="UTC")
    s.start()
    try:
        fn = Counter()
        first = SyncScheduler(s, fn, delay_s=0.05)
        SyncScheduler(s, Counter(), delay_s=1, job_id="other")  # a second one reuses the memory store
        first.notify_training_finished()  # a bound method: would not pickle into the SQL store
        assert fn.ran.wait(10) and fn.calls == 1
        assert s.get_jobs(jobstore="default") == []
    finally:
        s.shutdown(wait=False)


def test_scheduled_sync_writes_the_trained_weights(scheduler, tmp_path, tiny_model_dir):
    from amygdala.engine.testing import tiny_model

    d = shutil.copytree(tiny_model_dir, tmp_path / "model")
    model = tiny_model().model
    ss = SyncScheduler(scheduler, CheckpointSyncer(d, model).sync, delay_s=0.05)
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight.mul_(1.5)
    ss.notify_training_finished()
    assert wait_for(lambda: ss.last_report is not None or ss.last_error is not None)
    assert ss.last_error is None and ss.last_report.touched == ["model.layers.2.mlp.up_proj.weight"]
    reloaded = load_file(d / "model.safetensors")
    assert torch.equal(reloaded["model.layers.2.mlp.up_proj.weight"], model.model.layers[2].mlp.up_proj.weight)
