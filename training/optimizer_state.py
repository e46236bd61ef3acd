"""Optimizer state on disk between training jobs: safetensors for tensors, JSON for the rest, no pickle.

Layout under `config.optimizer_dir` (that is `$AMYGDALA_HOME/optimizer`), one directory per model
and optimizer variant, since moments of one model mean nothing to another:

    <model-key>/<kind>-r<rank>/state.json              the commit point (written last)
    <model-key>/<kind>-r<rank>/state-<generation>.safetensors

Each save writes a new generation's safetensors file (temp file, fsync, rename), then replaces
state.json atomically; only then is the previous generation deleted. A crash at any moment leaves
state.json naming a complete tensor file, whose sha256 is recorded and checked on load. Random
projections are not stored: the JSON keeps each matrix's projection seed and they are regenerated.

Generations only move forward: a save names the generation its process loaded (or last wrote), and
under the directory's lock (`state.lock`) the one on disk is read first; if it is newer, another
process (a newer worker, after a killed daemon's worker was orphaned) wrote it, and this save is
skipped with a warning instead of overwriting it.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from pathlib import Path

import torch
from filelock import FileLock
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from amygdala.fsio import atomic_write

from .apollo import Apollo

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
STATE_JSON = "state.json"
LOCK_NAME = "state.lock"
LOCK_TIMEOUT_S = 120


class OptimizerStateError(ValueError):
    """Stored optimizer state that cannot be used, with the reason and what to do."""


class ParamState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    shape: list[int]
    step: int | None = None
    seed: int | None = None
    proj_seed: int | None = None


class StoredOptimizerState(BaseModel):
    """state.json: everything but the tensors, plus the name and checksum of the tensor file."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    model_key: str
    kind: str
    hyperparameters: dict
    generation: int
    tensors_file: str
    tensors_sha256: str
    saved_at: float
    jobs_trained: int = 0
    params: dict[str, ParamState] = Field(default_factory=dict)


def model_key(named: list[tuple[str, nn.Parameter]], model_name: str) -> str:
    """Directory name identifying the trained parameter set: readable name + hash of names and shapes."""
    h = hashlib.sha256()
    for name, p in named:
        h.update(f"{name}:{tuple(p.shape)};".encode())
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", model_name).strip("-")[:48] or "model"
    return f"{safe}-{h.hexdigest()[:12]}"


def state_directory(root: Path, key: str, kind: str, rank: int) -> Path:
    return root / key / (f"{kind}-r{rank}" if kind != "adamw" else kind)


def _group_hparams(opt: Apollo) -> dict:
    keep = ("lr", "betas", "eps", "weight_decay", "correct_bias", "rank", "scale", "scale_type", "update_proj_gap")
    return {"groups": [{k: g[k] for k in keep if k in g} | {"n_params": len(g["params"])} for g in opt.param_groups]}


def _lock(directory: Path) -> FileLock:
    return FileLock(str(directory / LOCK_NAME), timeout=LOCK_TIMEOUT_S)


def stored_generation(directory: Path) -> int:
    """The generation state.json names (0: none, or unreadable)."""
    try:
        return StoredOptimizerState.model_validate_json((directory / STATE_JSON).read_bytes()).generation
    except (OSError, ValueError):
        return 0


def save_state(opt: Apollo, named: list[tuple[str, nn.Parameter]], directory: Path, *, key: str, kind: str,
               jobs_trained: int = 0, expect_generation: int | None = None) -> StoredOptimizerState | None:
    """Write the optimizer state crash-safely; returns what state.json now says.

    With `expect_generation` (the generation this process loaded or last wrote), a newer generation
    on disk means another process saved since: nothing is written, a warning is logged, None returned.
    """
    directory.mkdir(parents=True, exist_ok=True)
    with _lock(directory):
        on_disk = stored_generation(directory)
        if expect_generation is not None and on_disk > expect_generation:
            log.warning("optimizer state %s is at generation %d, newer than the %d this process loaded: another "
                        "worker saved it; not overwriting it with this (older) process's state", directory, on_disk,
                        expect_generation)
            return None
        return _save_locked(opt, named, directory, key=key, kind=kind, jobs_trained=jobs_trained, on_disk=on_disk)


def _save_locked(opt: Apollo, named: list[tuple[str, nn.Parameter]], directory: Path, *, key: str, kind: str,
                 jobs_trained: int, on_disk: int) -> StoredOptimizerState:
    names = {p: n for n, p in named}
    tensors, ints = opt.export_state(names)
    generations = [int(m.group(1)) for f in directory.glob("state-*.safetensors")
                   if (m := re.fullmatch(r"state-(\d+)\.safetensors", f.name))]
    generation = max(*generations, on_disk, 0) + 1
    data = st_save(tensors, metadata={"format_version": str(FORMAT_VERSION), "generation": str(generation)})
    tensors_file = f"state-{generation:08d}.safetensors"
    atomic_write(directory / tensors_file, data)
    stored = StoredOptimizerState(
        model_key=key, kind=kind, hyperparameters=_group_hparams(opt), generation=generation, tensors_file=tensors_file,
        tensors_sha256=hashlib.sha256(data).hexdigest(), saved_at=time.time(), jobs_trained=jobs_trained,
        params={n: ParamState(shape=list(p.shape), **ints[n]) for n, p in named})
    atomic_write(directory / STATE_JSON, stored.model_dump_json(indent=1).encode())
    for old in directory.glob("state-*.safetensors"):  # only after the commit point
        if old.name != tensors_file:
            old.unlink(missing_ok=True)
    return stored


def _read_json(directory: Path) -> StoredOptimizerState | None:
    path = directory / STATE_JSON
    if not path.is_file():
        return None
    try:
        return StoredOptimizerState.model_validate_json(path.read_bytes())
    except ValueError as exc:
        raise OptimizerStateError(f"{path} is not a valid optimizer state file ({exc}); move it aside to start "
                                  "with fresh optimizer state") from None


def load_state(opt: Apollo, named: list[tuple[str, nn.Parameter]], directory: Path) -> StoredOptimizerState | None:
    """Restore saved state into `opt`; None when nothing was saved yet. Raises OptimizerStateError on a mismatch."""
    if not (directory / STATE_JSON).is_file():
        return None
    with _lock(directory):  # state.json and its tensor file read as one pair, never mid-save
        return _load_locked(opt, named, directory)


def _load_locked(opt: Apollo, named: list[tuple[str, nn.Parameter]], directory: Path) -> StoredOptimizerState | None:
    stored = _read_json(directory)
    if stored is None:
        return None
    if stored.format_version != FORMAT_VERSION:
        raise OptimizerStateError(f"{directory}: optimizer state format {stored.format_version}, this version reads "
                                  f"{FORMAT_VERSION}; move the directory aside to start fresh")
    path = directory / stored.tensors_file
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise OptimizerStateError(f"{path}: cannot read optimizer tensors ({exc})") from None
    if hashlib.sha256(data).hexdigest() != stored.tensors_sha256:
        raise OptimizerStateError(f"{path}: checksum mismatch (file damaged); move {directory} aside to start fresh")
    shapes = {n: list(p.shape) for n, p in named}
    stored_shapes = {n: ps.shape for n, ps in stored.params.items()}
    if shapes != stored_shapes:
        diff = sorted(n for n in set(shapes) | set(stored_shapes) if shapes.get(n) != stored_shapes.get(n))
        raise OptimizerStateError(f"{directory}: saved for other parameters (first differences: {diff[:3]}); "
                                  "it belongs to another model or trainable set")
    tensors = st_load(data)
    ints = {n: ps.model_dump(exclude={"shape"}) for n, ps in stored.params.items()}
    try:
        opt.import_state({p: n for n, p in named}, tensors, ints)
    except ValueError as exc:
        raise OptimizerStateError(f"{directory}: {exc}") from None
    return stored


def move_aside(directory: Path) -> Path:
    """Rename unusable state out of the way (kept for inspection, never deleted) so training can start fresh."""
    target = directory.with_name(f"{directory.name}.unusable-{time.strftime('%Y%m%d-%H%M%S')}")
    directory.rename(target)
    return target


def clone_state(opt: Apollo, named: list[tuple[str, nn.Parameter]]) -> tuple[dict[str, torch.Tensor], dict]:
    """An in-memory copy of the state (for job snapshots); restore it with `opt.import_state`."""
    return opt.export_state({p: n for n, p in named})
