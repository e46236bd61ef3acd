"""Issue 9 benchmark: read_emotions over HTTP (MCP streamable HTTP) vs a direct in-process readout.

Starts `amygdala serve --transport http --no-train` on the embedded model as a subprocess, then in
one run: p50/p99 latency of read_emotions through the MCP SDK client vs `ReadoutManager.read` of
the same text in this process (target: p50 overhead under 20%), and throughput with 1, 4 and 8
concurrent clients.
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

import anyio  # noqa: E402
import httpx  # noqa: E402

from benchmarks._common import machine_line  # noqa: E402

TEXT = ("I have rewritten this function three times now and the reviewer keeps finding the same edge case. "
        "Each time I think it is finally right, another comment appears, polite and precise, and I can feel my "
        "jaw tighten before I have even finished reading it. Maybe they are right. Maybe I should slow down.")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--calls", type=int, default=60)
    ap.add_argument("--per-client", type=int, default=12)
    args = ap.parse_args()

    from mcp import Client

    from amygdala.engine.config import Config
    from amygdala.engine.model import load_model
    from amygdala.training.vectors.build import ensure_readout

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
