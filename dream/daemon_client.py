"""The CLI's client for a running daemon: write commands go through the home's owner, not beside it.

`amygdala dream --once`, `amygdala certify` and `amygdala invariants add|remove` would otherwise
open the memory graph (and, for a cycle, a training worker) next to the daemon that owns the home.
When the home lock names a daemon with a URL, they send the request to it instead
(`server/dream_api.py`); the daemon runs it with its own model, worker and graph, under the same
one-cycle-at-a-time gate as the nightly schedule and the agent's tools.

Stdlib and httpx only: dream never imports server, and `--help` stays fast.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from .errors import DreamError

TOKEN_ENV = "AMYGDALA_TOKEN"


class DaemonRequestFailed(DreamError):
    """The daemon refused or could not answer; the message is the daemon's (it says how to fix it)."""

    def __init__(self, message: str, status: int | None = None):
        self.status = status
        super().__init__(message)


def base_url(holder_url: str) -> str:
    """The lock note's URL is where MCP is served (`http://host:port/mcp`); the API is at its root."""
    url = holder_url.rstrip("/")
    return url.removesuffix("/mcp")


class DaemonClient:
    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0):
        self.url = base_url(url)
        self.token = token if token is not None else (os.environ.get(TOKEN_ENV) or None)
        self.timeout = timeout

    def request(self, method: str, path: str, body: dict | None = None, *, timeout: float | None = -1.0) -> Any:
        import httpx

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        wait = self.timeout if timeout == -1.0 else timeout
        try:
            resp = httpx.request(method, self.url + path, json=body, headers=headers, timeout=wait)
        except httpx.HTTPError as exc:
            raise DaemonRequestFailed(f"cannot reach the daemon at {self.url} ({type(exc).__name__}: {exc}); it holds "
                                      "the home lock, so it may be starting or stopping: retry, or stop it") from None
        try:
            data = resp.json()
        except ValueError:
            data = {"error": resp.text[:500]}
        if resp.status_code == 401:
            hint = "pass --token or set AMYGDALA_TOKEN" if not self.token else "the token was refused: check --token / AMYGDALA_TOKEN"
            raise DaemonRequestFailed(f"the daemon at {self.url} requires its bearer token: {hint}", 401)
        if resp.status_code >= 400:
            msg = data.get("error") if isinstance(data, dict) else None
            raise DaemonRequestFailed(str(msg or f"HTTP {resp.status_code} from {self.url}{path}"), resp.status_code)
        return data

    # -- the calls the CLI makes ----------------------------------------------------------------
    def run_dream(self, *, dry_run: bool = False, budget_steps: int | None = None,
                  budget_minutes: float | None = None, seed: int | None = None) -> dict:
        return self.request("POST", "/dream/run", {"dry_run": dry_run, "budget_steps": budget_steps,
                                                   "budget_minutes": budget_minutes, "seed": seed})

    def status(self) -> dict:
        return self.request("GET", "/dream/status")

    def cycle(self, cycle_id: str) -> dict:
        return self.request("GET", f"/dream/cycles/{cycle_id}")

    def wait_cycle(self, cycle_id: str, *, poll_s: float = 1.0, timeout_s: float | None = None,
                   on_progress: Callable[[dict], None] | None = None) -> dict:
        """Poll until the cycle finished; returns its detail (with the full report when the daemon ran it)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        last_seen = None
        while True:
            st = self.status()
            running = st.get("running")
            if running and running.get("cycle_id") == cycle_id:
                key = (running.get("phase"), running.get("done"), running.get("total"))
                if on_progress is not None and key != last_seen:
                    on_progress(running)
                last_seen = key
            else:
                detail = self.cycle(cycle_id)
                if not detail.get("running"):
                    return detail
            if deadline is not None and time.monotonic() > deadline:
                raise DaemonRequestFailed(f"dream cycle {cycle_id} still running after {timeout_s:.0f} s; it goes on "
                                          "in the daemon (GET /dream/status, or the dream_status tool)")
            time.sleep(poll_s)

    def add_invariant(self, spec: dict, *, replace: bool = False) -> dict:
        return self.request("POST", "/invariants", {"spec": spec, "replace": replace})

    def remove_invariant(self, name: str) -> dict:
        return self.request("DELETE", f"/invariants/{name}")

    def certify(self, name: str, *, n: int | None = None, sequential: bool = False, seed: int = 0) -> dict:
        return self.request("POST", f"/certify/{name}", {"n": n, "sequential": sequential, "seed": seed}, timeout=None)


def daemon_for(holder: dict | None, token: str | None = None) -> DaemonClient | None:
    """A client for the home's owner when it is a daemon serving HTTP (its lock note has a URL)."""
    if not holder or not holder.get("url"):
        return None
    return DaemonClient(str(holder["url"]), token=token)
