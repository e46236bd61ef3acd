"""Crash-safe file primitives, the one copy every package uses (stdlib only, imports nothing of ours).

The rule they implement: a durable replace writes a temp file in the same directory (os.replace is
atomic only within one file system), fsyncs it, renames it over the target and fsyncs the directory
(the new name lives in the directory's entry). A crash at any point leaves the old file or the new
one, never a mix.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

TMP_MARKER = ".tmp-"


def fsync_dir(directory: Path) -> None:
    """Make a rename or file creation in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """fsync a file written by someone else (e.g. safetensors' save_file) before renaming it into place."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """os.write may write less than asked; a short write left as-is would tear a journal line."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def sync_data(fd: int) -> None:
    # fdatasync skips the inode timestamp update but still persists the size change an append
    # makes, which is all an append-only journal needs.
    (getattr(os, "fdatasync", None) or os.fsync)(fd)


def tmp_path_for(path: Path) -> Path:
    """A unique temp name beside `path` (same directory, so the final rename is atomic)."""
    return path.with_name(f"{path.name}{TMP_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write(path: Path, chunks: list[bytes] | bytes) -> None:
    """Replace `path` with `chunks` so a crash leaves either the old or the new file, never a mix."""
    path = Path(path)
    tmp = tmp_path_for(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for chunk in [chunks] if isinstance(chunks, (bytes, bytearray)) else chunks:
            write_all(fd, chunk)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, text.encode())


def replace_durably(tmp: Path, path: Path) -> None:
    """Rename an already-written temp file over `path`, fsyncing the file first and the directory after."""
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def link_replace(src: Path, dst: Path) -> None:
    """Point `dst` at `src`'s current contents without copying (a hard link, then a rename)."""
    tmp = tmp_path_for(dst)
    os.link(src, tmp)
    os.replace(tmp, dst)


def remove_stale_temps(directory: Path) -> list[Path]:
    """Delete temp files a crashed writer left behind; only call this while holding the writer lock."""
    removed = []
    for p in directory.iterdir():
        if TMP_MARKER in p.name and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
