"""`amygdala train server` (the HTTP training API, standalone) and `submit` / `status` / `rollback` clients.

The server side never tokenizes; `submit` is a client and may: give text (--context/--preferred/
--rejected) and it tokenizes with the served model's tokenizer (loaded alone, without weights), or
give raw ids (--context-ids "2,1044,...").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from amygdala.engine.cli import HomeOpt, ModelOpt, echo_err, load_or_exit, make_config

DEFAULT_PORT = 8765
UrlOpt = Annotated[str, typer.Option("--url", help="Base URL of a running `amygdala serve` or `amygdala train server`.")]
TokenOpt = Annotated[Optional[str], typer.Option("--token", envvar="AMYGDALA_TOKEN",
                                                 help="Bearer token of the server (when it was started with one).")]
DEFAULT_URL = f"http://127.0.0.1:{DEFAULT_PORT}"

train_app = typer.Typer(help="Train corrections into the served weights (context-frozen ORPO/SFT through APOLLO).",
                        no_args_is_help=True)


@train_app.command("server")
def train_server(
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on; anything but loopback requires --token."),
    port: int = typer.Option(DEFAULT_PORT, "--port", min=1, max=65535),
    token: TokenOpt = None,
    home: HomeOpt = None, model: ModelOpt = None,
    optimizer: str = typer.Option("apollo", "--optimizer", help="apollo | apollo-mini | adamw"),
    rank: Optional[int] = typer.Option(None, "--rank", min=1, help="APOLLO rank (default 64)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Default learning rate (1e-5)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch threads of the training worker."),
) -> None:
    """Serve only the training API (POST /train, GET /train/status, POST /checkpoint); `amygdala serve` serves it too, next to MCP."""

    import uvicorn
    from pydantic import ValidationError

    from amygdala.home import HomeBusy

    from .api import create_app
    from .client import TrainingClient
    from .http_security import BearerAuth, BodyLimit, InsecureBind, check_bind
    from .schemas import TrainSettings, WorkerUnavailable

    try:
        check_bind(host, token)
    except InsecureBind as exc:
        echo_err(f"error: {exc}")
        raise typer.Exit(2) from None
    try:
        overrides = {k: v for k, v in {"optimizer": optimizer, "rank": rank, "lr": lr, "threads": threads}.items() if v is not None}
        settings = TrainSettings(**overrides)
    except ValidationError as exc:
        echo_err(f"error: {exc}")
        raise typer.Exit(2) from None
    from .checkpoint.sync import CheckpointSyncer

    cfg = make_config(home, model)
    lock = cfg.home_lock()
    try:
        lock.acquire("amygdala training server", url=f"http://{host}:{port}")
    except HomeBusy as exc:
        echo_err(f"error: {exc}")
        raise typer.Exit(2) from None
    lm = load_or_exit(cfg)  # replays an interrupted sync's journal before mapping the weights
    echo_err(f"starting the training worker on {lm.name} ...")
    try:
        client = TrainingClient(lm, cfg, settings)
    except WorkerUnavailable as exc:
        echo_err(f"error: {exc}")
        raise typer.Exit(1) from None
    echo_err(f"training worker ready: {client.status().optimizer}")
    syncer = CheckpointSyncer(lm.path, lm.model, lock=lm.lock, weights_version=lambda: client.weights_version,
                              changed_since=client.changed_since, reload=client.reload_from_checkpoint)

    import signal

    def stop(signum, frame):  # noqa: ANN001: SIGTERM ends this process like Ctrl-C, so the final sync below runs
        raise SystemExit(128 + signum)

    app = BodyLimit(create_app(client, on_checkpoint=syncer.sync))
    if token:
        app = BearerAuth(app, token)
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        echo_err("stopping: worker, then a final checkpoint sync")
        try:
            client.close()
            report = syncer.sync()
            echo_err(f"final checkpoint sync: {report.summary()}")
        finally:
            signal.signal(signal.SIGTERM, previous)
            lock.release()


def _ids(text: Optional[str]) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        return [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        echo_err(f"error: {text!r} is not a list of integers; pass e.g. --context-ids '2,1044,573'")
        raise typer.Exit(2) from None


def _tokenizer(home: Optional[Path], model: Optional[str]):
    from transformers import AutoTokenizer

    from amygdala.engine.model import ModelError, resolve_model_path

    try:
        return AutoTokenizer.from_pretrained(resolve_model_path(make_config(home, model), echo=echo_err))
    except ModelError as exc:
        echo_err(f"error: {exc}")
        raise typer.Exit(2) from None


def _request(method: str, url: str, body: dict | None = None, token: str | None = None) -> dict:
    import httpx

    from .http_security import auth_headers

    try:
        resp = httpx.request(method, url, json=body, timeout=60, headers=auth_headers(token))
    except httpx.HTTPError as exc:
        echo_err(f"error: cannot reach {url} ({exc}); is `amygdala serve` (or `amygdala train server`) running?")
        raise typer.Exit(1) from None
    data = resp.json() if resp.headers.get("content-type", "").startswith("application/json") else {"error": resp.text}
    if resp.status_code == 401 and not token:
        echo_err(f"error 401: {url} requires a bearer token: pass --token or set AMYGDALA_TOKEN")
        raise typer.Exit(1)
    if resp.status_code >= 400:
        echo_err(f"error {resp.status_code}: {data.get('error', data)}")
        raise typer.Exit(1)
    return data


@train_app.command("submit")
def submit(
    context: Optional[str] = typer.Option(None, "--context", help="Context text (tokenized with BOS)."),
    preferred: Optional[str] = typer.Option(None, "--preferred", help="Preferred continuation text."),
    rejected: Optional[str] = typer.Option(None, "--rejected", help="Rejected continuation text (makes it ORPO)."),
    context_ids: Optional[str] = typer.Option(None, "--context-ids", help="Raw context ids, comma separated."),
    continuation_ids: Optional[str] = typer.Option(None, "--continuation-ids"),
    rejected_ids: Optional[str] = typer.Option(None, "--rejected-ids"),
    loss: Optional[str] = typer.Option(None, "--loss", help="sft | orpo (default: orpo when a rejected continuation is given)."),
    lr: Optional[float] = typer.Option(None, "--lr"),
    epochs: int = typer.Option(1, "--epochs", min=1),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only compute loss and gradient norms."),
    wait: bool = typer.Option(False, "--wait", help="Poll until the job finishes and print its result."),
    url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, home: HomeOpt = None, model: ModelOpt = None,
) -> None:
    """Submit one correction to a running `amygdala serve` or `amygdala train server`."""
    import time

    if any(t is not None for t in (context, preferred, rejected)):
        if context is None or preferred is None:
            echo_err("error: text mode needs --context and --preferred (and optionally --rejected)")
            raise typer.Exit(2)
        from .examples import tokenize_example
        from .schemas import JobRejected

        try:
            ex = tokenize_example(_tokenizer(home, model), context, preferred, rejected)
        except JobRejected as exc:
            echo_err(f"error: {exc}")
            raise typer.Exit(2) from None
        ctx, cont, rej = ex.context_ids, ex.continuation_ids, ex.rejected_ids
    else:
        ctx, cont, rej = _ids(context_ids), _ids(continuation_ids), _ids(rejected_ids)
        if ctx is None or cont is None:
            echo_err("error: pass --context/--preferred text or --context-ids/--continuation-ids")
            raise typer.Exit(2)
    body = {"context_ids": ctx, "continuation_ids": cont, "loss": loss or ("orpo" if rej else "sft"),
            "epochs": epochs, "dry_run": dry_run}
    if rej is not None:
        body["rejected_ids"] = rej
    if lr is not None:
        body["lr"] = lr
    base = url.rstrip("/")
    data = _request("POST", f"{base}/train", body, token)
    if not wait:
        typer.echo(json.dumps(data, indent=2))
        return
    while True:
        result = _request("GET", f"{base}/train/jobs/{data['job_id']}", token=token)
        if result["state"] in ("done", "failed", "cancelled"):
            typer.echo(json.dumps(result, indent=2))
            raise typer.Exit(0 if result["state"] == "done" else 1)
        time.sleep(1.0)


@train_app.command("status")
def status(url: UrlOpt = DEFAULT_URL, token: TokenOpt = None) -> None:
    """Worker state, queue, current job, step and loss, last error."""
    typer.echo(json.dumps(_request("GET", f"{url.rstrip('/')}/train/status", token=token), indent=2))


@train_app.command("rollback")
def rollback(job_id: str = typer.Argument(..., help="Job to undo (it and every later job)."), url: UrlOpt = DEFAULT_URL,
             token: TokenOpt = None) -> None:
    """Restore the weights from before a job."""
    typer.echo(json.dumps(_request("POST", f"{url.rstrip('/')}/train/rollback", {"job_id": job_id}, token), indent=2))
