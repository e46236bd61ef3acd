"""Readouts shipped as package data, and the hashes that decide whether one may be used.

Fitting the embedded model's readout from the corpus takes 10-25 minutes on a busy 2-core machine,
so the package ships the result of `amygdala vectors train --ship` under
`training/vectors/shipped/<model>/` together with `shipped.json`: the content hash of the weights
tensors it was built from (`LoadedModel.weights_hash`, over tensor names and bytes, not the file
header, which checkpoint sync keeps while it rewrites the bytes), the corpus hash and the hash of
the build settings. A first start whose model, corpus and settings hash the same copies it into the
home's readouts directory at once; any difference is reported in one line naming the hash and the
readout is built as before. `tests/test_shipped_readout_slow.py` checks those hashes against today's
and rebuilds two corpus families from scratch against `tests/data/subset_readout` (the same build
path in ~2 min; the full 10-25 min rebuild runs with AMYGDALA_FULL_REBUILD=1), so the shipped file
cannot go stale silently. After re-shipping, run `tests/data/make_subset_readout.py`.

Storage: the readout vectors and steering directions may be float16 (half the package size) when
measured to change scores (vectors) or pushes (directions) by at most `HALF_TOLERANCE`; every
statistic stays float32.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from amygdala.engine.readout import (
    DEFAULT_WINDOW,
    FORMAT_VERSION,
    MANIFEST_FILE,
    TENSORS_FILE,
    ReadoutManager,
)
from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from amygdala.engine.model import LoadedModel

    from .caa import CorpusActivations

SHIPPED_ROOT = Path(__file__).resolve().parent / "shipped"
SHIP_FILE = "shipped.json"
HALF_TOLERANCE = 1e-3
# Bump when the fit changes what a default build produces (a new grid, pooling, calibration or
# probe rule) without changing the settings below: shipped readouts of older builds then stop matching.
BUILD_VERSION = 1


def build_settings() -> dict:
    """Everything besides weights and corpus that decides what the default readout build produces."""
    from amygdala.engine.drift import PROBE_TEXTS, PROBE_TOKENS

    from .length_calibration import CALIBRATION_TOKENS
    from .validation import DEFAULT_GRID

    return {"build_version": BUILD_VERSION, "readout_format": FORMAT_VERSION, "layers": "all",
            "grid": [o.label() for o in DEFAULT_GRID], "held_out_per_emotion": 1,
            "calibration_tokens": list(CALIBRATION_TOKENS), "window": DEFAULT_WINDOW,
            "drift_probe": {"texts": PROBE_TEXTS, "tokens": PROBE_TOKENS}}


def settings_hash(settings: dict | None = None) -> str:
    blob = json.dumps(settings if settings is not None else build_settings(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class ShippedBuild(BaseModel):
    """`shipped.json`: what a shipped readout was built from, and what shipping it measured."""

    model_config = ConfigDict(extra="forbid")

    model_name: str
    hidden_size: int
    n_layers: int
    weights_hash: str
    corpus_hash: str
    settings_hash: str
    settings: dict
    storage: dict[str, str]
    half_max_abs_dz: float  # largest |z(float16 vectors) - z(float32)| over the corpus texts, any layer
    half_max_direction_error: float  # largest |d16 - d32| of a unit steering direction (relative push error)
    texts: int
    tokens: int
    build_seconds: float
    amygdala_version: str
    created: float


def shipped_builds(root: Path = SHIPPED_ROOT) -> list[tuple[Path, ShippedBuild]]:
    """Every complete shipped readout under root (a damaged one is skipped, never used)."""
    out = []
    if not root.is_dir():
        return out
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        if not all((d / f).is_file() for f in (SHIP_FILE, MANIFEST_FILE, TENSORS_FILE)):
            continue
        try:
            out.append((d, ShippedBuild.model_validate_json((d / SHIP_FILE).read_text())))
        except ValueError:
            continue
    return out


@dataclass
class ShippedChoice:
    directory: Path | None  # the shipped readout to use, or None
    message: str | None  # the one line saying why none was used (None when there is nothing to say)


def choose_shipped(lm: LoadedModel, corpus_hash: str, root: Path = SHIPPED_ROOT) -> ShippedChoice:
    """The shipped readout built from these weights, this corpus and these settings, if there is one.

    Cheap checks first: a model of another shape is told apart without hashing its weights.
    """
    builds = shipped_builds(root)
    if not builds:
        return ShippedChoice(None, None)
    same_shape = [(d, b) for d, b in builds if (b.hidden_size, b.n_layers) == (lm.hidden_size, lm.n_layers)]
    if not same_shape:
        names = ", ".join(f"{b.model_name} ({b.n_layers} layers, hidden {b.hidden_size})" for _, b in builds)
        return ShippedChoice(None, f"weights hash differs: {lm.name} ({lm.n_layers} layers, hidden {lm.hidden_size}) "
                                   f"is not a model a readout is shipped for ({names})")
    weights = lm.weights_hash()
    settings = settings_hash()
    best: tuple[list[str], Path, ShippedBuild] | None = None
    for d, b in same_shape:
        diffs = []
        if b.weights_hash != weights:
            diffs.append(f"weights hash differs (shipped {b.weights_hash}, served {weights}: other or trained weights)")
        if b.corpus_hash != corpus_hash:
            diffs.append(f"corpus hash differs (shipped {b.corpus_hash}, this corpus {corpus_hash}: edited corpus)")
        if b.settings_hash != settings:
            diffs.append(f"settings hash differs (shipped {b.settings_hash}, this build {settings}: other build settings)")
        if not diffs:
            return ShippedChoice(d, None)
        if best is None or len(diffs) < len(best[0]):
            best = (diffs, d, b)
    assert best is not None
    return ShippedChoice(None, f"{'; '.join(best[0])} for the shipped {best[2].model_name} readout")


def install_shipped(src: Path, dest: Path) -> Path:
    """Copy a shipped readout into `dest` (tensors first, manifest last: the manifest marks it complete)."""
    from amygdala.fsio import atomic_write

    dest.mkdir(parents=True, exist_ok=True)
    for name in (TENSORS_FILE, SHIP_FILE, MANIFEST_FILE):
        atomic_write(dest / name, (src / name).read_bytes())
    return dest


def try_shipped(lm: LoadedModel, corpus_hash: str, dest: Path, echo: Callable[[str], None] = print,
                root: Path = SHIPPED_ROOT) -> bool:
    """Install the matching shipped readout into `dest`; False (after one line saying why) when none matches."""
    t0 = time.perf_counter()
    choice = choose_shipped(lm, corpus_hash, root)
    if choice.directory is None:
        if choice.message:
            echo(f"amygdala: shipped readout not used: {choice.message}.")
        return False
    install_shipped(choice.directory, dest)
    echo(f"amygdala: using the shipped emotion readout for {lm.name} (built from these weights, corpus and settings; "
         f"checked and copied to {dest} in {time.perf_counter() - t0:.1f} s).")
    return True


# -- making one ------------------------------------------------------------------------------------

def _half_errors(readout: ReadoutManager, ca: CorpusActivations) -> tuple[float, float]:
    """(max |dz| from float16 vectors over every corpus text and layer, max |d16 - d32| of a direction)."""
    from .caa import small_linalg

    dz, dd = 0.0, 0.0
    pooled = ca.acts.pooled[readout.pooling]
    with small_linalg():
        for i, lr in readout.layers.items():
            x = pooled[i]
            z32 = lr.scores(x)
            half = lr.vectors.to(torch.float16).to(torch.float32)
            s16 = ((x.float() - lr.center) / lr.scale) @ half.T
            z16 = (s16 - lr.score_mean) / lr.score_std
            dz = max(dz, float((z16 - z32).abs().max()))
            dd = max(dd, float((lr.directions.to(torch.float16).to(torch.float32) - lr.directions).abs().max()))
    return dz, dd


def ship(readout: ReadoutManager, lm: LoadedModel, ca: CorpusActivations, corpus_hash: str, build_seconds: float,
         root: Path = SHIPPED_ROOT, tolerance: float = HALF_TOLERANCE) -> tuple[Path, ShippedBuild]:
    """Write `readout` as the shipped readout of lm's model under root/<model>/ with its shipped.json."""
    from amygdala.engine.readout import readout_dir_name

    from amygdala import __version__

    dz, dd = _half_errors(readout, ca)
    half = tuple(n for n, err in (("vectors", dz), ("directions", dd)) if err <= tolerance)
    out = root / readout_dir_name(lm.name, lm.path)
    tmp = root / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    readout.save(tmp, half=half)
    build = ShippedBuild(model_name=lm.name, hidden_size=lm.hidden_size, n_layers=lm.n_layers,
                         weights_hash=lm.weights_hash(), corpus_hash=corpus_hash, settings_hash=settings_hash(),
                         settings=build_settings(), storage={n: "float16" for n in half}, half_max_abs_dz=dz,
                         half_max_direction_error=dd, texts=len(ca.texts), tokens=ca.acts.n_tokens,
                         build_seconds=round(build_seconds, 1), amygdala_version=__version__, created=time.time())
    (tmp / SHIP_FILE).write_text(build.model_dump_json(indent=2) + "\n")
    for f in tmp.iterdir():
        f.chmod(0o644)  # package data: readable by every user of an installed wheel (save_file writes 0600)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out, build
