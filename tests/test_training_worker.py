"""The training worker process on the tiny model: shared weights (HOGWILD), IPC, death, rollback, HTTP."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import httpx
import pytest
import torch

from amygdala.engine.activations import token_activations
from amygdala.engine.config import Config
from amygdala.engine.generation import sequence_logprobs
from amygdala.engine.testing import tiny_model
from amygdala.training.api import create_app
from amygdala.training.client import TrainingClient
from amygdala.training.schemas import JobRejected, TrainExample, TrainJob, TrainSettings

CONTEXT = [2] + [(5 * i) % 250 + 4 for i in range(40)]
ORPO = TrainExample(context_ids=CONTEXT, continuation_ids=[100, 101, 102], rejected_ids=[150, 151], loss="orpo")
TEXT = [2] + list(range(40, 90))


def make_client(home, **kw) -> TrainingClient:
    lm = tiny_model()
    settings = TrainSettings(**({"rank": 8, "lr": 1e-3, "progress": False, "threads": 1} | kw))
    return TrainingClient(lm, Config.load(home=home), settings)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    c = make_client(tmp_path_factory.mktemp("home"))
    yield c
    c.close()


def margin(lm) -> float:
    return float(sequence_logprobs(lm, ORPO.context_ids, ORPO.continuation_ids).mean()
                 - sequence_logprobs(lm, ORPO.context_ids, ORPO.rejected_ids).mean())


def test_job_with_concurrent_readouts_updates_served_weights(client) -> None:
    lm = client.lm
    before = token_activations(lm, TEXT, [1, 3])
    margin_before = margin(lm)
    q = lm.model.get_parameter("model.layers.0.self_attn.q_proj.weight")
    assert q.is_shared()  # the worker maps this storage; nothing is copied back
    v0 = client.weights_version
    stop, seen, errors = threading.Event(), [], []

    def readouts() -> None:
        while not stop.is_set():
            try:
                token_activations(lm, TEXT, [1, 3])
                seen.append(client.weights_version)
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
                return

    reader = threading.Thread(target=readouts)
    reader.start()
    try:
        job_id = client.submit(TrainJob(examples=[ORPO], epochs=12))
        result = client.wait(job_id, timeout=180)
    finally:
        stop.set()
        reader.join()
    assert not errors
    assert result.state == "done" and result.steps_applied == 12, result
    v_end = client.weights_version
    assert v_end == v0 + 2 * 12 and v_end % 2 == 0  # one odd/even pair per applied step
    assert any(v0 < v < v_end for v in seen), "no readout overlapped the job"
    after = token_activations(lm, TEXT, [1, 3])
    assert not torch.allclose(after[1], before[1])
    assert margin(lm) > margin_before  # the serving process sees the trained weights

    rolled = client.rollback(job_id)
    assert rolled.undone_jobs == [job_id] and rolled.weights_version == v_end + 2
    restored = token_activations(lm, TEXT, [1, 3])
    assert all(torch.equal(restored[i], before[i]) for i in (1, 3))
    assert client.status().rollback_available == []


def test_status_hooks_and_saved_state(client) -> None:
    finished = []
    client.on_job_finished.append(finished.append)
    try:
        first = client.submit(TrainJob(examples=[ORPO], epochs=3))
        dry = client.submit(TrainJob(examples=[ORPO], dry_run=True))
        assert client.status().queue[-1] == dry
        client.wait(dry, timeout=120)
    finally:
        client.on_job_finished.clear()
    assert [r.job_id for r in finished] == [first, dry]
    status = client.status()
    assert status.worker_alive and status.jobs_finished >= 2 and status.queue == [] and status.current_job is None
    assert status.rollback_available == [first] and "APOLLO rank 8" in status.optimizer
    assert client.job(dry).grad_norm > 0 and client.job(dry).steps_applied == 0
    saved = list((client.config.optimizer_dir).rglob("state.json"))
    assert len(saved) == 1 and len(list(saved[0].parent.glob("*.safetensors"))) == 1


def test_bad_ids_are_rejected_before_queueing(client) -> None:
    with pytest.raises(JobRejected, match=r"continuation_ids\[1\] = 999 is not a token id"):
        client.submit(TrainExample(context_ids=[2], continuation_ids=[5, 999], loss="sft"))
    with pytest.raises(JobRejected, match="over the limit"):
        client.submit(TrainExample(context_ids=[2] * 5000, continuation_ids=[5], loss="sft"))
    assert client.status().queue == []


def test_http_api_stays_responsive_while_training(client) -> None:
    async def scenario() -> tuple[dict, list[dict], dict]:
        transport = httpx.ASGITransport(app=create_app(client))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            body = {"context_ids": CONTEXT, "continuation_ids": [100, 101], "rejected_ids": [150], "loss": "orpo",
                    "lr": 5e-4}
            accepted = (await http.post("/train", json={**body, "epochs": 30})).json()
            statuses = []
            for _ in range(2000):
                statuses.append((await http.get("/train/status")).json())
                result = (await http.get(f"/train/jobs/{accepted['job_id']}")).json()
                if result["state"] in ("done", "failed"):
                    return accepted, statuses, result
                await asyncio.sleep(0.02)
            raise AssertionError("job did not finish")

    accepted, statuses, result = asyncio.run(scenario())
    assert result["state"] == "done" and result["steps_applied"] == 30
    running = [s for s in statuses if s["current_job"] == accepted["job_id"]]
    assert running and any(s["step"] for s in running)  # answered mid-job, with progress


def test_worker_death_is_reported_and_serving_goes_on(tmp_path) -> None:
    c = make_client(tmp_path)
    try:
        job_id = c.submit(TrainJob(examples=[ORPO], epochs=500))
        deadline = time.time() + 60
        while c.status().current_job != job_id and time.time() < deadline:
            time.sleep(0.05)
        os.kill(c.pid, signal.SIGKILL)
        result = c.wait(job_id, timeout=30)
        assert result.state == "failed" and "died" in result.error
        status = c.status()
        assert not status.worker_alive and "exit code -9" in status.worker_error
        assert job_id in status.last_error
        token_activations(c.lm, TEXT, [1])  # the serving process still serves
        again = c.submit(TrainJob(examples=[ORPO]))  # auto-restart
        assert c.wait(again, timeout=120).state == "done" and c.status().worker_alive

        long_job = c.submit(TrainJob(examples=[ORPO], epochs=500))
        while c.status().step in (None, 0) and time.time() < deadline + 60:
            time.sleep(0.05)
        c.close()  # stops between steps
        result = c.job(long_job)
        assert result.state == "cancelled" and 0 < result.steps_applied < 500
        assert c.weights_version % 2 == 0  # never stopped mid-write
    finally:
        c.close()
