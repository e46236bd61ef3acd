"""`amygdala serve`: the MCP server over stdio, or the HTTP daemon that owns model, worker and graph."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from amygdala.engine.cli import HomeOpt, MaxTokensOpt, ModelOpt, ThreadsOpt, echo_err, make_config


def serve(
    transport: str = typer.Option("http", help="'http' (streamable HTTP daemon) or 'stdio' (one client, spawned by it)."),
    host: str = typer.Option("127.0.0.1", help="HTTP bind address; anything but loopback requires --token."),
    port: int = typer.Option(8765, min=1, max=65535, help="HTTP port."),
    token: Optional[str] = typer.Option(None, "--token", envvar="AMYGDALA_TOKEN", help="Bearer token every HTTP request must carry."),
    train: bool = typer.Option(True, "--train/--no-train", help="Run the training worker and checkpoint sync."),
    readout: Optional[Path] = typer.Option(None, "--readout", help="Readout directory (default: the model's, built on first use)."),
    sync_delay: float = typer.Option(600.0, "--sync-delay", min=0.0, help="Seconds after the last training job before the checkpoint sync."),
    home: HomeOpt = None, model: ModelOpt = None, threads: ThreadsOpt = None, max_tokens: MaxTokensOpt = None,
) -> None:
    """Serve the MCP tools (read_emotions, test_steering, submit_correction, list_concepts, train_status)."""
    from .http_app import InsecureBind, check_bind
    from .mcp_server import build_mcp
    from .services import start_services

    if transport not in ("http", "stdio"):
        echo_err(f"error: --transport must be 'http' or 'stdio', got {transport!r}")
        raise typer.Exit(2)
    if transport == "http":
        try:
            check_bind(host, token)  # before spending a minute loading the model
        except InsecureBind as exc:
            echo_err(f"error: {exc}")
            raise typer.Exit(2) from None
    cfg = make_config(home, model, threads=threads, max_tokens=max_tokens)
    from amygdala.engine.model import ModelError

    try:
        services = start_services(cfg, train=train, readout_path=readout, echo=echo_err, sync_delay_s=sync_delay)
    except (ModelError, ValueError) as exc:
        echo_err(f"error: {exc}")
        raise typer.Exit(2) from None
    mcp = build_mcp(services)
    try:
        if transport == "stdio":
            echo_err(f"amygdala: serving {services.lm.name} over stdio"
                     + ("" if services.readout_ready else " (emotion readout still being built)"))
            mcp.run()
        else:
            import uvicorn

            from .http_app import create_http_app

            app = create_http_app(mcp, services, host=host, token=token)
            echo_err(f"amygdala: serving {services.lm.name} at http://{host}:{port}/mcp "
                     f"(training API at /train, /train/status, /checkpoint; {'token required' if token else 'no token'})")
            uvicorn.run(app, host=host, port=port, log_level=os.environ.get("AMYGDALA_HTTP_LOG", "warning"))
    finally:
        services.close()
        sys.stderr.flush()
