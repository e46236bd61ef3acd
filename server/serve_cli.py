"""`amygdala serve`: the MCP server over stdio, or the HTTP daemon that owns model, worker and graph."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from amygdala.engine.cli import HomeOpt, MaxTokensOpt, ModelOpt, ThreadsOpt, echo_err, make_config
from amygdala.training.http_security import TOKEN_ENV

from .shutdown import DEFAULT_SHUTDOWN_S


def serve(
    transport: str = typer.Option("http", help="'http' (streamable HTTP daemon) or 'stdio' (one client, spawned by it)."),
    host: str = typer.Option("127.0.0.1", help="HTTP bind address; anything but loopback requires --token."),
    port: int = typer.Option(8765, min=1, max=65535, help="HTTP port."),
    token: Optional[str] = typer.Option(None, "--token", envvar=TOKEN_ENV, help="Bearer token every HTTP request must carry."),
    train: bool = typer.Option(True, "--train/--no-train", help="Run the training worker and checkpoint sync."),
    readout: Optional[Path] = typer.Option(None, "--readout", help="Readout directory (default: the model's, built on first use)."),
    sync_delay: float = typer.Option(600.0, "--sync-delay", min=0.0, help="Seconds after the last training job before the checkpoint sync."),
    shutdown_timeout: float = typer.Option(DEFAULT_SHUTDOWN_S, "--shutdown-timeout", min=1.0,
                                           help="Longest clean shutdown (final sync, worker stop) on SIGTERM/SIGINT."),
    dream_at: str = typer.Option("03:00", "--dream-at", envvar="AMYGDALA_DREAM_AT",
                                 help="Local time (HH:MM) of the nightly dream cycle; a run missed while the daemon was "
                                      "down runs on restart within 6 hours."),
    dream: bool = typer.Option(True, "--dream/--no-dream", help="Schedule the nightly dream (run-now works either way)."),
    backend: str = typer.Option("transformers", "--backend", help="'transformers' (in-process, CPU) or 'vllm' (vLLM's "
                                "server with amygdala's plugin, GPU; needs the [vllm] extra and --model PATH)."),
    tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", min=1, help="GPUs per model (--backend vllm)."),
    home: HomeOpt = None, model: ModelOpt = None, threads: ThreadsOpt = None, max_tokens: MaxTokensOpt = None,
) -> None:
    """Serve the MCP tools (emotions, steering, corrections, training, dream, certificates) and the operator's review page."""
    from amygdala.home import HomeBusy

    from .http_app import InsecureBind, check_bind
    from .mcp_server import build_mcp
    from .services import start_services
    from .shutdown import close_within, terminate_like_interrupt

    if transport not in ("http", "stdio"):
        echo_err(f"error: --transport must be 'http' or 'stdio', got {transport!r}")
        raise typer.Exit(2)
    if backend != "transformers" or tensor_parallel_size != 1:
        raise typer.Exit(_serve_vllm(backend, transport, model, tensor_parallel_size, host, port, token))
    from amygdala.dream.errors import DreamError
    from amygdala.dream.scheduler import parse_dream_at

    try:
        nightly = parse_dream_at(dream_at) if dream else None
    except DreamError as exc:
        echo_err(f"error: {exc}")
        raise typer.Exit(2) from None
    if transport == "http":
        try:
            check_bind(host, token)  # before spending a minute loading the model
        except InsecureBind as exc:
            echo_err(f"error: {exc}")
            raise typer.Exit(2) from None
    cfg = make_config(home, model, threads=threads, max_tokens=max_tokens)
    url = f"http://{host}:{port}/mcp" if transport == "http" else None
    from .review_app import OPERATOR_TOKEN_ENV, OperatorTokenError, login_url, operator_token

    try:
        review_token, review_generated = operator_token(os.environ.get(OPERATOR_TOKEN_ENV), token)
    except OperatorTokenError as exc:
        echo_err(f"error: {exc}")
        raise typer.Exit(2) from None
    lock = cfg.home_lock()
    try:
        lock.acquire("amygdala daemon" if transport == "http" else "amygdala stdio server", url=url)
    except HomeBusy as exc:
        echo_err(f"error: {exc}")
        raise typer.Exit(2) from None
    from amygdala.engine.model import ModelError

    services = None
    try:
        with terminate_like_interrupt():
            try:
                services = start_services(cfg, train=train, readout_path=readout, echo=echo_err, sync_delay_s=sync_delay,
                                          dream_at=nightly)
            except (ModelError, ValueError) as exc:
                echo_err(f"error: {exc}")
                raise typer.Exit(2) from None
            mcp = build_mcp(services)
            echo_err(f"amygdala: {_dream_line(services)}")
            if transport == "stdio":
                echo_err(f"amygdala: serving {services.lm.name} over stdio"
                         + ("" if services.readout_ready else " (emotion readout still being built)"))
                mcp.run()
            else:
                import uvicorn

                from .http_app import create_http_app

                app = create_http_app(mcp, services, host=host, token=token, operator_token=review_token)
                echo_err(f"amygdala: serving {services.lm.name} at {url} (training API at /train, /train/status, "
                         f"/checkpoint; {'token required' if token else 'no token'}; pid {os.getpid()})")
                review_base = f"http://{host}:{port}"
                echo_err("amygdala: operator review of certificates at "
                         + (f"{login_url(review_base, review_token)} (new each start; set {OPERATOR_TOKEN_ENV} to "
                            "keep one)" if review_generated
                            else f"{review_base}/review/login?token=<{OPERATOR_TOKEN_ENV}>"))
                uvicorn.run(app, host=host, port=port, log_level=os.environ.get("AMYGDALA_HTTP_LOG", "warning"))
    except (KeyboardInterrupt, SystemExit) as exc:
        if isinstance(exc, SystemExit) and exc.code not in (None, 0, 130, 143):
            raise
        echo_err("amygdala: stopping (signal received)")
    finally:
        clean = close_within(services.close, shutdown_timeout, echo_err) if services is not None else True
        lock.release()
        sys.stderr.flush()
    if not clean:
        raise typer.Exit(1)


def _dream_line(services) -> str:
    """One start-up line about the dream schedule (what `dream_status` will say)."""
    if services.dream is None:
        return "dreaming off (no training worker)"
    info = services.dream_scheduler.info() if services.dream_scheduler is not None else None
    if info is None or info.next_run is None:
        return "no nightly dream scheduled (--no-dream, or another process owns the home); run_dream_now still works"
    return f"nightly dream at {info.dream_at} {info.timezone} (next {info.next_run.isoformat(timespec='minutes')})"


def _serve_vllm(backend: str, transport: str, model: Optional[str], tensor_parallel_size: int, host: str, port: int,
                token: Optional[str]) -> int:
    """`--backend vllm`: checks first (vLLM installed, a model directory, HTTP), then vLLM's server with our plugin."""
    from amygdala.engine.backends.vllm.serve import VllmMissing, require_vllm, run_server

    from .http_app import InsecureBind, check_bind

    if backend == "transformers":
        echo_err(f"error: --tensor-parallel-size {tensor_parallel_size} needs --backend vllm (the transformers backend runs on one device)")
        return 2
    if backend != "vllm":
        echo_err(f"error: --backend must be 'transformers' or 'vllm', got {backend!r}")
        return 2
    try:
        require_vllm()
    except VllmMissing as exc:
        echo_err(f"error: {exc}")
        return 2
    if not model or model == "embedded" or not Path(model).expanduser().is_dir():
        echo_err("error: --backend vllm needs --model PATH, a HuggingFace model directory (the embedded GGUF model "
                 "is served by the transformers backend)")
        return 2
    if transport != "http":
        echo_err("error: --backend vllm serves HTTP only (vLLM's server); drop --transport stdio")
        return 2
    try:
        check_bind(host, token)
    except InsecureBind as exc:
        echo_err(f"error: {exc}")
        return 2
    return run_server(Path(model).expanduser(), tensor_parallel_size=tensor_parallel_size, host=host, port=port,
                      token=token)
