"""Finding live tensors that are memory-mapped from the checkpoint file sync is about to write.

transformers loads safetensors on CPU by mapping the file privately (MAP_PRIVATE, "rw-p" in
/proc/self/maps): untouched parameter pages *are* the file's page-cache pages. Writing the file
then changes those live weights underneath the model (and truncating it, as save_file over itself
does, makes them read garbage or SIGBUS: the corruption other projects hit). Sync never writes
through a mapping, it uses pwrite on its own fd, but that is not enough: the pages of a private
mapping that training has not touched still follow the file. So before writing, every live tensor
whose storage lies inside a mapping of a target file is either copied into private memory
(`privatize`, for an nn.Module: its parameters are swapped for clones, ties preserved) or the sync
is refused. A shared writable mapping (MAP_SHARED) is always refused: live writes would reach the
file without any journal.

Detection reads /proc/self/maps (Linux). Elsewhere it finds nothing and says so in the log.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAPS = Path("/proc/self/maps")


@dataclass(frozen=True)
class FileMapping:
    start: int
    end: int
    shared: bool
    path: Path


def file_mappings(paths: Iterable[Path]) -> list[FileMapping]:
    """This process's memory mappings of the given files (matched by device and inode)."""
    wanted: dict[tuple[int, int], Path] = {}
    for p in paths:
        try:
            st = os.stat(p)
        except FileNotFoundError:
            continue
        wanted[(st.st_dev, st.st_ino)] = Path(p)
    if not wanted:
        return []
    try:
        lines = MAPS.read_text().splitlines()
    except OSError:
        log.info("no %s on this system: cannot check live tensors for mappings of the checkpoint", MAPS)
        return []
    found = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) < 6:
            continue
        addr, perms, _offset, dev, inode = fields[:5]
        try:
            ino = int(inode)
            major, minor = (int(x, 16) for x in dev.split(":"))
        except ValueError:
            continue
        key = (os.makedev(major, minor), ino)
        if ino == 0 or key not in wanted:
            continue
        start, end = (int(x, 16) for x in addr.split("-"))
        found.append(FileMapping(start, end, perms[3] == "s", wanted[key]))
    return found


def memory_range(t: Any) -> tuple[int, int] | None:
    """[start, end) of the whole allocation behind a torch tensor or numpy array."""
    if hasattr(t, "untyped_storage"):
        if t.device.type != "cpu":
            return None
        st = t.untyped_storage()
        return st.data_ptr(), st.data_ptr() + st.nbytes()
    iface = getattr(t, "__array_interface__", None)
    if iface is None:
        return None
    root = t
    while getattr(root, "base", None) is not None and hasattr(root.base, "__array_interface__"):
        root = root.base
    ptr = root.__array_interface__["data"][0]
    return ptr, ptr + root.nbytes


def aliased(live: Mapping[str, Any], mappings: list[FileMapping]) -> dict[str, FileMapping]:
    """Live tensors whose memory overlaps one of the mappings."""
    out: dict[str, FileMapping] = {}
    if not mappings:
        return out
    for name, t in live.items():
        r = memory_range(t)
        if r is None:
            continue
        for m in mappings:
            if r[0] < m.end and m.start < r[1]:
                out[name] = m
                break
    return out


def privatize(module: Any, paths: Iterable[Path]) -> int:
    """Copy every parameter/buffer of `module` mapped from `paths` into private memory; returns bytes copied.

    Parameters are swapped with `p.data = clone`, so tied parameters (one Parameter object) stay tied
    and optimizers holding the Parameter keep working. Call it right after loading a model that will
    be synced; sync calls it itself when given a module.
    """
    import torch

    mappings = file_mappings(paths)
    if not mappings:
        return 0
    if any(m.shared for m in mappings):
        return 0  # caller refuses shared mappings; cloning would hide the problem
    copied = 0
    with torch.no_grad():
        for _name, p in module.named_parameters(remove_duplicate=True):
            if aliased({"p": p}, mappings):
                p.data = p.data.clone()
                copied += p.numel() * p.element_size()
        for _mod_name, mod in module.named_modules():
            for b_name, b in list(mod._buffers.items()):
                if b is not None and aliased({"b": b}, mappings):
                    mod._buffers[b_name] = b.clone()
                    copied += b.numel() * b.element_size()
    if copied:
        log.info("copied %.1f MB of live weights out of a memory map of the checkpoint before syncing", copied / 1e6)
    return copied
