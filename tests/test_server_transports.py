"""A real MCP client against a subprocess server: over stdio, and over HTTP (with and without token)."""

from __future__ import annotations

import os
import socket
import subprocess
import shutil
import sys
import time
from pathlib import Path

import anyio
import httpx
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters

from tests.server_fixture import build_tiny_readout

EXPECTED_TOOLS = {"read_emotions", "test_steering", "submit_correction", "list_concepts", "train_status",
                  "dream_status", "run_dream_now", "list_invariants", "add_invariant", "list_certificates",
                  "get_certificate", "verify_certificate"}


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_lm, _tiny_model_master):
    root = tmp_path_factory.mktemp("transport")
    tiny_model_dir = shutil.copytree(_tiny_model_master, root / "model")  # the daemon may sync into it
    return {"model": str(tiny_model_dir), "readout": str(build_tiny_readout(tiny_lm, root)), "home": str(root / "home")}


def amygdala_cmd() -> list[str]:
    return [sys.executable, "-m", "amygdala.server.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def exercise(client: Client) -> None:
    tools = {t.name for t in (await client.list_tools()).tools}
    assert tools == EXPECTED_TOOLS
    r = await client.call_tool("read_emotions", {"text": "soft hands by the window", "top_k": 2})
    assert not r.is_error and len(r.structured_content["top"]) == 2
    r = await client.call_tool("list_concepts", {})
    assert r.structured_content["count"] == 6
    r = await client.call_tool("test_steering", {"prompt": "The evening", "concepts": {"tender": 0.5}, "max_new_tokens": 4})
    assert not r.is_error and "tender" in r.structured_content["delta"]
    r = await client.call_tool("submit_correction", {"context": "c", "preferred": "p", "idempotency_key": "same"})
    r2 = await client.call_tool("submit_correction", {"context": "c", "preferred": "p", "idempotency_key": "same"})
    assert r2.structured_content["duplicate"] and r.structured_content["correction_id"] == r2.structured_content["correction_id"]
    r = await client.call_tool("train_status", {})
    assert r.structured_content["enabled"] is False and r.structured_content["corrections"] == {"pending": 1}
    bad = await client.call_tool("read_emotions", {"text": ""})
    assert bad.is_error


def test_stdio_client(served, tmp_path):
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "amygdala.server.cli", "serve", "--transport", "stdio", "--no-train", "--model", served["model"],
                                      "--readout", served["readout"], "--home", str(tmp_path / "h")],
        cwd=str(Path(__file__).resolve().parent.parent), env={**os.environ, "PYTHONUNBUFFERED": "1"})

    async def go():
        async with Client(params) as c:
            await exercise(c)

    anyio.run(go)


class Daemon:
    def __init__(self, served, tmp_path: Path, host="127.0.0.1", token: str | None = None, extra=()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("AMYGDALA_TOKEN", None)
        args = [*amygdala_cmd(), "serve", "--transport", "http", "--host", host, "--port", str(self.port),
                "--model", served["model"], "--readout", served["readout"], "--home", str(tmp_path / "h"), *extra]
        if token:
            args += ["--token", token]
        self.log = tmp_path / f"daemon-{self.port}.log"
        self.proc = subprocess.Popen(args, cwd=str(Path(__file__).resolve().parent.parent), env=env,
                                     stdout=subprocess.DEVNULL, stderr=self.log.open("wb"))

    def wait_ready(self, headers=None, timeout=120.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", headers=headers, timeout=2).status_code in (200, 401):
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise AssertionError(f"daemon not ready: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def test_http_daemon(served, tmp_path):
    d = Daemon(served, tmp_path, extra=["--no-train"])
    try:
        d.wait_ready()

        async def go():
            async with Client(d.url + "/mcp") as c:
                await exercise(c)

        anyio.run(go)
        big = httpx.post(d.url + "/mcp", content=b"x" * (5 * 1024 * 1024), headers={"content-type": "application/json"}, timeout=10)
        assert big.status_code == 413
    finally:
        d.stop()


def test_non_loopback_without_token_refuses_to_start(served, tmp_path):
    p = subprocess.run([*amygdala_cmd(), "serve", "--transport", "http", "--host", "0.0.0.0", "--model", served["model"],
                        "--readout", served["readout"], "--home", str(tmp_path / "h"), "--no-train"],
                       cwd=str(Path(__file__).resolve().parent.parent), capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in os.environ.items() if k != "AMYGDALA_TOKEN"})
    assert p.returncode == 2 and "without a bearer token" in p.stderr


def test_tokened_daemon_rejects_requests_without_token(served, tmp_path):
    token = "s3cret-token"
    d = Daemon(served, tmp_path, token=token, extra=["--no-train"])
    try:
        d.wait_ready()
        assert httpx.get(d.url + "/health", timeout=5).status_code == 401
        assert httpx.get(d.url + "/health", headers={"Authorization": "Bearer wrong"}, timeout=5).status_code == 401
        assert httpx.post(d.url + "/mcp", json={}, timeout=5).status_code == 401
        assert httpx.get(d.url + "/health", headers={"Authorization": f"Bearer {token}"}, timeout=5).status_code == 200

        import httpx2
        from mcp.client.streamable_http import streamable_http_client

        async def go():
            async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=60) as http:
                async with Client(streamable_http_client(d.url + "/mcp", http_client=http)) as c:
                    tools = {t.name for t in (await c.list_tools()).tools}
                    assert tools == EXPECTED_TOOLS

        anyio.run(go)
    finally:
        d.stop()
