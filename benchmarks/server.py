"""Issue 9 benchmark: read_emotions over HTTP (MCP streamable HTTP) vs a direct in-process readout.

Starts `amygdala serve --transport http --no-train` on the embedded model as a subprocess, then in
one run: p50/p99 latency of read_emotions through the MCP SDK client vs `ReadoutManager.read` of
the same text in this process (target: p50 overhead under 20%), and throughput with 1, 4 and 8
concurrent clients.

`--under-load` (issue 16): the agent's calls while the model dreams. Starts the daemon with its
training worker, measures 8 concurrent MCP clients x 25 read_emotions calls idle, then starts a
dream cycle (POST /dream/run), waits until it is in its training phase and runs the same load
again, and once more after the cycle ended (the first idle round can overlap the worker's start-up);
prints p50/p95 of each, the errors (target: none), the cycle phases the load overlapped and the
cycle's outcome.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio
import httpx

from benchmarks._common import machine_line

TEXT = ("I have rewritten this function three times now and the reviewer keeps finding the same edge case. "
        "Each time I think it is finally right, another comment appears, polite and precise, and I can feel my "
        "jaw tighten before I have even finished reading it. Maybe they are right. Maybe I should slow down.")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_health(url: str, proc: subprocess.Popen, log_name: str, *, readout: bool = False, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited {proc.returncode}; see {log_name}")
        try:
            r = httpx.get(url + "/health", timeout=2)
            if r.status_code == 200 and (not readout or r.json().get("readout_ready")):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server not ready after {timeout:.0f} s; see {log_name}")


async def load(url: str, clients: int, per_client: int) -> tuple[list[float], list[str]]:
    """`clients` concurrent MCP sessions, `per_client` read_emotions each: latencies and errors."""
    from mcp import Client

    lat: list[float] = []
    errors: list[str] = []

    async def one() -> None:
        try:
            async with Client(url + "/mcp") as c:
                for _ in range(per_client):
                    t0 = time.perf_counter()
                    try:
                        res = await c.call_tool("read_emotions", {"text": TEXT, "top_k": 10})
                    except Exception as exc:  # noqa: BLE001 - counted, reported
                        errors.append(f"{type(exc).__name__}: {exc}")
                        continue
                    lat.append(time.perf_counter() - t0)
                    if res.is_error:
                        errors.append(res.content[0].text[:200])
        except Exception as exc:  # noqa: BLE001 - a session that could not open
            errors.append(f"session: {type(exc).__name__}: {exc}")

    async with anyio.create_task_group() as tg:
        for _ in range(clients):
            tg.start_soon(one)
    return lat, errors


def report_line(name: str, lat: list[float], errs: list[str], secs: float, n: int) -> None:
    if lat:
        print(f"  {name:<17} p50 {statistics.median(lat) * 1000:8.1f} ms   p95 {pct(lat, .95) * 1000:8.1f} ms   "
              f"{len(lat)}/{n} ok, {len(errs)} errors, {len(lat) / secs:5.1f} calls/s", flush=True)
    else:
        print(f"  {name:<17} no successful calls, {len(errs)} errors", flush=True)
    for e in errs[:5]:
        print(f"      error: {e}", flush=True)


def under_load(args: argparse.Namespace) -> None:
    """read_emotions latency idle vs while a dream cycle trains (daemon with its training worker)."""
    from amygdala.engine.config import Config

    sys.stdout.reconfigure(line_buffering=True)  # a run cut short by a timeout still shows what it measured
    cfg = Config.load()
    print(machine_line())
    print(f"home {cfg.home}")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / "amygdala-bench-server-dream.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "amygdala.server.cli", "serve", "--transport", "http", "--port",
                                 str(port), "--no-dream", "--sync-delay", "3600"],
                                cwd=str(Path(__file__).resolve().parent.parent), stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_health(url, proc, str(log_path), readout=True)  # the daemon installs (or builds) the readout
        anyio.run(load, url, 1, 3)  # warm up
        t0 = time.perf_counter()
        idle, idle_err = anyio.run(load, url, args.clients, args.per_client)
        idle_s = time.perf_counter() - t0
        n = args.clients * args.per_client
        print(f"read_emotions, {args.clients} clients x {args.per_client} calls of a {len(TEXT)}-character text")
        report_line("idle", idle, idle_err, idle_s, n)
        r = httpx.post(url + "/dream/run", json={"budget_steps": args.budget_steps, "budget_minutes": args.budget_minutes},
                       timeout=30)
        if r.status_code != 202:
            raise SystemExit(f"could not start a dream cycle: {r.status_code} {r.text}")
        cycle_id = r.json()["cycle_id"]
        print(f"dream cycle {cycle_id} started (budget {args.budget_steps} steps, {args.budget_minutes} min)", flush=True)
        t_start = time.perf_counter()
        phases: list[str] = []
        while True:
            st = httpx.get(url + "/dream/status", timeout=30).json()
            run = st.get("running")
            if run is None:
                raise SystemExit(f"the cycle ended before it trained: {st.get('last')}")
            if not phases or phases[-1] != run["phase"]:
                phases.append(run["phase"])
            if run["phase"] == "train":
                break
            time.sleep(1.0)
        print(f"  reached the train phase after {time.perf_counter() - t_start:.0f} s (phases {' -> '.join(phases)})",
              flush=True)
        seen: list[str] = []

        async def watched_load(seen: list[str]) -> tuple[list[float], list[str]]:
            """The load, noting what the daemon's runner did meanwhile (cycle phases, 'certify', 'idle')."""
            stop = anyio.Event()

            async def watch() -> None:
                async with httpx.AsyncClient(timeout=30) as http:
                    while not stop.is_set():
                        run = (await http.get(url + "/dream/status")).json().get("running")
                        ph = (run["phase"] if run["kind"] == "cycle" else run["kind"]) if run else "idle"
                        if not seen or seen[-1] != ph:
                            seen.append(ph)
                        await anyio.sleep(0.5)

            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                out = await load(url, args.clients, args.per_client)
                stop.set()
            return out

        t0 = time.perf_counter()
        busy, busy_err = anyio.run(watched_load, seen)
        busy_s = time.perf_counter() - t0
        report_line("idle", idle, idle_err, idle_s, n)
        report_line("during the cycle", busy, busy_err, busy_s, n)
        print(f"  the load overlapped the cycle's phases: {' -> '.join(seen)}")
        print(f"  zero errors: {'PASS' if not idle_err and not busy_err else 'FAIL'}")
        while (st := httpx.get(url + "/dream/status", timeout=30).json())["running"] is not None:
            time.sleep(2.0)
        last = st["last"]
        t0 = time.perf_counter()
        after_seen: list[str] = []
        after, after_err = anyio.run(watched_load, after_seen)
        report_line("after the cycle", after, after_err, time.perf_counter() - t0, n)
        print(f"  meanwhile the runner was: {' -> '.join(after_seen)} (a kept cycle is followed by certifying the "
              "invariants on the new weights)")
        print(f"cycle {last['cycle_id']}: {last['outcome']} ({last['steps']} steps) in "
              f"{time.perf_counter() - t_start:.0f} s: {last['reason']}")
    finally:
        proc.terminate()
        proc.wait(120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--calls", type=int, default=60)
    ap.add_argument("--per-client", type=int, default=None, help="Calls per client (default 12; --under-load 25).")
    ap.add_argument("--under-load", action="store_true", help="Only the case of read_emotions during a dream cycle.")
    ap.add_argument("--clients", type=int, default=8, help="--under-load: concurrent clients.")
    ap.add_argument("--budget-steps", type=int, default=10, help="--under-load: the cycle's training steps (the daemon's default).")
    ap.add_argument("--budget-minutes", type=float, default=12.0, help="--under-load: the cycle's time budget.")
    args = ap.parse_args()
    if args.per_client is None:
        args.per_client = 25 if args.under_load else 12
    if args.under_load:
        return under_load(args)

    from amygdala.engine.config import Config
    from amygdala.engine.model import load_model
    from amygdala.training.vectors.build import ensure_readout
    from mcp import Client

    cfg = Config.load()
    lm = load_model(cfg)
    r = ensure_readout(lm, cfg)  # builds the readout first if needed, so the daemon finds it
    print(machine_line())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / "amygdala-bench-server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "amygdala.server.cli", "serve", "--transport", "http", "--no-train", "--port",
                             str(port)], cwd=str(Path(__file__).resolve().parent.parent), stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                if proc.poll() is not None:
                    raise SystemExit(f"server exited {proc.returncode}; see {log.name}")
                time.sleep(0.5)

        direct: list[float] = []
        http: list[float] = []

        async def run_http(n: int, out: list[float]) -> None:
            async with Client(url + "/mcp") as c:
                await c.call_tool("read_emotions", {"text": TEXT, "top_k": 10})  # warm the session
                for _ in range(n):
                    t0 = time.perf_counter()
                    res = await c.call_tool("read_emotions", {"text": TEXT, "top_k": 10})
                    out.append(time.perf_counter() - t0)
                    assert not res.is_error, res.content

        r.read([TEXT])
        for i in range(args.calls):  # interleave the two so load on the machine hits both alike
            t0 = time.perf_counter()
            r.read([TEXT])
            direct.append(time.perf_counter() - t0)
            if i % 10 == 9:
                anyio.run(run_http, 10, http)
        n_tok = len(r.encode(TEXT))
        p50d, p50h = statistics.median(direct), statistics.median(http)
        print(f"read_emotions of a {n_tok}-token text, {len(direct)} direct / {len(http)} HTTP calls")
        print(f"  direct in-process   p50 {p50d * 1000:7.1f} ms   p99 {pct(direct, .99) * 1000:7.1f} ms")
        print(f"  MCP over HTTP       p50 {p50h * 1000:7.1f} ms   p99 {pct(http, .99) * 1000:7.1f} ms")
        overhead = p50h / p50d - 1
        print(f"  p50 overhead {overhead:+.1%} (target < 20%: {'PASS' if overhead < 0.2 else 'FAIL'})")

        async def clients(k: int) -> float:
            lat: list[float] = []
            t0 = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for _ in range(k):
                    tg.start_soon(run_http, args.per_client, lat)
            return len(lat) / (time.perf_counter() - t0)

        for k in (1, 4, 8):
            print(f"  throughput with {k} client(s): {anyio.run(clients, k):6.1f} calls/s")
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
