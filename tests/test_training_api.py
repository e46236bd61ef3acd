"""HTTP API validation and status codes, against an in-process stand-in for the worker client."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient
from typer.testing import CliRunner

from amygdala.training.api import create_app
from amygdala.training.schemas import (JobRejected, JobResult, ModelLimits, RollbackResult, TrainJob, TrainStatus,
                              WorkerUnavailable, check_job)
from amygdala.training.cli import train_app


class FakeService:
    """Validates like TrainingClient (same check_job) and records submitted jobs."""

    def __init__(self) -> None:
        self.limits = ModelLimits(vocab_size=260, max_tokens=64)
        self.jobs: dict[str, TrainJob] = {}
        self.available = True

    def check(self, req) -> TrainJob:  # noqa: ANN001
        job = req.to_job()
        check_job(job, self.limits)
        return job

    def submit(self, job: TrainJob) -> str:
        if not self.available:
            raise WorkerUnavailable("training worker is not running (died with exit code -9)")
        job_id = f"job-{len(self.jobs)}"
        self.jobs[job_id] = job
        return job_id

    def status(self) -> TrainStatus:
        return TrainStatus(worker_alive=self.available, queue=list(self.jobs))

    def job(self, job_id: str) -> JobResult:
        if job_id not in self.jobs:
            raise KeyError(f"unknown job id {job_id!r}")
        return JobResult(job_id=job_id, state="queued")

    def rollback(self, job_id: str) -> RollbackResult:
        if job_id not in self.jobs:
            raise JobRejected(f"no snapshot for job {job_id!r}")
        return RollbackResult(job_id=job_id, restored_tensors=3, undone_jobs=[job_id], weights_version=2)


@pytest.fixture
def service() -> FakeService:
    return FakeService()


@pytest.fixture
def http(service) -> TestClient:
    return TestClient(create_app(service))


GOOD = {"context_ids": [2, 10, 11], "continuation_ids": [20, 21], "rejected_ids": [30], "loss": "orpo"}


def test_submit_returns_a_job_id(http, service) -> None:
    resp = http.post("/train", json={**GOOD, "lr": 2e-5, "dry_run": True})
    assert resp.status_code == 202
    job_id = resp.json()["job_id"]
    job = service.jobs[job_id]
    assert job.lr == 2e-5 and job.dry_run and job.examples[0].rejected_ids == [30]
    assert http.get(f"/train/jobs/{job_id}").json()["state"] == "queued"
    assert http.get("/train/status").json()["queue"] == [job_id]
    assert http.get("/train/jobs/nope").status_code == 404


@pytest.mark.parametrize("change,status,message", [
    ({"continuation_ids": [20, 260]}, 422, "continuation_ids[1] = 260 is not a token id"),
    ({"context_ids": [2, -1]}, 422, "context_ids[1] = -1 is not a token id"),
    ({"continuation_ids": []}, 422, "continuation_ids is empty"),
    ({"context_ids": []}, 422, "context_ids is empty"),
    ({"context_ids": [2] * 70}, 422, "over the limit of 64"),
    ({"rejected_ids": None}, 422, "loss 'orpo' needs non-empty rejected_ids"),
    ({"loss": "sft"}, 422, "rejected_ids were given with loss 'sft'"),
    ({"loss": "dpo"}, 422, "loss"),
    ({"continuation_ids": [20, "21"]}, 422, "continuation_ids.1"),
    ({"continuation_ids": [20, 1.5]}, 422, "continuation_ids.1"),
    ({"lr": 0.5}, 422, "lr"),
    ({"tokens": [1]}, 422, "tokens"),
])
def test_bad_requests_get_clear_4xx(http, service, change, status, message) -> None:
    body = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    resp = http.post("/train", json=body)
    assert resp.status_code == status, resp.json()
    assert message in resp.json()["error"]
    assert not service.jobs


def test_missing_loss_and_bad_json(http) -> None:
    body = {k: v for k, v in GOOD.items() if k != "loss"}
    resp = http.post("/train", json=body)
    assert resp.status_code == 422 and "loss" in resp.json()["error"]
    resp = http.post("/train", content=b"{not json", headers={"content-type": "application/json"})
    assert resp.status_code == 400 and "not valid JSON" in resp.json()["error"]
    assert http.post("/train", json=[1, 2]).status_code == 400


def test_worker_down_is_503_and_status_still_answers(http, service) -> None:
    service.available = False
    resp = http.post("/train", json=GOOD)
    assert resp.status_code == 503 and "exit code -9" in resp.json()["error"]
    assert http.get("/train/status").json()["worker_alive"] is False


def test_rollback_route(http, service) -> None:
    job_id = http.post("/train", json=GOOD).json()["job_id"]
    assert http.post("/train/rollback", json={"job_id": job_id}).json()["undone_jobs"] == [job_id]
    assert http.post("/train/rollback", json={"job_id": "job-x"}).status_code == 409
    assert http.post("/train/rollback", json={}).status_code == 422


def test_checkpoint_calls_the_hook_or_explains(service) -> None:
    resp = TestClient(create_app(service)).post("/checkpoint")
    assert resp.status_code == 503 and "not configured" in resp.json()["error"]
    calls = []
    ok = TestClient(create_app(service, on_checkpoint=lambda: calls.append(1) or {"tensors_touched": 4}))
    assert ok.post("/checkpoint").json() == {"tensors_touched": 4} and calls == [1]

    def broken() -> None:
        raise OSError("disk full")

    resp = TestClient(create_app(service, on_checkpoint=broken)).post("/checkpoint")
    assert resp.status_code == 500 and "disk full" in resp.json()["error"]


def test_cli_has_server_and_clients() -> None:
    out = CliRunner().invoke(train_app, ["--help"]).output
    for command in ("server", "submit", "status", "rollback"):
        assert command in out
    server_help = CliRunner().invoke(train_app, ["server", "--help"]).output
    for option in ("--host", "--port", "--model", "--home"):
        assert option in server_help
    result = CliRunner().invoke(train_app, ["submit", "--context-ids", "2,x", "--continuation-ids", "5"])
    assert result.exit_code == 2
