"""`amygdala sync --model-dir DIR --from CHECKPOINT`: apply a set of weights to a model directory offline.

The same crash-safe block sync the server runs after training, with a safetensors file (or a
directory of them) as the "live" weights. Mount with `app.command("sync")(sync_cmd)`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from .format import SyncError, model_files


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
        except Exception as exc:  # safetensors raises its own error types
            raise SyncError(f"--from {f}: not a readable safetensors file ({exc})") from None
        dup = set(tensors) & set(out)
        if dup:
            raise SyncError(f"--from {source}: tensor {sorted(dup)[0]} appears in more than one file")
        out.update(tensors)
    return out


def _same_files(a: Path, b: Path) -> bool:
    fa = model_files(a) if a.is_dir() else [a]
    fb = model_files(b)
    return any(x.exists() and y.exists() and x.samefile(y) for x in fa for y in fb)


def sync_cmd(
    model_dir: Annotated[Path, typer.Option("--model-dir", help="Model directory whose *.safetensors files are updated in place.")],
    source: Annotated[Path, typer.Option("--from", help="Safetensors file or directory with the new weights (same tensor names).")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report what would be written; write nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bar while comparing.")] = True,
) -> None:
    """Write only the 4 KiB blocks of DIR's safetensors that differ from CHECKPOINT, crash-safely.

    An interrupted earlier sync of DIR is finished (or discarded, if it never committed) first.
    """
    from .sync import sync_checkpoint

    try:
        if not source.exists():
            raise SyncError(f"--from {source}: no such file or directory")
        if _same_files(source, model_dir):
            raise SyncError(f"--from {source} is the checkpoint in --model-dir {model_dir} itself: nothing to sync")
        live = load_checkpoint_tensors(source)
        report = sync_checkpoint(model_dir, live, dry_run=dry_run, progress=progress and not as_json and sys.stderr.isatty())
    except SyncError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps(report.model_dump(), indent=2))
    else:
        typer.echo(report.summary())


sync_app = typer.Typer(help="Checkpoint sync.", pretty_exceptions_enable=False)
sync_app.command("sync")(sync_cmd)

if __name__ == "__main__":
    sync_app()
