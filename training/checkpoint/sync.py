"""Checkpoint sync: bring a model directory's safetensors files up to date with the live weights.

The model directory *is* the checkpoint. After training changes a few percent of the weights,
rewriting a gigabyte file is wasteful and, done with save_file over a file the live model maps,
corrupting. Instead each file is mapped read-only, every tensor's bytes are compared with the live
weight (cast to the file's dtype) in 4 KiB blocks aligned to the file, and only blocks that differ
are written, with positioned writes on a separate fd, through an undo-mode journal
(engine.checkpoint_journal) that makes the whole directory go from old to new atomically even if
the process is killed: the old bytes of every block about to be overwritten are made durable first
(commit), then the new bytes are written in place from the live weights, fdatasynced, and an
applied record says so. A crash before the applied record is undone (the old bytes are written
back: the files are exactly as before, and the weights, still in the trainer's memory, are synced
again), one after it is finished. The old bytes are what the undo log keeps anyway: the journal
becomes the sync's undo-log entry (undo.py), so the checkpoint can be put back exactly to any of
the last `keep_undo` sync points, also after a restart (with keep_undo=0 they are deleted at the
end). So each changed byte is written twice (old copy, in place), not three times as with a redo
journal (still available, `journal_mode="redo"`: a crash after its commit lands the new bytes).

Races, both refused with the files as before: a file changed outside the lock (its fingerprint, and
every run's bytes against the crc taken while comparing, are checked after the commit, before the
first in-place write), and a training step writing the weights while they are copied (the seqlock
is read after the in-place writes, whose bytes come from the live weights: if it moved, the old
bytes are put back, file mtimes too, and WeightsChangedError is raised for the caller to retry).

Dirty tracking: a full compare reads the whole file and the whole live model (2 GB for the
embedded model). The training worker stamps every tensor a step writes with the weights version
(client.changed_since), so the serving process's CheckpointSyncer compares only tensors written
since its last sync; the others are equal to the file by construction (they were equal at load or
at the last sync, and nothing wrote them since). A sync with nothing dirty returns at once. Within
a dirty tensor, blocks whose bytes are equal are still never written.

What is refused, before anything is written: shape or dtype mismatch, a tensor on one side only
(a live tensor that is a tied alias of a synced one is fine), a file that changed on disk after it
was read, and live tensors mapped from the file being written (copied out first when we own the
module, see sync_alias). The header and size of every file never change, so the embedded model's
cache marker (header hash + sizes) stays valid.

Recovery: every loader replays an unfinished journal first (engine.model.load_model calls
engine.checkpoint_journal.replay_before_load); every sync and rollback also recovers first.
`CheckpointSyncer` is the serving-process object: it remembers the files' fingerprints so an outside
change to the checkpoint is refused, not overwritten.
"""

from __future__ import annotations

import logging
import mmap
import os
import sys
import threading
import time
import zlib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from amygdala.engine.checkpoint_journal import (
    UNDO_NAME,
    Journal,
    JournalWriter,
    RecoveryReport,
    abandon_journal,
    datasync,
    apply_journal,
    drop_journal,
    finish_journal,
    journal_path,
    locked,
    mark_applied,
    pwrite_all,
    new_meta,
    pending_journal,
    recover,
    recover_locked,
    restore_undo,
)
from pydantic import BaseModel, Field

from .alias import aliased, file_mappings, privatize
from .format import (
    AliasedMappingError,
    Fingerprint,
    JournalError,
    MismatchError,
    MissingTensorError,
    SafetensorsLayout,
    StaleFileError,
    SyncError,
    TensorEntry,
    WeightsChangedError,
    fingerprint,
    model_files,
    read_layouts,
)
from .names import NameScheme, to_file_names, unpacked_names
from .undo import (
    DEFAULT_KEEP,
    RollbackReport,
    SyncLog,
    prune,
    reserve,
    rollback,
    sync_log,
)

__all__ = [
    "BLOCK_SIZE", "DEFAULT_KEEP", "AliasedMappingError", "CheckpointSyncer", "JournalError", "MismatchError",
    "MissingTensorError", "RecoveryReport", "RollbackReport", "StaleFileError", "SyncError", "SyncLog", "SyncReport",
    "WeightsChangedError", "changed_blocks", "pending_journal", "recover", "rollback", "sync_checkpoint", "sync_log",
]

log = logging.getLogger(__name__)

BLOCK_SIZE = 4096
MAX_RUN_BYTES = 1 << 20  # one journal record / pwrite covers at most this much
COMPARE_CHUNK = 1 << 20  # compare this much at a time: stays in cache, bounds temporaries
POPULATE_FRACTION = 0.5  # map with MAP_POPULATE when comparing more than this share of a file

AliasPolicy = Literal["copy", "refuse"]
JournalMode = Literal["undo", "redo"]
EventHook = Callable[[str], None]
ChangedSince = Callable[[int], Collection[str] | None]
Reload = Callable[[list[str]], int]


class SyncReport(BaseModel):
    """Outcome of one sync; `blocks_written`/`bytes_written` are what a dry run would write."""

    model_dir: str
    files: list[str]
    dry_run: bool
    tensors_compared: int
    tensors_skipped: int = Field(0, description="tensors not compared: nothing wrote them since the last sync")
    tensors_touched: int
    touched: list[str] = Field(description="names of the tensors with at least one changed block")
    blocks_written: int
    bytes_written: int
    blocks_total: int = Field(0, description="blocks of the files' data: blocks_written / blocks_total is the fraction changed")
    writes: int = Field(description="pwrite calls on model files")
    journal_bytes: int = Field(description="bytes written besides the model files: the journal with its redo and undo data")
    undo_bytes: int = Field(0, description="old bytes kept for the undo log (in its data file, part of journal_bytes)")
    sync_id: int | None = Field(None, description="this sync's point in the undo log (None: nothing written, or no undo log)")
    weights_version: int | None = Field(None, description="the training seqlock's version the weights were read at")
    seconds: float
    recovery: RecoveryReport

    def summary(self) -> str:
        verb = "would write" if self.dry_run else "wrote"
        text = (f"{self.model_dir}: {self.tensors_touched}/{self.tensors_compared} tensors changed; {verb} "
                f"{self.blocks_written} blocks ({self.bytes_written / 2**20:.2f} MiB) in {self.writes} writes, "
                f"{self.seconds:.2f} s")
        if self.tensors_skipped:
            text += f"; {self.tensors_skipped} untouched tensors not compared"
        if self.sync_id is not None:
            text += f"; sync point {self.sync_id}"
        if self.recovery.status != "clean":
            text += f" (first {self.recovery.status} an unfinished journal: {self.recovery.detail})"
        return text


# --- live tensors ---------------------------------------------------------------------------------

def _is_module(obj: Any) -> bool:
    return hasattr(obj, "state_dict") and hasattr(obj, "named_parameters")


def _identity(t: Any) -> tuple | None:
    """Same storage, offset, shape, strides and dtype: two names for one tensor (tied weights)."""
    if hasattr(t, "data_ptr"):
        return ("torch", t.data_ptr(), tuple(t.shape), tuple(t.stride()), str(t.dtype), str(t.device))
    iface = getattr(t, "__array_interface__", None)
    if iface is not None:
        return ("numpy", iface["data"][0], tuple(t.shape), t.strides, t.dtype.str)
    return None


def _dtype_of(t: Any) -> tuple[str, bool]:
    """(dtype name as torch spells it, floating?) of a torch tensor or numpy array."""
    if hasattr(t, "is_floating_point"):
        return str(t.dtype).removeprefix("torch."), bool(t.is_floating_point())
    dt = np.dtype(t.dtype)
    return dt.name, dt.kind == "f"


def _file_bytes(t: Any, entry: TensorEntry) -> np.ndarray:
    """The live tensor as the flat little-endian bytes the file would hold (cast to the file's dtype)."""
    info = entry.info
    if isinstance(t, np.ndarray):
        if info.numpy is not None:
            a = t if t.dtype == np.dtype(info.numpy) else t.astype(info.numpy)
            return np.ascontiguousarray(a).reshape(-1).view(np.uint8)
        import torch

        t = torch.from_numpy(np.ascontiguousarray(t))
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    target = getattr(torch, info.torch)
    if t.dtype != target:
        t = t.to(target)
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def _match(live: Mapping[str, Any], entries: Mapping[str, TensorEntry], names: NameScheme) -> dict[str, Any]:
    """Live tensors keyed by file tensor name; refuses missing tensors and shape/dtype mismatches."""
    views, unmatched = to_file_names(live, {n: e.shape for n, e in entries.items()}, names)
    synced = {_identity(t) for t in views.values()}
    extra = [n for n in unmatched if _identity(live[n]) not in synced]  # tied aliases of synced tensors are fine
    if extra:
        raise MissingTensorError(f"{len(extra)} live tensor(s) have no counterpart in the checkpoint: "
                                 f"{', '.join(sorted(extra)[:8])}{' ...' if len(extra) > 8 else ''}. The live model "
                                 "is not this directory's model (or uses another name scheme: pass names='vllm' "
                                 "for vLLM parameter names).")
    absent = sorted(set(entries) - set(views))
    if absent:
        raise MissingTensorError(f"{len(absent)} checkpoint tensor(s) are missing from the live weights: "
                                 f"{', '.join(absent[:8])}{' ...' if len(absent) > 8 else ''}. Sync the full "
                                 "state (model.state_dict()), not a subset.")
    problems = []
    for name, entry in entries.items():
        t = views[name]
        shape = tuple(int(s) for s in t.shape)
        dtype, floating = _dtype_of(t)
        if shape != entry.shape:
            problems.append(f"{name}: live shape {list(shape)} vs file {list(entry.shape)}")
        elif dtype != entry.info.torch and not (floating and entry.info.floating):
            problems.append(f"{name}: live dtype {dtype} vs file {entry.dtype} (only float-to-float is cast)")
    if problems:
        raise MismatchError(f"{len(problems)} tensor(s) do not fit the checkpoint, nothing was written: "
                            + "; ".join(problems[:8]) + ("; ..." if len(problems) > 8 else "")
                            + ". Is the live model the one this directory holds?")
    return views


# --- block diff -----------------------------------------------------------------------------------

def changed_blocks(old: np.ndarray, new: np.ndarray, start: int, block: int) -> tuple[np.ndarray, list[int]]:
    """Indices of file blocks where `new` differs from `old` (both uint8, the tensor at file offset `start`).

    Returns (interior blocks lying wholly inside the tensor, boundary blocks shared with the header or
    a neighbouring tensor). Interior blocks are compared eight bytes at a time, a megabyte at a time.
    """
    n = len(old)
    boundary: list[int] = []
    if n == 0:
        return np.empty(0, np.int64), boundary
    head = min(n, block - start % block) if start % block else 0
    if head and not np.array_equal(old[:head], new[:head]):
        boundary.append(start // block)
    body = (n - head) // block * block
    tail = n - head - body
    if tail and not np.array_equal(old[n - tail:], new[n - tail:]):
        boundary.append((start + n - 1) // block)
    first = (start + head) // block
    chunk = max(block, COMPARE_CHUNK // block * block)
    found = []
    for off in range(0, body, chunk):
        m = min(chunk, body - off)
        o = old[head + off: head + off + m]
        w = new[head + off: head + off + m]
        if o.ctypes.data % 8 == 0 and w.ctypes.data % 8 == 0:
            ne = np.not_equal(o.view(np.uint64), w.view(np.uint64))
            per_block = block // 64
        else:
            ne = np.not_equal(o, w)
            per_block = block // 8
        mask = ne.view(np.uint64).reshape(-1, per_block).any(axis=1)
        idx = np.flatnonzero(mask)
        if len(idx):
            found.append(idx + (first + off // block))
    interior = np.concatenate(found) if found else np.empty(0, np.int64)
    return interior, boundary


def _runs(blocks: np.ndarray, max_blocks: int) -> list[tuple[int, int]]:
    """Consecutive block indices grouped into [first, last+1) runs of at most max_blocks."""
    if len(blocks) == 0:
        return []
    breaks = np.flatnonzero(np.diff(blocks) != 1) + 1
    out = []
    for seg in np.split(blocks, breaks):
        lo, hi = int(seg[0]), int(seg[-1]) + 1
        for s in range(lo, hi, max_blocks):
            out.append((s, min(hi, s + max_blocks)))
    return out


@dataclass
class _Run:
    """A changed block run: new bytes from a tensor's file image (interior) or a merged buffer (boundary)."""

    file_index: int
    offset: int
    length: int
    tensor: str | None
    data: bytes | None
    old_crc: int
    new_crcs: list[int]


def _block_crcs(data: Any, block: int) -> list[int]:
    view = memoryview(data).cast("B")
    return [zlib.crc32(view[i:i + block]) for i in range(0, len(view), block)]


def _map_flags(populate: bool) -> int:
    # MAP_POPULATE (Linux) builds the page tables in one go instead of ~16k faults per 64 MB.
    return mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)


def _diff_file(lay: SafetensorsLayout, file_index: int, views: Mapping[str, Any], compare: Collection[str],
               block: int, with_crcs: bool, progress: Any) -> tuple[list[_Run], list[str]]:
    """Pass 1: the changed-block runs of one file (only tensors in `compare`) and the tensors that changed."""
    runs: list[_Run] = []
    touched: list[str] = []
    max_blocks = max(1, MAX_RUN_BYTES // block)
    chosen = [e for e in lay.by_offset() if e.name in compare]
    if not chosen:
        return runs, touched
    populate = sum(e.nbytes for e in chosen) > POPULATE_FRACTION * lay.size
    with open(lay.path, "rb") as fh, mmap.mmap(fh.fileno(), 0, flags=_map_flags(populate), prot=mmap.PROT_READ) as mm:
        mv = memoryview(mm)
        try:
            pending: dict[int, bytearray] = {}
            for entry in chosen:
                new = _file_bytes(views[entry.name], entry)
                old = np.frombuffer(mm, np.uint8, entry.nbytes, entry.start)
                interior, boundary = changed_blocks(old, new, entry.start, block)
                del old
                if len(interior) or boundary:
                    touched.append(entry.name)
                for lo, hi in _runs(interior, max_blocks):
                    a, b = lo * block, hi * block
                    seg = new[a - entry.start: b - entry.start]
                    runs.append(_Run(file_index, a, b - a, entry.name, None, zlib.crc32(mv[a:b]),
                                     _block_crcs(seg, block) if with_crcs else []))
                for b_idx in boundary:
                    a, b = b_idx * block, min((b_idx + 1) * block, lay.size)
                    buf = pending.get(b_idx)
                    if buf is None:
                        buf = pending[b_idx] = bytearray(mv[a:b])
                    lo, hi = max(entry.start, a), min(entry.end, b)
                    with memoryview(buf) as dst:
                        dst[lo - a: hi - a] = memoryview(new[lo - entry.start: hi - entry.start])
                progress.update(entry.nbytes)
            for lo, hi in _runs(np.array(sorted(pending), dtype=np.int64), max_blocks):
                a, b = lo * block, min(hi * block, lay.size)
                data = b"".join(pending[i] for i in range(lo, hi))
                runs.append(_Run(file_index, a, len(data), None, data, zlib.crc32(mv[a:b]),
                                 _block_crcs(data, block) if with_crcs else []))
        finally:
            mv.release()
    return runs, touched


def _new_bytes(runs: list[_Run], views: Mapping[str, Any], entries: Mapping[str, TensorEntry]):
    """(run, its new bytes) for every run, from the live weights (one file image per tensor, no copy for fp32)."""
    name, new = None, None
    for r in runs:
        if r.data is not None:
            yield r, r.data
            continue
        entry = entries[r.tensor]  # type: ignore[index]
        if r.tensor != name:  # runs of one tensor are consecutive
            name, new = r.tensor, _file_bytes(views[r.tensor], entry)
        yield r, new[r.offset - entry.start: r.offset - entry.start + r.length]  # type: ignore[index]


def _write_journal(writer: JournalWriter, layouts: list[SafetensorsLayout], runs: list[_Run],
                   views: Mapping[str, Any], entries: Mapping[str, TensorEntry], with_undo: bool,
                   with_redo: bool = True) -> None:
    """Pass 2: the undo records (old bytes, straight from the file) first, then the redo records (redo mode).

    The undo records reuse the crc pass 1 took of the same file bytes; `_check_unchanged` re-reads the
    file against it after the commit, so a change in between is refused, not journaled.
    """
    if with_undo:
        for i, lay in enumerate(layouts):
            mine = [r for r in runs if r.file_index == i]
            if not mine:
                continue
            with open(lay.path, "rb") as fh, mmap.mmap(fh.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as mm:
                mv = memoryview(mm)
                try:
                    for r in mine:
                        writer.add_undo(i, r.offset, mv[r.offset:r.offset + r.length], r.new_crcs, crc=r.old_crc)
                finally:
                    mv.release()
    if with_redo:
        for r, data in _new_bytes(runs, views, entries):
            writer.add(r.file_index, r.offset, data)


def _write_in_place(journal: Journal, layouts: list[SafetensorsLayout], runs: list[_Run], views: Mapping[str, Any],
                    entries: Mapping[str, TensorEntry], check_version: Callable[[], None],
                    on_event: EventHook | None) -> int:
    """Undo mode, after the commit: the new bytes straight from the live weights into the files, fdatasynced.

    Returns the pwrite calls. On any error (WeightsChangedError included: a training step wrote the
    weights while they were copied, so the files may mix two steps) the old bytes are put back from
    the undo records and the journal is abandoned before the error propagates: the files are as
    before. If even that fails, the journal stays and the next load or sync restores them.
    """
    on_event = on_event or (lambda _e: None)
    targets = [lay.path for lay in layouts]
    writes = 0
    fds: list[int] = []
    try:
        try:
            for p in targets:
                fds.append(os.open(p, os.O_RDWR))
            for r, data in _new_bytes(runs, views, entries):
                writes += pwrite_all(fds[r.file_index], data, r.offset)
                on_event("block-written")
            for fd in fds:
                datasync(fd)  # overwrites only: the data is all that must reach the disk
        finally:
            for fd in fds:
                os.close(fd)
        on_event("files-synced")
        check_version()
    except BaseException:
        try:
            restore_undo(journal, targets)
            for lay in layouts:  # the same bytes and the same fingerprint: a retry (or CheckpointSyncer) sees no change
                os.utime(lay.path, ns=(os.stat(lay.path).st_atime_ns, lay.fingerprint.mtime_ns))
            abandon_journal(journal, journal.path.parent)
        except BaseException:
            log.exception("could not put %s back after a failed sync; the next load or sync restores it",
                          journal.path.parent)
        raise
    return writes


def _check_unchanged(layouts: list[SafetensorsLayout], runs: list[_Run], journal: Path,
                     drop: Callable[[], None] | None = None) -> None:
    """Refuse (dropping the journal, whose writes have not begun) if any file changed since sync read it."""
    written = {r.file_index for r in runs}
    for i in sorted(written):
        lay = layouts[i]
        why = lay.fingerprint.differs(fingerprint(lay.path))
        if why is None:
            fd = os.open(lay.path, os.O_RDONLY)
            try:
                for r in runs:
                    if r.file_index == i and zlib.crc32(os.pread(fd, r.length, r.offset)) != r.old_crc:
                        why = f"bytes at offset {r.offset} were rewritten"
                        break
            finally:
                os.close(fd)
        if why is not None:
            drop() if drop is not None else drop_journal(journal)
            raise StaleFileError(f"{lay.path} changed on disk while syncing ({why}); nothing was written. "
                                 "Another process is writing this checkpoint: stop it, then sync again.")


def _dirty_file_names(only: Collection[str], live_map: Mapping[str, Any], names: NameScheme) -> set[str] | None:
    """Checkpoint tensor names behind the live tensors `only` names (tied aliases included); None: unknown names."""
    unknown = [n for n in only if n not in live_map]
    if unknown:
        log.info("dirty tensors %s are not in the live state dict: comparing every tensor", unknown[:3])
        return None
    idents = {_identity(live_map[n]) for n in only}
    out: set[str] = set()
    for n, t in live_map.items():
        if n in only or _identity(t) in idents:
            out.update(unpacked_names(n, names) or (n,))
    return out


# --- sync -----------------------------------------------------------------------------------------

@dataclass
class _Outcome:
    report: SyncReport
    fingerprints: dict[str, Fingerprint]
    version: int | None  # the weights version read at the start (even, unchanged through the read)


def _live_map(live: Any, files: list[Path], on_alias: AliasPolicy, lock: Any,
              mapped: list | None = None) -> tuple[dict[str, Any], list]:
    """(live tensors by name, this process's mappings of `files` afterwards): /proc/self/maps is read once."""
    mapped = file_mappings(files) if mapped is None else mapped
    if not _is_module(live):
        return dict(live), mapped
    if mapped and on_alias == "copy" and not any(m.shared for m in mapped):
        if lock is not None:
            with lock:
                privatize(live, files)
        else:
            privatize(live, files)
        mapped = file_mappings(files)
    skip = set(getattr(live, "_keys_to_ignore_on_save", None) or ())  # HF: never written to files
    return {k: v for k, v in live.state_dict().items() if k not in skip}, mapped


def _sync(model_dir: Path, live: Any, *, names: NameScheme, dry_run: bool, block_size: int,
          expect: Mapping[str, Fingerprint] | None, on_alias: AliasPolicy, lock: Any,
          on_event: EventHook | None, progress: bool, weights_version: Callable[[], int] | None = None,
          only: Collection[str] | None = None, keep_undo: int = DEFAULT_KEEP, label: str | None = None,
          journal_mode: JournalMode = "undo") -> _Outcome:
    from tqdm import tqdm

    if sys.byteorder != "little":
        raise SyncError("checkpoint sync compares raw bytes and needs a little-endian machine (safetensors is little-endian)")
    if block_size < 64 or block_size % 64:
        raise ValueError(f"block_size {block_size}: use a multiple of 64 (default {BLOCK_SIZE})")
    if keep_undo < 0:
        raise ValueError(f"keep_undo {keep_undo}: use 0 (no undo log) or more")
    if journal_mode not in ("undo", "redo"):
        raise ValueError(f"journal_mode {journal_mode!r}: use 'undo' (default) or 'redo'")
    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    files = model_files(model_dir)
    with locked(model_dir):
        recovery = recover_locked(model_dir)
        layouts = read_layouts(files)
        if expect is not None:
            for lay in layouts:
                known = expect.get(lay.path.name)
                why = "it is new" if known is None else known.differs(lay.fingerprint)
                if why:
                    raise StaleFileError(f"{lay.path} changed on disk since the served model was loaded ({why}); "
                                         "syncing would overwrite that change. Restart to serve the new checkpoint, "
                                         "or call rebase() to accept it and overwrite it with the live weights.")
        live_map, mapped = _live_map(live, files, on_alias, lock)
        entries = {name: e for lay in layouts for name, e in lay.tensors.items()}
        views = _match(live_map, entries, names)
        hits = aliased(views, mapped)
        if hits:
            name, m = next(iter(hits.items()))
            kind = "a shared (MAP_SHARED)" if m.shared else "a private"
            raise AliasedMappingError(
                f"{len(hits)} live tensor(s), e.g. {name}, live in {kind} memory map of {m.path}: writing the file "
                "would change them underneath the model. Pass the nn.Module itself (sync copies mapped weights out), "
                "or clone the tensors first; nothing was written.")
        compare: Collection[str] = entries.keys()
        if only is not None:
            dirty = _dirty_file_names(only, live_map, names)
            if dirty is not None:
                compare = dirty & entries.keys()

        version = weights_version() if weights_version else None
        with_undo = keep_undo > 0 and not dry_run
        runs: list[_Run] = []
        touched: list[str] = []
        total = sum(entries[n].nbytes for n in compare)
        with tqdm(total=total, unit="B", unit_scale=True, desc="sync: compare", disable=not progress, leave=False) as bar:
            for i, lay in enumerate(layouts):
                r, t = _diff_file(lay, i, views, compare, block_size, with_undo, bar)
                runs += r
                touched += t

        def check_version(read: bool = True) -> None:
            if weights_version and (version % 2 or (read and weights_version() != version)):  # type: ignore[operator]
                raise WeightsChangedError("a training step wrote the live weights while sync was reading them; "
                                          "nothing was written. Sync again once the training job has finished.")

        journal_bytes = undo_bytes = writes = 0
        sync_id: int | None = None
        blocks = sum((r.length + block_size - 1) // block_size for r in runs)
        nbytes = sum(r.length for r in runs)
        if dry_run or not runs:
            check_version()
        else:
            slot = reserve(model_dir) if with_undo else None
            in_place = journal_mode == "undo"
            info = {"tensors": touched, "blocks": blocks, "bytes": nbytes, "weights_version": version, "label": label,
                    "parent": slot.parent if slot else None}
            undo_data = slot.undo_data if slot else UNDO_NAME if in_place else None
            meta = new_meta(block_size, [(lay.path.name, lay.size, lay.fingerprint.header_sha256) for lay in layouts],
                            kind="sync", sync_id=slot.sync_id if slot else None, keep_as=slot.keep_as if slot else None,
                            undo_data=undo_data, after=slot.after if slot else [], info=info,
                            redo_data=not in_place, mode=journal_mode)
            jpath = journal_path(model_dir)
            writer = JournalWriter(jpath, meta, on_event=on_event)

            def fill() -> None:
                _write_journal(writer, layouts, runs, views, entries, with_undo or in_place, with_redo=not in_place)
                # Undo mode reads the weights once more, for the in-place writes, so the seqlock is read
                # after them; here only a step already known to be running (odd version) stops it early.
                check_version(read=not in_place)

            journal, journal_bytes = writer.write_and_commit(fill)
            if in_place:
                # Old bytes durable, nothing in the files touched yet: check, write in place, mark applied.
                _check_unchanged(layouts, runs, jpath, drop=lambda: abandon_journal(journal, model_dir))
                writes = _write_in_place(journal, layouts, runs, views, entries, check_version, on_event)
                journal = mark_applied(journal, on_event)
            else:
                _check_unchanged(layouts, runs, jpath)
                writes = apply_journal(journal, [lay.path for lay in layouts], on_event=on_event).writes
            finish_journal(journal, model_dir, on_event=on_event)
            undo_bytes = journal.undo_bytes if slot else 0
            sync_id = slot.sync_id if slot else None
            if slot:
                prune(model_dir, keep_undo)
        after = {lay.path.name: fingerprint(lay.path) for lay in layouts}
    report = SyncReport(
        model_dir=str(model_dir), files=[lay.path.name for lay in layouts], dry_run=dry_run,
        tensors_compared=len(compare), tensors_skipped=len(entries) - len(compare), tensors_touched=len(touched),
        touched=touched, blocks_written=blocks, bytes_written=nbytes,
        blocks_total=sum((lay.size - lay.data_start + block_size - 1) // block_size for lay in layouts),
        writes=writes, journal_bytes=journal_bytes, undo_bytes=undo_bytes, sync_id=sync_id, weights_version=version,
        seconds=round(time.perf_counter() - t0, 4), recovery=recovery)
    log.info("sync: %s", report.summary())
    return _Outcome(report, after, version)


def sync_checkpoint(model_dir: Path, live: Any, *, names: NameScheme = "transformers", dry_run: bool = False,
                    block_size: int = BLOCK_SIZE, expect: Mapping[str, Fingerprint] | None = None,
                    on_alias: AliasPolicy = "copy", lock: Any = None, on_event: EventHook | None = None,
                    progress: bool = False, weights_version: Callable[[], int] | None = None,
                    only: Collection[str] | None = None, keep_undo: int = DEFAULT_KEEP,
                    label: str | None = None, journal_mode: JournalMode = "undo") -> SyncReport:
    """Write the blocks of `model_dir`'s safetensors files that differ from `live`, crash-safely.

    `live`: an nn.Module (its state_dict; weights mapped from the target files are first copied into
    private memory, under `lock` if given, unless on_alias="refuse") or a name -> tensor mapping
    (torch or numpy). `names`: "transformers" (identity) or "vllm" (packed qkv/gate_up split back).
    `expect`: file name -> fingerprint the files must still have (see CheckpointSyncer).
    `on_event`: called at each step ("journal-undo", "journal-record" (redo mode), "journal-committed",
    "block-written", "files-synced", "journal-applied" (undo mode), "done"), for progress and crash tests. `weights_version`: a
    seqlock reader (odd while training writes, e.g. `lambda: client.weights_version`); if it is odd
    or moves while the weights are read, WeightsChangedError, so a checkpoint never mixes two
    training steps. `only`: live tensor names to compare (the rest are known to equal the files);
    None compares everything. `keep_undo`: syncs kept in the undo log (0: none, and no old bytes
    are kept; they are still journaled for crash safety, then deleted). `journal_mode`: "undo" (the
    default: old bytes journaled, new bytes written in place; a crash before the end restores the
    old files, the live weights still hold the new ones) or "redo" (the new bytes journaled too and
    replayed after a crash: for callers that cannot sync again; every changed byte is written
    twice more). Raises a SyncError subclass, with the files untouched, on any refusal.
    """
    return _sync(Path(model_dir), live, names=names, dry_run=dry_run, block_size=block_size, expect=expect,
                 on_alias=on_alias, lock=lock, on_event=on_event, progress=progress, weights_version=weights_version,
                 only=only, keep_undo=keep_undo, label=label, journal_mode=journal_mode).report


def _read_file_tensors(model_dir: Path, wanted: Collection[str]) -> dict[str, np.ndarray]:
    """Private copies (uint8, file bytes) of the named checkpoint tensors."""
    out: dict[str, np.ndarray] = {}
    for lay in read_layouts(model_files(model_dir)):
        mine = [e for e in lay.by_offset() if e.name in wanted]
        if not mine:
            continue
        fd = os.open(lay.path, os.O_RDONLY)
        try:
            for e in mine:
                out[e.name] = np.frombuffer(os.pread(fd, e.nbytes, e.start), np.uint8)
        finally:
            os.close(fd)
    return out


def reload_into(live: Any, model_dir: Path, wanted: Collection[str], names: NameScheme = "transformers",
                lock: Any = None) -> int:
    """Copy the checkpoint's current bytes of the tensors `wanted` (file names) into the live weights.

    For a live model nobody else writes (no training worker): the serving process after an undo, tests,
    offline tools. Returns the number of tensors that differed and were copied.
    """
    import torch

    files = model_files(model_dir)
    layouts = read_layouts(files)
    entries = {n: e for lay in layouts for n, e in lay.tensors.items()}
    live_map, _ = _live_map(live, files, "copy", lock)
    views = _match(live_map, entries, names)
    data = _read_file_tensors(model_dir, set(wanted) & entries.keys())
    copied = 0
    ctx = lock if lock is not None else _NoLock()
    with ctx, torch.no_grad():
        for name, raw in data.items():
            e, dst = entries[name], views[name]
            if np.array_equal(raw, _file_bytes(dst, e)):
                continue
            if isinstance(dst, np.ndarray):
                src = raw.view(e.info.numpy).reshape(e.shape) if e.info.numpy else None
                if src is None:
                    raise SyncError(f"{name}: cannot reload a {e.dtype} tensor into a numpy array")
                np.copyto(dst, src.astype(dst.dtype))
            else:
                t = torch.frombuffer(bytearray(raw.tobytes()), dtype=getattr(torch, e.info.torch)).reshape(e.shape)
                dst.copy_(t.to(dst.dtype))
            copied += 1
    return copied


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class CheckpointSyncer:
    """Syncs one served model to its directory, refusing to overwrite changes made by anyone else.

    Create it right after loading the model (after recovery); it records the files' fingerprints
    then and after each of its syncs, and a file that differs from the record is refused
    (StaleFileError) until `rebase()`. With `weights_version` (the training worker's seqlock), a sync
    that overlaps a training step is retried a few times, then refused (WeightsChangedError). With
    `changed_since` too (the worker's dirty stamps, `TrainingClient.changed_since`), only tensors
    written since the last sync are compared, and a sync with nothing dirty returns at once.

    Undo (`undo_to`, `undo_last`, `sync_points`): the checkpoint goes back to an earlier sync point,
    and then the live weights are made equal to it, by `reload` (the training worker's
    `reload_from_checkpoint`, which owns the weights while it runs) or, without one, by copying into
    `live` directly under `lock`. Every weight change not yet synced is discarded with it: the state
    after an undo to S is exactly sync point S, on disk and live.
    """

    def __init__(self, model_dir: Path, live: Any, *, names: NameScheme = "transformers", lock: Any = None,
                 block_size: int = BLOCK_SIZE, on_alias: AliasPolicy = "copy",
                 weights_version: Callable[[], int] | None = None, changed_since: ChangedSince | None = None,
                 reload: Reload | None = None, keep_undo: int = DEFAULT_KEEP, retries: int = 3,
                 retry_wait_s: float = 1.0):
        self.model_dir = Path(model_dir)
        if pending_journal(self.model_dir):
            raise JournalError(f"{self.model_dir} has an unfinished sync journal: call "
                               "training.checkpoint.sync.recover(model_dir) before loading the model from it, "
                               "or the served weights would be the pre-crash ones")
        if changed_since is not None and weights_version is None:
            raise ValueError("changed_since needs weights_version: dirty stamps are only meaningful against the seqlock")
        self.live = live
        self.names: NameScheme = names
        self.lock = lock
        self.block_size = block_size
        self.on_alias: AliasPolicy = on_alias
        self.weights_version = weights_version
        self.changed_since = changed_since
        self.reload = reload
        self.keep_undo = keep_undo
        self.retries = retries
        self.retry_wait_s = retry_wait_s
        self.fingerprints: dict[str, Fingerprint] = {}
        self.synced_version = 0  # weights version the files match; stamps above it are unsynced changes
        self._mutex = threading.Lock()  # one sync or undo at a time within this process
        self.rebase()

    def rebase(self) -> None:
        """Accept the files as they are on disk now as the baseline."""
        self.fingerprints = {p.name: fingerprint(p) for p in model_files(self.model_dir)}

    def _dirty(self) -> Collection[str] | None:
        return self.changed_since(self.synced_version) if self.changed_since is not None else None

    def _clean_report(self, version: int, t0: float) -> SyncReport:
        return SyncReport(model_dir=str(self.model_dir), files=sorted(self.fingerprints), dry_run=False,
                          tensors_compared=0, tensors_skipped=0, tensors_touched=0, touched=[], blocks_written=0,
                          bytes_written=0, writes=0, journal_bytes=0, weights_version=version,
                          seconds=round(time.perf_counter() - t0, 6), recovery=RecoveryReport(status="clean"))

    def sync(self, dry_run: bool = False, progress: bool = False, label: str | None = None) -> SyncReport:
        t0 = time.perf_counter()
        with self._mutex:
            for attempt in range(self.retries + 1):
                only = self._dirty()
                if only is not None and not only and not dry_run and not pending_journal(self.model_dir):
                    version = self.weights_version()  # type: ignore[misc]
                    if version % 2 == 0 and not self._dirty():
                        return self._clean_report(version, t0)  # nothing written since the last sync
                try:
                    out = _sync(self.model_dir, self.live, names=self.names, dry_run=dry_run,
                                block_size=self.block_size, expect=self.fingerprints, on_alias=self.on_alias,
                                lock=self.lock, on_event=None, progress=progress, weights_version=self.weights_version,
                                only=only, keep_undo=self.keep_undo, label=label)
                except WeightsChangedError:
                    if attempt == self.retries:
                        raise
                    log.info("training wrote weights during sync; retrying in %.1f s", self.retry_wait_s)
                    time.sleep(self.retry_wait_s)
                    continue
                self.fingerprints = out.fingerprints
                if not dry_run and out.version is not None:
                    self.synced_version = out.version
                return out.report
        raise AssertionError("unreachable")

    # -- undo log -------------------------------------------------------------------------------
    def sync_points(self) -> SyncLog:
        """The kept sync points and where the checkpoint is now (`amygdala sync list`)."""
        return sync_log(self.model_dir)

    def undo_last(self) -> RollbackReport:
        """Undo the newest kept sync (checkpoint and live weights)."""
        return self.undo_to(None)

    def undo_to(self, sync_id: int | None) -> RollbackReport:
        """Put checkpoint and live weights back to sync point `sync_id` (None: before the newest kept sync).

        Refused (SyncError, nothing written) when the point is not in the undo log or the files were
        changed outside it. A kill midway leaves a journal the next load or sync finishes.
        """
        with self._mutex:
            dirty = self._dirty()
            report, after = rollback(self.model_dir, sync_id, expect=self.fingerprints)
            self.fingerprints = after
            if dirty is None:  # no tracking: anything may differ from the files
                names = {n for lay in read_layouts(model_files(self.model_dir)) for n in lay.tensors}
            else:
                live_map, _ = _live_map(self.live, model_files(self.model_dir), self.on_alias, self.lock)
                names = set(report.tensors) | (_dirty_file_names(dirty, live_map, self.names) or set())
            if self.reload is not None:
                self.synced_version = self.reload(sorted(names))
            else:
                reload_into(self.live, self.model_dir, names, self.names, self.lock)
                if self.weights_version is not None:
                    self.synced_version = self.weights_version()
            return report
