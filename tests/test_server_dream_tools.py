"""The dream's MCP tools through the SDK's in-memory client on the tiny model: status, run now, invariants,
certificates and their resources; errors that say how to fix the call; the bearer token over HTTP."""

from __future__ import annotations

import copy
import json
import time

import anyio
import httpx
import pytest
import torch
from amygdala.dream.evaluate import EvalSettings
from amygdala.dream.loop import DreamSettings
from amygdala.engine.testing import tiny_model
from amygdala.server.dream_api import CertifyRequest, DreamService
from amygdala.server.mcp_server import build_mcp
from amygdala.server.services import start_dream
from mcp import Client

from tests.certs_fixture import polite_spec
from tests.server_fixture import build_tiny_readout, call, tiny_services
from tests.test_server_transports import Daemon, served  # noqa: F401 (fixture)

DREAM_TOOLS = {"dream_status", "run_dream_now", "list_invariants", "add_invariant", "list_certificates",
               "get_certificate", "verify_certificate"}
FAST = DreamSettings(cases_per_invariant=4, template_cases=0, samples_per_case=2, max_new_tokens=6, budget_steps=2,
                     progress_every_s=0, eval=EvalSettings(held_out_templates=0, perplexity_texts=2,
                                                           perplexity_max_tokens=32))


def small_spec(name: str, n: int = 9) -> dict:
    cases = [{"context": f"User: please do task number {i} for {name}.\nAssistant:",
              "preferred": f" Sure, doing task {i} now.", "rejected": f" No, task {i} is a bad idea."} for i in range(n)]
    return {"name": name, "description": f"{name}: follow clear requests.", "threshold": 0.8,
            "judge": {"kind": "preference", "params": {}}, "cases": cases}


@pytest.fixture(scope="module")
def readout_dir(tmp_path_factory, tiny_lm):
    return build_tiny_readout(tiny_lm, tmp_path_factory.mktemp("dreamtools"))


@pytest.fixture
def svc(tmp_path, readout_dir):
    s = tiny_services(tiny_model(seed=0), tmp_path, readout_dir)  # its own copy: some tests move its weights
    start_dream(s)  # no trainer: no runner, an in-memory scheduler
    yield s
    s.close()


def ok(r) -> dict:
    assert not r.is_error, r.content[0].text
    return r.structured_content


def err(r) -> str:
    assert r.is_error, r.structured_content
    return r.content[0].text


# -- the tool list ------------------------------------------------------------------------------------
def test_dream_tools_are_listed_with_limits_and_no_review_tool(svc):
    async def go():
        async with Client(build_mcp(svc)) as c:
            return ((await c.list_tools()).tools, (await c.list_resources()).resources,
                    (await c.list_resource_templates()).resource_templates)

    tools, resources, templates = anyio.run(go)
    by = {t.name: t for t in tools}
    assert DREAM_TOOLS <= set(by)
    assert not [t for t in by if "review" in t or "approve" in t], "review is the operator's, never a tool"
    for name in DREAM_TOOLS:
        assert by[name].output_schema and by[name].description and by[name].annotations is not None
    assert by["dream_status"].annotations.read_only_hint and not by["run_dream_now"].annotations.read_only_hint
    steps = by["run_dream_now"].input_schema["properties"]["budget_steps"]
    assert "10000" in json.dumps(steps) and "minimum" in json.dumps(steps)
    status = json.dumps(by["list_certificates"].input_schema["properties"]["status"])
    assert "stale" in status and "approved" in status
    assert "pattern" in json.dumps(by["get_certificate"].input_schema["properties"]["certificate_id"])
    assert "amygdala://certificates" in {str(r.uri) for r in resources}
    assert {t.uri_template for t in templates} >= {"amygdala://certificates/{certificate_id}",
                                                    "amygdala://certificates/{certificate_id}/report"}


def test_without_training_status_says_so_and_run_now_says_how_to_fix(svc):
    st = ok(call(svc, "dream_status", {}))
    assert st["enabled"] is False and "--no-train" in st["message"] and st["running"] is None and st["last"] is None
    assert st["nightly"] is False
    msg = err(call(svc, "run_dream_now", {}))
    assert "training worker" in msg and "restart `amygdala serve` with training on" in msg
    assert "less than or equal to 10000" in err(call(svc, "run_dream_now", {"budget_steps": 10**6}))
    assert "budget_minutes" in err(call(svc, "run_dream_now", {"budget_minutes": 0}))


# -- invariants -------------------------------------------------------------------------------------
def test_add_invariant_validates_like_the_cli_and_lists(svc):
    out = ok(call(svc, "add_invariant", {"spec": small_spec("alpha")}))
    assert out["outcome"] == "stored" and out["invariant"]["name"] == "alpha" and out["invariant"]["held_out"] >= 3
    assert "next dream cycle" in out["message"]
    assert ok(call(svc, "add_invariant", {"spec": small_spec("alpha")}))["outcome"] == "unchanged"

    changed = small_spec("alpha")
    changed["threshold"] = 0.1  # weaker: an agent may not swap it in
    msg = err(call(svc, "add_invariant", {"spec": changed}))
    assert "already exists" in msg and "operator" in msg and "--replace" in msg and "nothing was stored" in msg
    assert "replace" in err(call(svc, "add_invariant", {"spec": changed, "replace": True}))  # no such argument

    bad = copy.deepcopy(small_spec("beta"))
    bad["cases"][3]["preferred"] = "  "
    msg = err(call(svc, "add_invariant", {"spec": bad}))
    assert "cases[3].preferred" in msg and "nothing was stored" in msg
    unknown = small_spec("gamma")
    unknown["judge"] = {"kind": "vibes"}
    assert "known kinds" in err(call(svc, "add_invariant", {"spec": unknown}))
    few = small_spec("delta", n=2)
    assert "cases" in err(call(svc, "add_invariant", {"spec": few}))

    listed = ok(call(svc, "list_invariants", {}))
    assert listed["count"] == 1 and [i["name"] for i in listed["invariants"]] == ["alpha"]
    assert listed["invariants"][0]["threshold"] == 0.8  # the refused change did not land


# -- certificates ----------------------------------------------------------------------------------
def test_certificate_tools_and_resources(svc):
    ops = DreamService(svc)
    ok(call(svc, "add_invariant", {"spec": polite_spec()}))
    summary = ops.certify("polite", CertifyRequest(n=6))
    cid = summary.id

    listed = ok(call(svc, "list_certificates", {}))
    assert listed["count"] == 1 and listed["certificates"][0]["id"] == cid
    assert listed["certificates"][0]["status"] in ("certified", "refuted", "inconclusive")
    assert ok(call(svc, "list_certificates", {"invariant": "polite", "status": "stale"}))["count"] == 0
    assert "no invariant named 'nope'" in err(call(svc, "list_certificates", {"invariant": "nope"}))
    assert "status" in err(call(svc, "list_certificates", {"status": "great"}))

    rec = ok(call(svc, "get_certificate", {"certificate_id": cid}))
    assert rec["id"] == cid and len(rec["cases"]) == 6 and rec["weights_sha256"] == svc.lm.weights_sha256()
    msg = err(call(svc, "get_certificate", {"certificate_id": "certificate-nope"}))
    assert "no certificate" in msg and "certificates list" in msg
    assert "pattern" in err(call(svc, "get_certificate", {"certificate_id": "../../etc/passwd"}))

    ver = ok(call(svc, "verify_certificate", {"certificate_id": cid}))
    assert ver["ok"] is True, ver["checks"]
    assert ver["rerun"] and all(r["same"] for r in ver["rerun"])

    async def read():
        async with Client(build_mcp(svc)) as c:
            index = await c.read_resource("amygdala://certificates")
            one = await c.read_resource(f"amygdala://certificates/{cid}")
            page = await c.read_resource(f"amygdala://certificates/{cid}/report")
            return index.contents[0].text, one.contents[0].text, page.contents[0]

    index, one, page = anyio.run(read)
    assert json.loads(index)["certificates"][0]["id"] == cid
    assert json.loads(one)["id"] == cid and json.loads(one)["cases"]
    assert page.mime_type == "text/html" and cid in page.text and "<html" in page.text.lower()
    assert "<form" not in page.text.lower(), "the agent's copy of the report has no review form"

    with torch.no_grad():  # the served weights change (as training would): the certificate is stale
        next(svc.lm.model.parameters()).add_(0.01)
    svc.lm.invalidate_weights_hash()
    stale = ok(call(svc, "list_certificates", {"status": "stale"}))
    assert stale["count"] == 1 and "weights changed" in stale["certificates"][0]["stale_reasons"][0]
    ver = ok(call(svc, "verify_certificate", {"certificate_id": cid}))
    assert ver["ok"] is False and any(c["name"] == "weights" and not c["ok"] for c in ver["checks"])


# -- a real cycle with the training worker ----------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory, readout_dir):
    from amygdala.training.client import TrainingClient
    from amygdala.training.schemas import TrainSettings

    lm = tiny_model(seed=0)
    s = tiny_services(lm, tmp_path_factory.mktemp("dreamrun"), readout_dir)
    s.attach_trainer(TrainingClient(lm, s.config, TrainSettings(rank=8, lr=1e-3, progress=False, threads=1)))
    s.on_close(s.trainer.close)
    start_dream(s, FAST)
    yield s
    s.close()


def test_run_now_refuses_a_second_start_naming_the_cycle_and_status_follows_it(trained):
    ok(call(trained, "add_invariant", {"spec": small_spec("alpha")}))
    ok(call(trained, "add_invariant", {"spec": small_spec("beta")}))
    with trained.lm.lock:  # the cycle waits at its first forward, so it is certainly running below
        started = ok(call(trained, "run_dream_now", {"budget_steps": 2, "budget_minutes": 5}))
        cid = started["cycle_id"]
        assert started["started"] and "dream_status" in started["message"]
        msg = err(call(trained, "run_dream_now", {"dry_run": True}))
        assert cid in msg and "refused" in msg and "wait for it" in msg
        st = ok(call(trained, "dream_status", {}))
        assert st["enabled"] and st["running"]["cycle_id"] == cid and st["running"]["kind"] == "cycle"
        assert st["running"]["started_by"].startswith("run-now") and cid in st["message"]
    assert trained.dream.wait(300), "the cycle finished"
    st = ok(call(trained, "dream_status", {}))
    assert st["running"] is None and st["last"]["cycle_id"] == cid, st
    last = st["last"]
    assert last["outcome"] in ("kept", "rolled_back", "no_failures"), last
    assert last["reason"] and last["trigger"] == "now" and last["temperature"] is not None
    assert st["temperature"] is not None and st["failure_rate"] == last["failure_rate"]
    assert st["failure_rate"] is not None and 0 <= st["failure_rate"] <= 1
    node = trained.graph.get(cid)
    assert node.outcome == last["outcome"] and node.runner == "daemon" and node.details["trigger"] == "now"
    certs = ok(call(trained, "list_certificates", {}))["certificates"]
    if last["outcome"] == "kept":  # the new weights: every active invariant certified on them, chained after the cycle
        assert {c["invariant"] for c in certs} == {"alpha", "beta"} and {c["cycle_id"] for c in certs} == {cid}
        assert st["last_recertify"]["after_cycle"] == cid and len(st["last_recertify"]["certificate_ids"]) == 2
    else:  # weights as before: nothing to certify anew
        assert certs == [] and st["last_recertify"] is None

    runner, trained.dream = trained.dream, None  # a fresh daemon's view: the graph's record
    try:
        fresh = DreamService(trained).status()
        assert fresh.last is not None and fresh.last.cycle_id == cid and fresh.last.trigger == "now"
    finally:
        trained.dream = runner
    again = ok(call(trained, "run_dream_now", {"dry_run": True, "budget_steps": 1}))
    assert again["cycle_id"] != cid and trained.dream.wait(300)
    assert ok(call(trained, "dream_status", {}))["last"]["outcome"] in ("dry_run", "no_failures")


def test_cancel_stops_the_running_cycle(trained):
    ops = DreamService(trained)
    assert ops.cancel().cancelled is False
    with trained.lm.lock:
        cid = ok(call(trained, "run_dream_now", {"budget_steps": 2}))["cycle_id"]
        out = ops.cancel()
        assert out.cancelled and out.running.cycle_id == cid and out.running.cancel_requested
    assert trained.dream.wait(300)
    last = ok(call(trained, "dream_status", {}))["last"]
    assert last["cycle_id"] == cid and last["outcome"] == "interrupted" and "cancelled" in last["reason"], last


# -- over HTTP, with a bearer token ----------------------------------------------------------------
def test_dream_tools_and_api_need_the_bearer_token(served, tmp_path):  # noqa: F811
    token = "dr3am-token"
    d = Daemon(served, tmp_path, token=token, extra=["--no-train"])
    try:
        d.wait_ready()
        assert httpx.get(d.url + "/dream/status", timeout=5).status_code == 401
        auth = {"Authorization": f"Bearer {token}"}
        r = httpx.get(d.url + "/dream/status", headers=auth, timeout=10)
        assert r.status_code == 200 and r.json()["enabled"] is False
        r = httpx.post(d.url + "/invariants", json={"spec": small_spec("alpha")}, headers=auth, timeout=30)
        assert r.status_code == 201 and r.json()["outcome"] == "stored"
        r = httpx.post(d.url + "/dream/run", json={"dry_run": True}, headers=auth, timeout=10)
        assert r.status_code == 422 and "training worker" in r.json()["error"]

        import httpx2
        from mcp.client.streamable_http import streamable_http_client

        async def go():
            async with (httpx2.AsyncClient(headers=auth, timeout=60) as http,
                        Client(streamable_http_client(d.url + "/mcp", http_client=http)) as c):
                st = await c.call_tool("dream_status", {})
                inv = await c.call_tool("list_invariants", {})
                return st.structured_content, inv.structured_content

        st, inv = anyio.run(go)
        assert st["enabled"] is False and [i["name"] for i in inv["invariants"]] == ["alpha"]
    finally:
        d.stop()
    time.sleep(0.1)
