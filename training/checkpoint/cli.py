"""`amygdala sync`: apply a set of weights to a model directory offline, list and roll back its sync points.

    amygdala sync --model-dir DIR --from CHECKPOINT      block sync (the same crash-safe sync the daemon runs)
    amygdala sync list [--model-dir DIR]                 the undo log: kept sync points, where the files are now
    amygdala sync rollback [--to SYNC_ID] [--model-dir DIR]
                                                          put the checkpoint back exactly to an earlier sync point

Every command that writes refuses while a daemon owns the home (AMYGDALA_HOME / --home): it would
write beside the daemon's own syncs and its live weights would no longer match the files. With a
daemon running, roll back through it instead. `list` only reads. Mount with
`app.add_typer(sync_app, name="sync")`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from amygdala.home import HomeBusy

from .format import SyncError, model_files

ModelDirOpt = Annotated[Path | None, typer.Option("--model-dir", help="Model directory (default: the home's model, "
                                                     "the embedded one unless --model says otherwise).")]
HomeOpt = Annotated[Path | None, typer.Option("--home", help="State directory (default $AMYGDALA_HOME or "
                                                 "~/.local/share/amygdala): refused while its daemon runs.")]


def load_checkpoint_tensors(source: Path) -> dict[str, Any]:
    """All tensors of a safetensors file, or of every safetensors file of a directory (in memory)."""
    from safetensors.torch import load_file

    files = model_files(source) if source.is_dir() else [source]
    out: dict[str, Any] = {}
    for f in files:
        if not f.is_file():
            raise SyncError(f"--from {f}: no such file; pass a .safetensors file or a directory of them")
        try:
            tensors = load_file(str(f))
        except Exception as exc:  # noqa: BLE001 (safetensors raises its own error types)
            raise SyncError(f"--from {f}: not a readable safetensors file ({exc})") from None
        dup = set(tensors) & set(out)
        if dup:
            raise SyncError(f"--from {source}: tensor {min(dup)} appears in more than one file")
        out.update(tensors)
    return out


def _same_files(a: Path, b: Path) -> bool:
    fa = model_files(a) if a.is_dir() else [a]
    fb = model_files(b)
    return any(x.exists() and y.exists() and x.samefile(y) for x in fa for y in fb)


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def _refuse_if_daemon(home: Path | None, doing: str) -> None:
    from amygdala.engine.config import Config

    try:
        Config.load(home=home).home_lock().refuse_if_held(doing)
    except HomeBusy as exc:
        _fail(f"{exc}. Offline sync commands write the model directory; with a daemon running, the checkpoint "
              "belongs to it")


def _model_dir(model_dir: Path | None, home: Path | None) -> Path:
    if model_dir is not None:
        return model_dir
    from amygdala.engine.config import Config
    from amygdala.engine.embedded import EMBEDDED_NAME

    cfg = Config.load(home=home)
    return cfg.models_dir / EMBEDDED_NAME if cfg.is_embedded else Path(cfg.model).expanduser()


sync_app = typer.Typer(help="Checkpoint sync: write trained weights into a model directory block by block, list and "
                            "roll back its sync points.", pretty_exceptions_enable=False, invoke_without_command=True)


@sync_app.callback(invoke_without_command=True)
def sync_main(
    ctx: typer.Context,
    model_dir: ModelDirOpt = None,
    source: Annotated[Path | None, typer.Option("--from", help="Safetensors file or directory with the new weights (same tensor names).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report what would be written; write nothing.")] = False,
    keep: Annotated[int, typer.Option("--keep", min=0, help="Syncs kept in the undo log (0: keep none).")] = 4,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bar while comparing.")] = True,
    home: HomeOpt = None,
) -> None:
    """Write only the 4 KiB blocks of DIR's safetensors that differ from CHECKPOINT, crash-safely.

    An interrupted earlier sync of DIR is finished (or discarded, if it never committed) first. The
    old bytes go to the undo log, so `amygdala sync rollback` can undo it.
    """
    if ctx.invoked_subcommand is not None:
        if source is not None:
            _fail(f"--from belongs to the sync itself, not to `sync {ctx.invoked_subcommand}`")
        ctx.obj = {"model_dir": model_dir, "home": home, "as_json": as_json}
        return
    if model_dir is None or source is None:
        _fail("pass --model-dir DIR --from CHECKPOINT to sync, or use `amygdala sync list` / `amygdala sync rollback`")
    from .sync import sync_checkpoint

    if not dry_run:
        _refuse_if_daemon(home, f"sync {model_dir}")
    try:
        if not source.exists():
            raise SyncError(f"--from {source}: no such file or directory")
        if _same_files(source, model_dir):
            raise SyncError(f"--from {source} is the checkpoint in --model-dir {model_dir} itself: nothing to sync")
        live = load_checkpoint_tensors(source)
        report = sync_checkpoint(model_dir, live, dry_run=dry_run, keep_undo=keep,
                                 progress=progress and not as_json and sys.stderr.isatty(), label=f"--from {source}")
    except SyncError as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(report.model_dump(), indent=2))
    else:
        typer.echo(report.summary())


def _parent(ctx: typer.Context, model_dir: Path | None, home: Path | None, as_json: bool) -> tuple[Path, Path | None, bool]:
    outer = ctx.obj or {}
    home = home or outer.get("home")
    return _model_dir(model_dir or outer.get("model_dir"), home), home, as_json or bool(outer.get("as_json"))


@sync_app.command("list")
def list_cmd(ctx: typer.Context, model_dir: ModelDirOpt = None, home: HomeOpt = None,
             as_json: Annotated[bool, typer.Option("--json", help="Print the log as JSON.")] = False) -> None:
    """The kept sync points of a model directory, newest first, and which ones rollback can reach."""
    from .undo import sync_log

    model_dir, home, as_json = _parent(ctx, model_dir, home, as_json)
    try:
        model_files(model_dir)
        log = sync_log(model_dir)
    except SyncError as exc:
        _fail(str(exc))
    typer.echo(json.dumps(log.model_dump(), indent=2) if as_json else log.render())


@sync_app.command("rollback")
def rollback_cmd(ctx: typer.Context,
                 to: Annotated[int | None, typer.Option("--to", min=0, help="Sync point to go back to (see `sync list`); "
                                                           "default: undo the newest sync.")] = None,
                 model_dir: ModelDirOpt = None, home: HomeOpt = None,
                 as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False) -> None:
    """Put the checkpoint back exactly to an earlier sync point, crash-safely (a killed rollback is finished on next load)."""
    from .undo import rollback

    model_dir, home, as_json = _parent(ctx, model_dir, home, as_json)
    _refuse_if_daemon(home, f"roll back {model_dir}")
    try:
        model_files(model_dir)
        report, _ = rollback(model_dir, to)
    except SyncError as exc:
        _fail(str(exc))
    typer.echo(json.dumps(report.model_dump(), indent=2) if as_json else report.summary())


if __name__ == "__main__":
    sync_app()
