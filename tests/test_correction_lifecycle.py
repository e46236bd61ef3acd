"""The correction lifecycle: submit -> job -> status, reconciliation after a lost daemon, concurrent retries."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import anyio
import pytest
from mcp import Client

from amygdala.dream.corrections import CorrectionLifecycle
from amygdala.memory_graph import MemoryGraph
from amygdala.training.schemas import JobResult, RollbackResult, TrainJob, WorkerUnavailable


class FakeTrainer:
    """A TrainerPort that records jobs and finishes them when told (slow submit widens race windows)."""

    def __init__(self, submit_delay: float = 0.0):
        self.on_job_finished: list = []
        self.jobs: dict[str, JobResult] = {}
        self.submitted: list[TrainJob] = []
        self.submit_delay = submit_delay
        self._lock = threading.Lock()

    def submit(self, job: TrainJob) -> str:
        time.sleep(self.submit_delay)
        with self._lock:
            job_id = f"job-{len(self.submitted)}"
            self.submitted.append(job)
            self.jobs[job_id] = JobResult(job_id=job_id, state="queued", examples=len(job.examples))
        return job_id

    def job(self, job_id: str) -> JobResult:
        if job_id not in self.jobs:
            raise KeyError(job_id)
        return self.jobs[job_id]

    def finish(self, job_id: str, state: str = "done", steps: int = 1, error: str | None = None) -> None:
        res = JobResult(job_id=job_id, state=state, steps_applied=steps, total_steps=max(steps, 1), error=error)
        self.jobs[job_id] = res
        for hook in self.on_job_finished:
            hook(res)

    def rollback(self, job_id: str, timeout: float | None = None) -> RollbackResult:
        ids = list(self.jobs)
        return RollbackResult(job_id=job_id, restored_tensors=3, undone_jobs=ids[ids.index(job_id):], weights_version=2)


@pytest.fixture
def graph(tmp_path):
    with MemoryGraph(tmp_path / "g") as g:
        yield g


def test_train_now_job_done_marks_trained_with_the_job_id(graph, tiny_lm):
    tr = FakeTrainer()
    life = CorrectionLifecycle(graph, tiny_lm.tokenizer, tr)
    out = life.submit("User: is it safe?\nAssistant:", " Let me check.", " Yes.", train_now=True)
    assert out.created and out.job_id == "job-0" and out.loss == "orpo" and out.correction.status == "queued"
    assert graph.get(out.correction.id).job_id == "job-0"
    ex = tr.submitted[0].examples[0]
    assert ex.context_ids[0] == tiny_lm.tokenizer.bos_token_id and ex.rejected_ids and ex.loss == "orpo"
    tr.finish("job-0")
    c = graph.get(out.correction.id)
    assert c.status == "trained" and c.job_id == "job-0"
    assert [h.status for h in c.history] == ["pending", "queued", "trained"]
    tr.finish("job-0")  # a repeated event changes nothing
    assert len(graph.get(out.correction.id).history) == 3


@pytest.mark.parametrize("state,steps", [("failed", 0), ("cancelled", 0), ("done", 0)])
def test_failed_cancelled_or_empty_job_returns_to_pending(graph, tiny_lm, state, steps):
    tr = FakeTrainer()
    life = CorrectionLifecycle(graph, tiny_lm.tokenizer, tr)
    out = life.submit("ctx", " pref", train_now=True)
    assert out.loss == "sft"
    tr.finish(out.job_id, state=state, steps=steps, error="worker died" if state == "failed" else None)
    c = graph.get(out.correction.id)
    assert c.status == "pending" and c.job_id is None
    assert "did not train it" in c.history[-1].note
    # and it can be queued again
    again = life.submit("ctx", " pref", train_now=True)
    assert again.job_id == "job-1"


def test_rollback_marks_trained_corrections_of_undone_jobs(graph, tiny_lm):
    tr = FakeTrainer()
    life = CorrectionLifecycle(graph, tiny_lm.tokenizer, tr)
    a = life.submit("a", " pa", " ra", train_now=True)
    b = life.submit("b", " pb", " rb", train_now=True)
    c = life.submit("c", " pc", " rc", train_now=True)
    for j in ("job-0", "job-1", "job-2"):
        tr.finish(j)
    res = life.rollback("job-1")
    assert res.undone_jobs == ["job-1", "job-2"]
    assert graph.get(a.correction.id).status == "trained"
    assert graph.get(b.correction.id).status == "rolled_back"
    assert graph.get(c.correction.id).status == "rolled_back"


def test_reconcile_returns_corrections_of_a_lost_job_to_pending(tmp_path, tiny_lm):
    """kill -9 during a job: the restarted daemon's new worker knows none of the old jobs."""
    with MemoryGraph(tmp_path / "g") as g:
        old = CorrectionLifecycle(g, tiny_lm.tokenizer, FakeTrainer())
        ids = [old.submit(f"ctx {i}", f" p{i}", train_now=True).correction.id for i in range(3)]
        assert g.stats().corrections_by_status == {"queued": 3}
    with MemoryGraph(tmp_path / "g") as g:  # restart: fresh worker, empty job table
        fresh = FakeTrainer()
        life = CorrectionLifecycle(g, tiny_lm.tokenizer)
        returned = life.attach(fresh)
        assert sorted(returned) == sorted(ids)
        assert g.stats().corrections_by_status == {"pending": 3}
        assert all("was lost" in g.get(i).history[-1].note for i in ids)
        # without any worker (--no-train) reconcile does the same
        life2 = CorrectionLifecycle(g, tiny_lm.tokenizer, FakeTrainer())
        life2.queue(ids[0])
        assert CorrectionLifecycle(g, tiny_lm.tokenizer).reconcile() == [ids[0]]


def test_reconcile_applies_an_outcome_that_finished_unheard(graph, tiny_lm):
    tr = FakeTrainer()
    life = CorrectionLifecycle(graph, tiny_lm.tokenizer, tr)
    out = life.submit("ctx", " p", " r", train_now=True)
    tr.jobs["job-0"] = JobResult(job_id="job-0", state="done", steps_applied=2)  # finished, hook not called
    assert life.reconcile() == []
    assert graph.get(out.correction.id).status == "trained"


def test_concurrent_retries_with_one_key_give_one_correction_and_one_job(graph, tiny_lm):
    tr = FakeTrainer(submit_delay=0.05)  # a slow submit widens the window a naive check-then-queue would race in
    life = CorrectionLifecycle(graph, tiny_lm.tokenizer, tr)
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda _: life.submit("User: ok?\nAssistant:", " Checking.", " Sure.", idempotency_key="retry-1",
                                                   train_now=True), range(8)))
    assert len({o.correction.id for o in outs}) == 1
    assert sum(o.created for o in outs) == 1
    assert len(tr.submitted) == 1 and sum(o.loss is not None for o in outs) == 1
    assert graph.stats().corrections_by_status == {"queued": 1}


def test_train_now_without_worker_stores_nothing(graph, tiny_lm):
    life = CorrectionLifecycle(graph, tiny_lm.tokenizer)
    with pytest.raises(WorkerUnavailable, match="--no-train"):
        life.submit("c", " p", train_now=True)
    assert graph.stats().corrections_by_status == {}


def test_submit_failure_to_queue_keeps_the_correction_and_a_retry_queues_it(graph, tiny_lm):
    class Down(FakeTrainer):
        fail = True

        def submit(self, job):
            if self.fail:
                raise WorkerUnavailable("training worker is restarting")
            return super().submit(job)

    tr = Down()
    life = CorrectionLifecycle(graph, tiny_lm.tokenizer, tr)
    first = life.submit("c", " p", idempotency_key="k", train_now=True)
    assert first.created and first.job_id is None and "not queued" in first.message
    assert graph.get(first.correction.id).status == "pending"
    tr.fail = False
    again = life.submit("c", " p", idempotency_key="k", train_now=True)
    assert not again.created and again.job_id == "job-0" and graph.get(first.correction.id).status == "queued"


def test_mcp_concurrent_submit_correction_calls(tmp_path, tiny_lm):
    """Through the MCP tool: concurrent retries with one key, one stored correction, one job."""
    from amygdala.server.mcp_server import build_mcp
    from tests.server_fixture import build_tiny_readout, tiny_services

    svc = tiny_services(tiny_lm, tmp_path, build_tiny_readout(tiny_lm, tmp_path / "r"))
    tr = FakeTrainer(submit_delay=0.05)
    svc.attach_trainer(tr)
    try:
        async def go():
            results = []
            async with Client(build_mcp(svc)) as c:
                async def one():
                    results.append(await c.call_tool("submit_correction", {
                        "context": "User: deploy?\nAssistant:", "preferred": " After the tests pass.",
                        "rejected": " Deploying now.", "idempotency_key": "same", "train_now": True}))

                async with anyio.create_task_group() as tg:
                    for _ in range(6):
                        tg.start_soon(one)
            return results

        results = anyio.run(go)
        assert all(not r.is_error for r in results), [r.content for r in results]
        outs = [r.structured_content for r in results]
        assert len({o["correction_id"] for o in outs}) == 1
        assert sum(not o["duplicate"] for o in outs) == 1
        assert len(tr.submitted) == 1
        tr.finish("job-0")
        assert svc.graph.stats().corrections_by_status == {"trained": 1}
    finally:
        svc.close()


class InstantTrainer(FakeTrainer):
    """A job that finishes inside submit: its hooks run before mark_queued records who it holds."""

    def submit(self, job: TrainJob) -> str:
        job_id = super().submit(job)
        self.finish(job_id)
        return job_id


def test_a_job_that_finishes_before_mark_queued_still_marks_its_correction_trained(graph, tiny_lm):
    tr = InstantTrainer()
    life = CorrectionLifecycle(graph, tiny_lm.tokenizer, tr)
    out = life.submit("User: ship it?\nAssistant:", " Not before the tests pass.", " Shipping now.", train_now=True)
    c = graph.get(out.correction.id)
    assert c.status == "trained" and c.job_id == "job-0", c.status
    assert [h.status for h in c.history] == ["pending", "queued", "trained"]
    assert out.correction.status == "trained"
