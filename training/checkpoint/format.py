"""What checkpoint sync needs to know about safetensors files: where each tensor's bytes live.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON, then raw
little-endian tensor data; `data_offsets` count from byte 8 + N. Sync rewrites data bytes in place
and never the header, so the file keeps its size and header hash (the embedded-model cache marker
records exactly those and stays valid).

SyncError and JournalError live in engine.checkpoint_journal (every loader replays journals, and
engine may not import training), MismatchError and MissingTensorError in engine.param_names (the
vLLM backend raises them too); they are re-exported here. This module must not import torch: the
crash-test worker and `amygdala sync --dry-run` on plain files stay light.
"""

from __future__ import annotations

import json
import os
import stat as stat_mod
from dataclasses import dataclass
from math import prod
from pathlib import Path

from amygdala.engine.checkpoint_journal import JournalError, SyncError
from amygdala.engine.param_names import MismatchError, MissingTensorError  # defined beside the name table
from amygdala.engine.safetensors_file import HeaderError, header_length, header_sha256, read_header

__all__ = [
    "DTYPES", "AliasedMappingError", "DtypeInfo", "Fingerprint", "JournalError", "MismatchError", "MissingTensorError",
    "SafetensorsLayout", "StaleFileError", "SyncError", "TensorEntry", "WeightsChangedError", "fingerprint",
    "model_files", "read_layout", "read_layouts",
]

INDEX_NAME = "model.safetensors.index.json"


class StaleFileError(SyncError):
    """A model file changed on disk after sync read it (or since the served model was loaded)."""


class AliasedMappingError(SyncError):
    """Live tensors are memory-mapped from the very file sync would write."""


class WeightsChangedError(SyncError):
    """Training wrote the live weights while sync was reading them; nothing was written."""


@dataclass(frozen=True)
class DtypeInfo:
    """One safetensors dtype: its size, and its names in numpy / torch (None where absent)."""

    code: str
    itemsize: int
    numpy: str | None
    torch: str
    floating: bool


DTYPES: dict[str, DtypeInfo] = {d.code: d for d in (
    DtypeInfo("F64", 8, "float64", "float64", True),
    DtypeInfo("F32", 4, "float32", "float32", True),
    DtypeInfo("F16", 2, "float16", "float16", True),
    DtypeInfo("BF16", 2, None, "bfloat16", True),
    DtypeInfo("F8_E4M3", 1, None, "float8_e4m3fn", True),
    DtypeInfo("F8_E5M2", 1, None, "float8_e5m2", True),
    DtypeInfo("I64", 8, "int64", "int64", False),
    DtypeInfo("I32", 4, "int32", "int32", False),
    DtypeInfo("I16", 2, "int16", "int16", False),
    DtypeInfo("I8", 1, "int8", "int8", False),
    DtypeInfo("U64", 8, "uint64", "uint64", False),
    DtypeInfo("U32", 4, "uint32", "uint32", False),
    DtypeInfo("U16", 2, "uint16", "uint16", False),
    DtypeInfo("U8", 1, "uint8", "uint8", False),
    DtypeInfo("BOOL", 1, "bool", "bool", False),
)}


@dataclass(frozen=True)
class TensorEntry:
    """A tensor's place in its file; `start`/`end` are absolute file offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def info(self) -> DtypeInfo:
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class Fingerprint:
    """Identity and version of a file on disk: inode, size, mtime and the header hash."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    header_sha256: str

    def differs(self, other: "Fingerprint") -> str | None:
        """Why `other` is not the same file version as self, or None."""
        if (self.dev, self.ino) != (other.dev, other.ino):
            return "it was replaced by another file"
        if self.size != other.size:
            return f"its size changed ({self.size} -> {other.size} bytes)"
        if self.header_sha256 != other.header_sha256:
            return "its safetensors header changed"
        if self.mtime_ns != other.mtime_ns:
            return "it was modified"
        return None


@dataclass(frozen=True)
class SafetensorsLayout:
    """A parsed safetensors file: header facts plus every tensor's byte range."""

    path: Path
    header_len: int
    size: int
    tensors: dict[str, TensorEntry]
    fingerprint: Fingerprint

    @property
    def data_start(self) -> int:
        return 8 + self.header_len

    def by_offset(self) -> list[TensorEntry]:
        return sorted(self.tensors.values(), key=lambda e: e.start)


def fingerprint(path: Path) -> Fingerprint:
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        n = header_length(fd)
        digest = header_sha256(fd=fd, length=n) if 8 + n <= st.st_size else "unreadable"
    finally:
        os.close(fd)
    return Fingerprint(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, digest)


def read_layout(path: Path) -> SafetensorsLayout:
    """Parse and validate a safetensors file's header; raises SyncError if it is not a sane one."""
    if path.is_symlink():
        raise SyncError(f"{path} is a symlink (a HuggingFace hub cache entry?). Sync writes in place and would "
                        "change the shared target; copy the model into its own directory (cp -rL) and sync that.")
    if not path.is_file():
        raise SyncError(f"{path}: no such safetensors file")
    fp = fingerprint(path)
    try:
        n, header = read_header(path)
    except HeaderError as exc:
        raise SyncError(f"{path} is not a valid safetensors file: {exc}") from None
    data_start = 8 + n
    tensors: dict[str, TensorEntry] = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        dtype = spec.get("dtype")
        if dtype not in DTYPES:
            raise SyncError(f"{path.name}: tensor {name} has dtype {dtype!r}, which sync does not support "
                            f"(supported: {', '.join(DTYPES)})")
        begin, end = (int(x) for x in spec["data_offsets"])
        shape = tuple(int(s) for s in spec["shape"])
        if end - begin != prod(shape) * DTYPES[dtype].itemsize:
            raise SyncError(f"{path.name}: tensor {name} spans {end - begin} bytes but {dtype}{list(shape)} needs "
                            f"{prod(shape) * DTYPES[dtype].itemsize}: the file is corrupt")
        tensors[name] = TensorEntry(name, dtype, shape, data_start + begin, data_start + end)
    ordered = sorted(tensors.values(), key=lambda e: e.start)
    for a, b in zip(ordered, ordered[1:]):
        if b.start < a.end:
            raise SyncError(f"{path.name}: tensors {a.name} and {b.name} overlap: the file is corrupt")
    return SafetensorsLayout(path, n, fp.size, tensors, fp)


def model_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory: from the shard index if present, else *.safetensors."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise SyncError(f"{model_dir}: not a directory; pass the model directory that holds *.safetensors")
    index = model_dir / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise SyncError(f"{index} is not a valid shard index ({exc}); repair or delete it") from None
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(p for p in model_dir.glob("*.safetensors") if stat_mod.S_ISREG(p.lstat().st_mode) or p.is_symlink())
    if not files:
        raise SyncError(f"{model_dir}: no *.safetensors files; sync only works on safetensors checkpoints")
    return files


def read_layouts(files: list[Path]) -> list[SafetensorsLayout]:
    layouts = [read_layout(f) for f in files]
    seen: dict[str, Path] = {}
    for lay in layouts:
        for name in lay.tensors:
            if name in seen:
                raise SyncError(f"tensor {name} appears in both {seen[name].name} and {lay.path.name}; "
                                "a checkpoint must hold each tensor once")
            seen[name] = lay.path
    return layouts
