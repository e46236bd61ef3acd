"""The write CLI commands talk to the running daemon instead of opening the graph beside it.

One daemon (tiny model, training worker on, bearer token) serves the whole module: `invariants add`,
`dream --once`, `certify` and `invariants remove` go through its HTTP API; reads stay local.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from amygdala.dream.daemon_client import base_url

from tests.test_server_transports import Daemon, amygdala_cmd, served  # noqa: F401 (fixture)

REPO = str(Path(__file__).resolve().parent.parent)
TOKEN = "cli-t0ken"
SHIPPED = ["listen", "push-back"]  # a daemon with training installs the shipped invariants, as `dream --once` does


def spec(name: str, n: int = 9, threshold: float = 0.5) -> dict:
    cases = [{"context": f"User: please do task number {i} for {name}.\nAssistant:",
              "preferred": f" Sure, doing task {i} now.", "rejected": f" No, task {i} is a bad idea."} for i in range(n)]
    return {"name": name, "description": f"{name}: follow clear requests.", "threshold": threshold,
            "judge": {"kind": "preference", "params": {}}, "cases": cases}


@pytest.fixture(scope="module")
def daemon(served, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("clidaemon")
    d = Daemon(served, root, token=TOKEN, extra=["--sync-delay", "3600"])
    d.home, d.model = root / "h", served["model"]
    try:
        d.wait_ready(timeout=180)
        yield d
    finally:
        d.stop()


def cli(d, *args: str, token: str | None = TOKEN, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "AMYGDALA_HOME": str(d.home)}
    env.pop("AMYGDALA_TOKEN", None)
    if token:
        env["AMYGDALA_TOKEN"] = token
    return subprocess.run([*amygdala_cmd(), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env,
                          check=False)


def api(d, method: str, path: str, **kw) -> httpx.Response:
    return httpx.request(method, d.url + path, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60, **kw)


def test_base_url_strips_the_mcp_path():
    assert base_url("http://127.0.0.1:8765/mcp") == "http://127.0.0.1:8765"
    assert base_url("http://127.0.0.1:8765/") == "http://127.0.0.1:8765"


def test_invariants_add_goes_through_the_daemon(daemon, tmp_path):
    path = tmp_path / "alpha.json"
    path.write_text(json.dumps(spec("alpha")))
    p = cli(daemon, "invariants", "add", str(path), token=None)
    assert p.returncode == 1 and "pass --token or set AMYGDALA_TOKEN" in p.stderr, p.stderr
    p = cli(daemon, "invariants", "add", str(path))
    assert p.returncode == 0, p.stderr
    assert "stored invariant alpha" in p.stdout and "through the daemon" in p.stdout
    names = [i["name"] for i in api(daemon, "GET", "/invariants").json()["invariants"]]
    assert names == [*SHIPPED, "alpha"]  # the daemon's graph has it: the CLI did not write beside it
    p = cli(daemon, "invariants", "list", "--json")  # reading stays local and read-only
    assert p.returncode == 0 and [r["name"] for r in json.loads(p.stdout)] == [*SHIPPED, "alpha"]

    path.write_text(json.dumps(spec("alpha", threshold=0.9)))
    p = cli(daemon, "invariants", "add", str(path))
    assert p.returncode == 2 and "already exists" in p.stderr and "--replace" in p.stderr, p.stderr
    p = cli(daemon, "invariants", "add", str(path), "--replace", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["outcome"] == "replaced", p.stderr

    bad = spec("beta")
    bad["cases"][2]["rejected"] = ""
    path.write_text(json.dumps(bad))
    p = cli(daemon, "invariants", "add", str(path))
    assert p.returncode == 2 and "cases[2].rejected" in p.stderr

    path.write_text(json.dumps(spec("beta")))
    assert cli(daemon, "invariants", "add", str(path)).returncode == 0
    p = cli(daemon, "invariants", "remove", "beta")
    assert p.returncode == 0 and "through the daemon" in p.stdout, p.stderr
    assert [i["name"] for i in api(daemon, "GET", "/invariants").json()["invariants"]] == [*SHIPPED, "alpha"]


def test_dream_once_runs_in_the_daemon_and_a_second_start_is_refused(daemon, tmp_path):
    path = tmp_path / "gamma.json"
    path.write_text(json.dumps(spec("gamma")))
    assert cli(daemon, "invariants", "add", str(path)).returncode == 0

    first = api(daemon, "POST", "/dream/run", json={"dry_run": True, "budget_minutes": 2})
    assert first.status_code == 202, first.text
    cid = first.json()["cycle_id"]
    second = api(daemon, "POST", "/dream/run", json={"budget_steps": 1})
    assert second.status_code == 409 and cid in second.json()["error"], second.text
    bad = api(daemon, "POST", "/dream/run", json={"budget_steps": 0})
    assert bad.status_code == 422 and "budget_steps" in bad.json()["error"]
    for _ in range(600):
        if api(daemon, "GET", "/dream/status").json()["running"] is None:
            break
        time.sleep(0.5)

    p = cli(daemon, "dream", "--once", "--budget-steps", "1", "--budget-minutes", "3", "--seed", "5", "--json")
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert report["outcome"] in ("kept", "rolled_back", "no_failures"), report
    assert "started in the daemon" in p.stderr
    st = api(daemon, "GET", "/dream/status").json()
    assert st["last"]["cycle_id"] == report["id"] and st["last"]["trigger"] == "cli"
    assert st["nightly"] and st["dream_at"] == "03:00" and st["next_run"]

    p = cli(daemon, "dream", "--once", "--dry-run", "--budget-minutes", "3")  # the text rendering
    assert p.returncode == 0 and p.stdout.startswith("dream cycle ") and "dream: " in p.stderr, p.stderr


def test_certify_goes_through_the_daemon(daemon, tmp_path):
    path = tmp_path / "delta.json"
    path.write_text(json.dumps(spec("delta")))
    assert cli(daemon, "invariants", "add", str(path)).returncode == 0
    p = cli(daemon, "certify", "delta", "--n", "4")
    assert p.returncode == 0, p.stderr
    assert "certified by the daemon" in p.stdout
    cid = p.stdout.split()[0]
    p = cli(daemon, "certificates", "list", "--json", "--model", daemon.model)  # read locally (hashes the model files)
    assert p.returncode == 0 and cid in p.stdout
    p = cli(daemon, "certify", "nope")
    assert p.returncode == 2 and "no active invariant named 'nope'" in p.stderr, p.stderr
