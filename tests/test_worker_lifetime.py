"""The training worker never outlives its parent, and an older process never overwrites newer optimizer state."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from amygdala.engine.config import Config
from amygdala.engine.testing import tiny_model
from amygdala.training.client import TrainingClient
from amygdala.training.optimizer_state import STATE_JSON, stored_generation
from amygdala.training.schemas import TrainExample, TrainJob, TrainSettings
from amygdala.training.trainer import ContextFrozenTrainer

CHILD = Path(__file__).with_name("worker_lifetime_child.py")
REPO = Path(__file__).resolve().parents[1]
CONTEXT = [2] + [(5 * i) % 250 + 4 for i in range(40)]
ORPO = TrainExample(context_ids=CONTEXT, continuation_ids=[100, 101, 102], rejected_ids=[150, 151], loss="orpo")


def gone(pid: int) -> bool:
    """No such process, or a zombie nobody reaped yet (it runs nothing)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "State:\tZ" in status


def test_kill_9_of_the_parent_takes_the_worker_with_it(tmp_path):
    home = tmp_path / "home"
    proc = subprocess.Popen([sys.executable, str(CHILD), str(home)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        worker = json.loads(line)["worker"]
        assert not gone(worker), "the worker should be training"
        proc.kill()  # SIGKILL: no atexit, no close(), no stop message to the worker
        proc.wait(30)
        deadline = time.monotonic() + 5
        while not gone(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gone(worker), f"worker {worker} outlived its killed parent"
        time.sleep(1)
        assert not list((home / "optimizer").rglob(STATE_JSON)), "the orphan wrote optimizer state"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_watchdog_exits_when_the_parent_pid_is_not_the_one_it_was_given():
    # The fallback where prctl is missing: a process told its parent is pid 1 sees another one and exits.
    code = "from amygdala.training.worker import die_with_parent; import time; die_with_parent(1); time.sleep(30)"
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 3 and time.monotonic() - t0 < 20, p.stderr


def test_worker_started_from_a_short_lived_thread_survives_that_thread(tmp_path):
    # PR_SET_PDEATHSIG fires when the *thread* that started the child exits: the client must start
    # workers from its own long-lived thread, or a restart from a request thread would kill it later.
    client = TrainingClient(tiny_model(), Config.load(home=tmp_path),
                            TrainSettings(rank=8, lr=1e-3, progress=False, threads=1), start=False)
    try:
        t = threading.Thread(target=client.start)
        t.start()
        t.join(300)
        time.sleep(1.5)
        assert client.alive, client.status()
        job = client.wait(client.submit(TrainJob(examples=[ORPO])), timeout=180)
        assert job.state == "done" and job.steps[0].changed_tensors > 0
    finally:
        client.close()


def _settings() -> TrainSettings:
    return TrainSettings(rank=8, lr=1e-3, progress=False, threads=1)


def test_a_stale_writer_cannot_overwrite_a_newer_generation(tiny_lm, tmp_path):
    old = ContextFrozenTrainer(copy.deepcopy(tiny_lm.model), _settings(), state_root=tmp_path)  # e.g. the orphan
    new = ContextFrozenTrainer(copy.deepcopy(tiny_lm.model), _settings(), state_root=tmp_path)  # the restarted worker
    old.load_state()
    new.load_state()
    assert old.generation == new.generation == 0
    assert new.run(TrainJob(examples=[ORPO]), "j-new").state == "done"
    assert stored_generation(new.state_dir) == 1
    written = (new.state_dir / STATE_JSON).read_bytes()

    assert old.run(TrainJob(examples=[ORPO], epochs=2), "j-old").state == "done"  # trains, but must not save
    assert stored_generation(old.state_dir) == 1 and (old.state_dir / STATE_JSON).read_bytes() == written
    assert "newer than generation 0" in (old.state_warning or "")
    assert sorted(p.name for p in new.state_dir.glob("state-*.safetensors")) == ["state-00000001.safetensors"]

    # The newer process goes on saving; a fresh one resumes from what it wrote.
    assert new.run(TrainJob(examples=[ORPO]), "j-new2").state == "done" and stored_generation(new.state_dir) == 2
    again = ContextFrozenTrainer(copy.deepcopy(tiny_lm.model), _settings(), state_root=tmp_path)
    assert again.load_state() and again.generation == 2 and again.jobs_trained == 2


@pytest.mark.parametrize("writers", [4])
def test_concurrent_saves_never_go_backwards(tiny_lm, tmp_path, writers):
    trainers = [ContextFrozenTrainer(copy.deepcopy(tiny_lm.model), _settings(), state_root=tmp_path)
                for _ in range(writers)]
    for t in trainers:
        t.load_state()
    results = []
    threads = [threading.Thread(target=lambda t=t: results.append(t.save_state())) for t in trainers]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(results) == [False] * (writers - 1) + [True]  # one wins; the others find it newer
    assert stored_generation(trainers[0].state_dir) == 1
