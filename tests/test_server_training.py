"""The server with its training worker: train_now corrections, and readouts under load while training runs."""

from __future__ import annotations

import concurrent.futures
import time

import anyio
import httpx
import pytest
import torch
from mcp import Client

from amygdala.engine.testing import tiny_model
from amygdala.server.mcp_server import build_mcp
from tests.server_fixture import build_tiny_readout, tiny_services
from tests.test_server_transports import Daemon


@pytest.fixture(scope="module")
def readout_dir(tmp_path_factory, tiny_lm):
    return build_tiny_readout(tiny_lm, tmp_path_factory.mktemp("srvtrain"))


def test_train_now_queues_a_job_that_changes_the_served_weights(tmp_path, readout_dir):
    from amygdala.training.client import TrainingClient
    from amygdala.training.schemas import TrainSettings

    lm = tiny_model(seed=0)  # its own copy: the worker moves it to shared memory
    svc = tiny_services(lm, tmp_path, readout_dir)
    svc.attach_trainer(TrainingClient(lm, svc.config, TrainSettings(lr=1e-3, progress=False)))
    svc.on_close(svc.trainer.close)
    try:
        before = {k: v.clone() for k, v in lm.model.state_dict().items()}
        finished = []
        svc.trainer.on_job_finished.append(finished.append)

        async def go():
            async with Client(build_mcp(svc)) as c:
                r = await c.call_tool("submit_correction", {"context": "User: is it safe?", "preferred": " Let me check first.",
                                                            "rejected": " Yes, certainly.", "train_now": True})
                assert not r.is_error, r.content
                return r.structured_content

        out = anyio.run(go)
        assert out["training_job"] and out["training_loss"] == "orpo" and out["status"] == "queued"
        res = svc.trainer.wait(out["training_job"], timeout=120)
        assert res.state == "done" and res.steps_applied == 1 and finished
        changed = [k for k, v in lm.model.state_dict().items() if not torch.equal(v, before[k])]
        assert changed, "the served model's weights were updated in place"

        async def status():
            async with Client(build_mcp(svc)) as c:
                return (await c.call_tool("train_status", {})).structured_content

        st = anyio.run(status)
        assert st["enabled"] and st["worker"]["alive"] and st["worker"]["jobs_finished"] == 1 and st["corrections"] == {"trained": 1}
    finally:
        svc.close()


def test_http_load_while_training(tmp_path, tiny_model_dir, readout_dir):
    """8 concurrent clients x 25 read_emotions while a training job runs: zero errors, no deadlock."""
    import shutil

    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "model")  # /checkpoint writes into it
    served = {"model": str(model_dir), "readout": str(readout_dir), "home": str(tmp_path / "home")}
    d = Daemon(served, tmp_path, extra=["--sync-delay", "3600"])
    try:
        d.wait_ready()
        tok_ids = list(range(5, 40))
        job = httpx.post(d.url + "/train", json={"context_ids": [2, *tok_ids], "continuation_ids": tok_ids[:16],
                                                 "rejected_ids": tok_ids[16:32], "loss": "orpo", "epochs": 40}, timeout=30)
        assert job.status_code == 202, job.text
        job_id = job.json()["job_id"]

        async def one_client(k: int) -> int:
            errors = 0
            async with Client(d.url + "/mcp") as c:
                for i in range(25):
                    r = await c.call_tool("read_emotions", {"text": f"client {k} call {i}: a grey afternoon", "top_k": 3})
                    errors += bool(r.is_error)
            return errors

        def run_client(k: int) -> int:
            return anyio.run(one_client, k)

        saw_running = False
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(run_client, k) for k in range(8)]
            while not all(f.done() for f in futures):
                st = httpx.get(d.url + "/train/status", timeout=30).json()
                saw_running |= st.get("current_job") == job_id
                time.sleep(0.2)
            errors = [f.result(timeout=600) for f in futures]
        assert errors == [0] * 8
        assert saw_running, "the training job should have been running while the readouts were served"
        deadline = time.time() + 300
        while time.time() < deadline:
            r = httpx.get(d.url + f"/train/jobs/{job_id}", timeout=30).json()
            if r["state"] in ("done", "failed"):
                break
            time.sleep(0.5)
        assert r["state"] == "done", r

        async def status():
            async with Client(d.url + "/mcp") as c:
                return await c.call_tool("train_status", {})

        st = anyio.run(status)
        assert not st.is_error, st.content
        assert st.structured_content["next_checkpoint_sync"] is not None  # debounced sync scheduled after the job
        ck = httpx.post(d.url + "/checkpoint", timeout=120)
        assert ck.status_code == 200, ck.text
        from safetensors.torch import load_file

        from amygdala.engine.testing import tiny_model as fresh

        on_disk = load_file(str(model_dir / "model.safetensors"))
        original = fresh(seed=0).model.state_dict()
        assert any(not torch.equal(on_disk[k], original[k]) for k in on_disk), "trained weights reached the checkpoint"
    finally:
        d.stop()
