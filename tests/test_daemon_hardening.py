"""The daemon under kills, a second owner and bad requests: SIGTERM syncs, one owner per home, one auth rule."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import anyio
import httpx
import pytest
from mcp import Client
from safetensors.torch import load_file

from tests.test_server_transports import Daemon, amygdala_cmd, free_port, served  # noqa: F401 (fixture)

REPO = str(Path(__file__).resolve().parent.parent)


@pytest.fixture
def own_model(tmp_path, tiny_model_dir):
    """A private copy of the tiny model: checkpoint sync writes into it."""
    target = tmp_path / "model"
    shutil.copytree(tiny_model_dir, target)
    return target


def _env() -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("AMYGDALA_TOKEN", None)
    return env


def test_sigterm_after_training_leaves_the_trained_weights_on_disk(served, tmp_path, own_model):  # noqa: F811
    before = {k: v.clone() for k, v in load_file(str(own_model / "model.safetensors")).items()}  # load_file maps the file
    d = Daemon({**served, "model": str(own_model)}, tmp_path, extra=["--sync-delay", "3600"])  # no timed sync: only the shutdown one
    try:
        d.wait_ready(timeout=180)

        async def go():
            async with Client(d.url + "/mcp") as c:
                r = await c.call_tool("submit_correction", {"context": "User: ship it?\nAssistant:", "preferred": " Not before the tests pass.",
                                                            "rejected": " Shipping now.", "train_now": True})
                assert not r.is_error, r.content
                for _ in range(600):
                    st = (await c.call_tool("train_status", {})).structured_content
                    if st["worker"] and st["worker"]["jobs_finished"] == 1:
                        return st
                    await anyio.sleep(0.2)
                raise AssertionError(f"job never finished: {st}")

        st = anyio.run(go)
        assert st["corrections"] == {"trained": 1}
        d.proc.send_signal(signal.SIGTERM)
        rc = d.proc.wait(120)
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
    log = d.log.read_text()
    assert rc == 0, log[-3000:]
    assert "shut down cleanly" in log, log[-3000:]
    after = load_file(str(own_model / "model.safetensors"))
    changed = [k for k in before if not (before[k] == after[k]).all()]
    assert changed, "the final sync on SIGTERM wrote the trained weights into the checkpoint"
    assert not (own_model / ".amygdala-sync.journal").exists()


def test_a_second_daemon_on_one_home_refuses_naming_the_first(served, tmp_path):  # noqa: F811
    first = Daemon(served, tmp_path, extra=["--no-train"])
    try:
        first.wait_ready()
        p = subprocess.run([*amygdala_cmd(), "serve", "--port", str(free_port()), "--model", served["model"], "--readout",
                            served["readout"], "--home", str(tmp_path / "h"), "--no-train"],
                           cwd=REPO, capture_output=True, text=True, timeout=120, env=_env())
        assert p.returncode == 2, p.stderr
        assert f"pid {first.proc.pid}" in p.stderr and "owned by another amygdala daemon" in p.stderr, p.stderr
        assert first.url in p.stderr  # it says where the owner serves
        p = subprocess.run([*amygdala_cmd(), "train", "server", "--port", str(free_port()), "--model", served["model"],
                            "--home", str(tmp_path / "h")], cwd=REPO, capture_output=True, text=True, timeout=120, env=_env())
        assert p.returncode == 2 and f"pid {first.proc.pid}" in p.stderr, p.stderr
    finally:
        first.stop()
    # the kernel drops the lock with its holder: the home is free again
    again = Daemon(served, tmp_path, extra=["--no-train"])
    try:
        again.wait_ready()
    finally:
        again.stop()


def test_a_killed_daemon_leaves_the_home_free(served, tmp_path):  # noqa: F811
    d = Daemon(served, tmp_path, extra=["--no-train"])
    d.wait_ready()
    d.proc.kill()
    d.proc.wait(30)
    d2 = Daemon(served, tmp_path, extra=["--no-train"])
    try:
        d2.wait_ready()
    finally:
        d2.stop()


def test_bodies_over_the_limit_get_413_chunked_too(served, tmp_path):  # noqa: F811
    d = Daemon(served, tmp_path, extra=["--no-train"])
    try:
        d.wait_ready()

        def chunks():
            for _ in range(5):
                yield b"x" * (1024 * 1024)

        r = httpx.post(d.url + "/mcp", content=chunks(), headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 413 and "over the limit" in r.json()["error"]
        r = httpx.post(d.url + "/train", content=chunks(), timeout=30)
        assert r.status_code in (404, 413)  # --no-train: no /train route, but never a 500
        small = httpx.post(d.url + "/mcp", content=iter([b"{}"]), headers={"content-type": "application/json"}, timeout=30)
        assert small.status_code < 500
    finally:
        d.stop()


def test_401_says_which_token_to_set_and_clients_send_it(served, tmp_path):  # noqa: F811
    token = "t0ken-xyz"
    d = Daemon(served, tmp_path, token=token)
    try:
        d.wait_ready(timeout=180)
        r = httpx.get(d.url + "/train/status", timeout=5)
        assert r.status_code == 401 and "--token" in r.json()["error"] and "AMYGDALA_TOKEN" in r.json()["error"]
        r = httpx.get(d.url + "/train/status", headers={"Authorization": "Bearer nope"}, timeout=5)
        assert r.status_code == 401 and "wrong bearer token" in r.json()["error"]
        p = subprocess.run([*amygdala_cmd(), "train", "status", "--url", d.url], cwd=REPO, capture_output=True, text=True,
                           timeout=60, env=_env())
        assert p.returncode == 1 and "pass --token or set AMYGDALA_TOKEN" in p.stderr, p.stderr
        p = subprocess.run([*amygdala_cmd(), "train", "status", "--url", d.url, "--token", token], cwd=REPO,
                           capture_output=True, text=True, timeout=60, env=_env())
        assert p.returncode == 0 and '"worker_alive"' in p.stdout, p.stderr
        p = subprocess.run([*amygdala_cmd(), "train", "status", "--url", d.url], cwd=REPO, capture_output=True, text=True,
                           timeout=60, env={**_env(), "AMYGDALA_TOKEN": token})
        assert p.returncode == 0, p.stderr
    finally:
        d.stop()


def test_train_server_refuses_a_non_loopback_bind_without_token(served, tmp_path):  # noqa: F811
    p = subprocess.run([*amygdala_cmd(), "train", "server", "--host", "0.0.0.0", "--model", served["model"],
                        "--home", str(tmp_path / "h")], cwd=REPO, capture_output=True, text=True, timeout=60, env=_env())
    assert p.returncode == 2 and "without a bearer token" in p.stderr, p.stderr


def test_sigterm_during_start_up_shuts_down_cleanly(served, tmp_path):  # noqa: F811
    d = Daemon(served, tmp_path, extra=["--no-train"])
    try:
        d.wait_ready()
        t0 = time.time()
        d.proc.send_signal(signal.SIGTERM)
        rc = d.proc.wait(60)
        assert rc == 0 and time.time() - t0 < 30, d.log.read_text()[-2000:]
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
