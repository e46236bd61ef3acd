"""Is vLLM here, and the command line and environment that start its server with our plugin.

`amygdala serve --backend vllm` checks `require_vllm()` before anything else (a missing extra is
reported in a second, with the install command), then runs vLLM's OpenAI-compatible server as a
child process: same process tree, vLLM's own CLI, our worker extension, eager mode, the V1 runner,
and the endpoint plugin allow-listed.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from .plugin import OPT_IN_ENV, PLUGIN_NAME, RUNNER_ENV, TOKEN_ENV, WORKER_EXTENSION

INSTALL_HINT = "pip install 'amygdala[vllm]'"


class VllmMissing(RuntimeError):
    """vLLM is not installed; the message carries the install command."""


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def require_vllm() -> None:
    if not vllm_available():
        raise VllmMissing(f"the vLLM backend needs vLLM, which is not installed in {sys.prefix}. Install it with "
                          f"`{INSTALL_HINT}` (Linux with a CUDA GPU), or serve with the default --backend transformers")


def plugin_env(base: Mapping[str, str] | None = None, token: str | None = None) -> dict[str, str]:
    """Environment for a vLLM process tree running amygdala: opt-in, V1 runner, endpoint plugin allowed.

    VLLM_PLUGINS is an allow-list for *all* plugin groups once set, so an existing list is extended,
    never replaced (a user's other plugins keep loading).
    """
    env = dict(os.environ if base is None else base)
    env[OPT_IN_ENV] = "1"
    env[RUNNER_ENV] = "0"
    allowed = [p for p in env.get("VLLM_PLUGINS", "").split(",") if p.strip()] if "VLLM_PLUGINS" in env else []
    if PLUGIN_NAME not in allowed:
        allowed.append(PLUGIN_NAME)
    env["VLLM_PLUGINS"] = ",".join(allowed)
    if token:
        env[TOKEN_ENV] = token
    return env


def server_argv(model: str | Path, *, tensor_parallel_size: int = 1, host: str = "127.0.0.1", port: int = 8000,
                token: str | None = None, extra: Sequence[str] = ()) -> list[str]:
    """`vllm serve MODEL ...` with the settings the hooks need; `extra` goes through unchanged."""
    if tensor_parallel_size < 1:
        raise ValueError(f"--tensor-parallel-size must be >= 1, got {tensor_parallel_size}")
    exe = shutil.which("vllm", path=str(Path(sys.executable).parent)) or shutil.which("vllm")
    head = [exe] if exe else [sys.executable, "-m", "vllm.entrypoints.cli.main"]
    argv = [*head, "serve", str(model), "--tensor-parallel-size", str(tensor_parallel_size), "--enforce-eager",
            "--worker-extension-cls", WORKER_EXTENSION, "--host", host, "--port", str(port)]
    if token:
        argv += ["--api-key", token]  # vLLM's own routes; ours check AMYGDALA_TOKEN (plugin_env)
    return argv + list(extra)


def run_server(model: str | Path, *, tensor_parallel_size: int = 1, host: str = "127.0.0.1", port: int = 8000,
               token: str | None = None, extra: Sequence[str] = ()) -> int:
    """Run vLLM's server as a child until it exits; SIGINT/SIGTERM are passed on. Returns its exit code."""
    require_vllm()
    proc = subprocess.Popen(server_argv(model, tensor_parallel_size=tensor_parallel_size, host=host, port=port,
                                        token=token, extra=extra), env=plugin_env(token=token))

    def forward(signum: int, _frame: object) -> None:
        proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
