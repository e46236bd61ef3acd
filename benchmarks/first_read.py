"""Seconds from `amygdala serve` on a fresh home (model converted, no readout) to the first working read_emotions.

    .venv/bin/python benchmarks/first_read.py --model-dir ~/.local/share/amygdala/models/gemma-3-270m-fp32

Copies the converted model into a new temporary home (so the conversion is not timed, as in the
README's "conversion done" case), starts the daemon as the README's first command does, and calls
read_emotions over MCP/HTTP every second until it answers with scores. With a shipped readout whose
hashes match, the readout is copied at once; without one it is trained from the corpus (minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def try_read(url: str) -> dict | str:
    from mcp import Client

    async with Client(url) as c:
        r = await c.call_tool("read_emotions", {"text": "Eleven days on this bug, and the tests finally pass.", "top_k": 3})
        return r.content[0].text if r.is_error else r.structured_content


def main() -> None:
    import anyio

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, required=True, help="A converted embedded model directory to copy.")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--no-train", action="store_true", help="Start the daemon without the training worker.")
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="amygdala-first-read-"))
    shutil.copytree(args.model_dir, home / "models" / args.model_dir.name)
    port = free_port()
    cmd = [str(Path(sys.executable).with_name("amygdala")), "serve", "--home", str(home), "--port", str(port)]
    if args.no_train:
        cmd.append("--no-train")
    log = (home / "serve.log").open("w")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "AMYGDALA_HOME": str(home)})
    first_answer = None
    result: dict | str | None = None
    try:
        while time.monotonic() - t0 < args.timeout:
            if proc.poll() is not None:
                raise SystemExit(f"daemon exited with {proc.returncode}; see {home / 'serve.log'}")
            try:
                result = anyio.run(try_read, f"http://127.0.0.1:{port}/mcp")
            except Exception:  # noqa: BLE001 - not listening yet (connection errors arrive wrapped in task groups)
                time.sleep(0.5)
                continue
            if first_answer is None:
                first_answer = time.monotonic() - t0
            if isinstance(result, dict):
                break
            time.sleep(1.0)
        seconds = time.monotonic() - t0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    lines = [x for x in (home / "serve.log").read_text().splitlines() if x.startswith("amygdala:")]
    print(json.dumps({"seconds_to_first_read": round(seconds, 1), "seconds_to_first_answer": round(first_answer or -1, 1),
                      "ok": isinstance(result, dict), "top": result.get("top") if isinstance(result, dict) else result,
                      "daemon_lines": lines, "home": str(home)}, indent=2))
    shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
