"""Checkpoint sync: bring a model directory's safetensors files up to date with the live weights.

The model directory *is* the checkpoint. After training changes a few percent of the weights,
rewriting a gigabyte file is wasteful and, done with save_file over a file the live model maps,
corrupting. Instead each file is mapped read-only, every tensor's bytes are compared with the live
weight (cast to the file's dtype) in 4 KiB blocks aligned to the file, and only blocks that differ
are written, with positioned writes on a separate fd, through a redo journal (sync_journal) that
makes the whole directory flip from old to new atomically even if the process is killed.

What is refused, before anything is written: shape or dtype mismatch, a tensor on one side only
(a live tensor that is a tied alias of a synced one is fine), a file that changed on disk after it
was read, and live tensors mapped from the file being written (copied out first when we own the
module, see sync_alias). The header and size of every file never change, so the embedded model's
cache marker (header hash + sizes) stays valid.

Recovery: call `recover(model_dir)` before loading a model from a directory (the server does it at
start-up); every sync also recovers first. `CheckpointSyncer` is the serving-process object: it
remembers the files' fingerprints so an outside change to the checkpoint is refused, not overwritten.
"""

from __future__ import annotations

import logging
import mmap
import os
import sys
import time
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from filelock import FileLock, Timeout
from pydantic import BaseModel, Field

from .alias import aliased, file_mappings, privatize
from .format import (
    AliasedMappingError, Fingerprint, JournalError, MismatchError, MissingTensorError, SafetensorsLayout,
    StaleFileError, SyncError, TensorEntry, WeightsChangedError, fingerprint, model_files, read_layouts,
)
from .journal import (
    Journal, JournalRecord, JournalWriter, TornJournal, apply_journal, check_targets, finish_journal,
    journal_path, new_meta, read_journal,
)
from .names import NameScheme, to_file_names

__all__ = [
    "BLOCK_SIZE", "AliasedMappingError", "CheckpointSyncer", "JournalError", "MismatchError", "MissingTensorError",
    "RecoveryReport", "StaleFileError", "SyncError", "SyncReport", "WeightsChangedError", "changed_blocks",
    "pending_journal", "recover", "sync_checkpoint",
]

log = logging.getLogger(__name__)

BLOCK_SIZE = 4096
MAX_RUN_BYTES = 1 << 20  # one journal record / pwrite covers at most this much
COMPARE_CHUNK = 1 << 20  # compare this much at a time: stays in cache, bounds temporaries
LOCK_NAME = ".amygdala-sync.lock"
LOCK_TIMEOUT_S = 600

# Read-only shared mapping; MAP_POPULATE (Linux) builds the page tables in one go instead of ~16k faults.
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)

AliasPolicy = Literal["copy", "refuse"]
EventHook = Callable[[str], None]


class RecoveryReport(BaseModel):
    """What start-up recovery found: no journal, a committed one (replayed), or a torn one (discarded)."""

    status: Literal["clean", "replayed", "discarded"]
    detail: str = ""
    blocks_written: int = 0
    bytes_written: int = 0


class SyncReport(BaseModel):
    """Outcome of one sync; `blocks_written`/`bytes_written` are what a dry run would write."""

    model_dir: str
    files: list[str]
    dry_run: bool
    tensors_compared: int
    tensors_touched: int
    touched: list[str] = Field(description="names of the tensors with at least one changed block")
    blocks_written: int
    bytes_written: int
    writes: int = Field(description="pwrite calls on model files")
    journal_bytes: int
    seconds: float
    recovery: RecoveryReport

    def summary(self) -> str:
        verb = "would write" if self.dry_run else "wrote"
        text = (f"{self.model_dir}: {self.tensors_touched}/{self.tensors_compared} tensors changed; {verb} "
                f"{self.blocks_written} blocks ({self.bytes_written / 2**20:.2f} MiB) in {self.writes} writes, "
                f"{self.seconds:.2f} s")
        if self.recovery.status != "clean":
            text += f" (first {self.recovery.status} an unfinished journal: {self.recovery.detail})"
        return text


# --- recovery -------------------------------------------------------------------------------------

def _dir_lock(model_dir: Path) -> FileLock:
    return FileLock(str(Path(model_dir) / LOCK_NAME), timeout=LOCK_TIMEOUT_S)


def _locked(model_dir: Path):
    lock = _dir_lock(model_dir)
    try:
        lock.acquire()
    except Timeout:
        raise SyncError(f"another sync of {model_dir} has held {LOCK_NAME} for {LOCK_TIMEOUT_S} s; "
                        "wait for it or check for a stuck process") from None
    return lock


def pending_journal(model_dir: Path) -> bool:
    """True if a sync of this directory was interrupted and `recover` has work to do."""
    return journal_path(Path(model_dir)).exists()


def _recover_locked(model_dir: Path) -> RecoveryReport:
    path = journal_path(model_dir)
    if not path.exists():
        return RecoveryReport(status="clean")
    try:
        journal = read_journal(path)
    except TornJournal as exc:
        # The commit record is written (and fsynced) before any model file is touched, so a journal
        # without one means the files are wholly old.
        finish_journal(path)
        log.warning("discarded a torn sync journal in %s (%s): the checkpoint is unchanged", model_dir, exc)
        return RecoveryReport(status="discarded", detail=f"torn journal ({exc}); files were untouched")
    targets = check_targets(journal, model_dir)
    stats = apply_journal(journal, targets)
    finish_journal(path)
    log.warning("replayed an interrupted sync of %s: %d blocks", model_dir, stats.blocks_written)
    return RecoveryReport(status="replayed", detail=f"{stats.blocks_written} blocks re-applied",
                          blocks_written=stats.blocks_written, bytes_written=stats.bytes_written)


def recover(model_dir: Path) -> RecoveryReport:
    """Finish or discard an interrupted sync; call before loading a model from `model_dir`."""
    model_dir = Path(model_dir)
    if not pending_journal(model_dir):
        return RecoveryReport(status="clean")
    lock = _locked(model_dir)
    try:
        return _recover_locked(model_dir)
    finally:
        lock.release()


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


class _Planner:
    """Collects changed-block runs, with their new bytes and the crc of the bytes they replace."""

    def __init__(self, writer: JournalWriter | None):
        self.writer = writer  # None: dry run, count only
        self.records: list[JournalRecord] = []
        self.old_crcs: list[int] = []
        self.blocks = 0
        self.bytes = 0

    def add(self, file_index: int, offset: int, data: Any, old: memoryview, block: int) -> None:
        if self.writer is not None:
            self.writer.add(file_index, offset, data)
            self.records.append(JournalRecord(file_index, offset, len(data), self.writer.last_position))
            self.old_crcs.append(zlib.crc32(old))
        self.blocks += (len(data) + block - 1) // block
        self.bytes += len(data)


def _diff_file(lay: SafetensorsLayout, file_index: int, views: Mapping[str, Any], block: int,
               planner: _Planner, progress: Any) -> list[str]:
    """Plan the changed blocks of one file; returns the names of the tensors that changed."""
    touched: list[str] = []
    max_blocks = max(1, MAX_RUN_BYTES // block)
    with open(lay.path, "rb") as fh, mmap.mmap(fh.fileno(), 0, flags=_MAP_FLAGS, prot=mmap.PROT_READ) as mm:
        mv = memoryview(mm)
        try:
            pending: dict[int, bytearray] = {}
            for entry in lay.by_offset():
                new = _file_bytes(views[entry.name], entry)
                old = np.frombuffer(mm, np.uint8, entry.nbytes, entry.start)
                interior, boundary = changed_blocks(old, new, entry.start, block)
                del old
                if len(interior) or boundary:
                    touched.append(entry.name)
                for lo, hi in _runs(interior, max_blocks):
                    a, b = lo * block, hi * block
                    planner.add(file_index, a, new[a - entry.start: b - entry.start], mv[a:b], block)
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
                planner.add(file_index, a, data, mv[a:b], block)
        finally:
            mv.release()
    return touched


def _check_unchanged(layouts: list[SafetensorsLayout], planner: _Planner, journal: Path) -> None:
    """Refuse (dropping the uncommitted-to-files journal) if any file changed since sync read it."""
    written = {r.file_index for r in planner.records}
    for i in sorted(written):
        lay = layouts[i]
        why = lay.fingerprint.differs(fingerprint(lay.path))
        if why is None:
            fd = os.open(lay.path, os.O_RDONLY)
            try:
                for rec, crc in zip(planner.records, planner.old_crcs):
                    if rec.file_index == i and zlib.crc32(os.pread(fd, rec.length, rec.offset)) != crc:
                        why = f"bytes at offset {rec.offset} were rewritten"
                        break
            finally:
                os.close(fd)
        if why is not None:
            finish_journal(journal)
            raise StaleFileError(f"{lay.path} changed on disk while syncing ({why}); nothing was written. "
                                 "Another process is writing this checkpoint: stop it, then sync again.")


# --- sync -----------------------------------------------------------------------------------------

def _sync(model_dir: Path, live: Any, *, names: NameScheme, dry_run: bool, block_size: int,
          expect: Mapping[str, Fingerprint] | None, on_alias: AliasPolicy, lock: Any,
          on_event: EventHook | None, progress: bool,
          weights_version: Callable[[], int] | None = None) -> tuple[SyncReport, dict[str, Fingerprint]]:
    from tqdm import tqdm

    if sys.byteorder != "little":
        raise SyncError("checkpoint sync compares raw bytes and needs a little-endian machine (safetensors is little-endian)")
    if block_size < 64 or block_size % 64:
        raise ValueError(f"block_size {block_size}: use a multiple of 64 (default {BLOCK_SIZE})")
    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    files = model_files(model_dir)
    dir_lock = _locked(model_dir)
    try:
        recovery = _recover_locked(model_dir)
        layouts = read_layouts(files)
        if expect is not None:
            for lay in layouts:
                known = expect.get(lay.path.name)
                why = "it is new" if known is None else known.differs(lay.fingerprint)
                if why:
                    raise StaleFileError(f"{lay.path} changed on disk since the served model was loaded ({why}); "
                                         "syncing would overwrite that change. Restart to serve the new checkpoint, "
                                         "or call rebase() to accept it and overwrite it with the live weights.")
        if _is_module(live):
            mapped = file_mappings(files)
            if mapped and on_alias == "copy" and not any(m.shared for m in mapped):
                if lock is not None:
                    with lock:
                        privatize(live, files)
                else:
                    privatize(live, files)
            skip = set(getattr(live, "_keys_to_ignore_on_save", None) or ())  # HF: never written to files
            live_map = {k: v for k, v in live.state_dict().items() if k not in skip}
        else:
            live_map = dict(live)
        entries = {name: e for lay in layouts for name, e in lay.tensors.items()}
        views = _match(live_map, entries, names)
        hits = aliased(views, file_mappings(files))
        if hits:
            name, m = next(iter(hits.items()))
            kind = "a shared (MAP_SHARED)" if m.shared else "a private"
            raise AliasedMappingError(
                f"{len(hits)} live tensor(s), e.g. {name}, live in {kind} memory map of {m.path}: writing the file "
                "would change them underneath the model. Pass the nn.Module itself (sync copies mapped weights out), "
                "or clone the tensors first; nothing was written.")

        jpath = journal_path(model_dir)
        writer = None
        if not dry_run:
            meta = new_meta(block_size, [(lay.path.name, lay.size, lay.fingerprint.header_sha256) for lay in layouts])
            writer = JournalWriter(jpath, meta, on_event=on_event)
        planner = _Planner(writer)
        touched: list[str] = []
        total = sum(e.nbytes for e in entries.values())
        try:
            version = weights_version() if weights_version else 0
            with tqdm(total=total, unit="B", unit_scale=True, desc="sync: compare", disable=not progress,
                      leave=False) as bar:
                for i, lay in enumerate(layouts):
                    touched += _diff_file(lay, i, views, block_size, planner, bar)
            if weights_version and (version % 2 or weights_version() != version):
                raise WeightsChangedError("a training step wrote the live weights while sync was reading them; "
                                          "nothing was written. Sync again once the training job has finished.")
            if writer is not None and planner.records:
                journal_bytes = writer.commit()
            else:
                journal_bytes = 0
                if writer is not None:
                    writer.discard()
        except BaseException:
            if writer is not None:
                writer.discard()
            raise
        writes = 0
        if planner.records:
            _check_unchanged(layouts, planner, jpath)
            journal = Journal(jpath, meta, planner.records)
            stats = apply_journal(journal, [lay.path for lay in layouts], on_event=on_event)
            finish_journal(jpath, on_event=on_event)
            writes = stats.writes
        after = {lay.path.name: fingerprint(lay.path) for lay in layouts}
    finally:
        dir_lock.release()
    report = SyncReport(
        model_dir=str(model_dir), files=[lay.path.name for lay in layouts], dry_run=dry_run,
        tensors_compared=len(entries), tensors_touched=len(touched), touched=touched,
        blocks_written=planner.blocks, bytes_written=planner.bytes, writes=writes, journal_bytes=journal_bytes,
        seconds=round(time.perf_counter() - t0, 4), recovery=recovery)
    log.info("sync: %s", report.summary())
    return report, after


def sync_checkpoint(model_dir: Path, live: Any, *, names: NameScheme = "transformers", dry_run: bool = False,
                    block_size: int = BLOCK_SIZE, expect: Mapping[str, Fingerprint] | None = None,
                    on_alias: AliasPolicy = "copy", lock: Any = None, on_event: EventHook | None = None,
                    progress: bool = False, weights_version: Callable[[], int] | None = None) -> SyncReport:
    """Write the blocks of `model_dir`'s safetensors files that differ from `live`, crash-safely.

    `live`: an nn.Module (its state_dict; weights mapped from the target files are first copied into
    private memory, under `lock` if given, unless on_alias="refuse") or a name -> tensor mapping
    (torch or numpy). `names`: "transformers" (identity) or "vllm" (packed qkv/gate_up split back).
    `expect`: file name -> fingerprint the files must still have (see CheckpointSyncer).
    `on_event`: called at each step ("journal-record", "journal-committed", "block-written",
    "files-synced", "done"), for progress and crash tests. `weights_version`: a seqlock reader (odd
    while training writes, e.g. `lambda: client.weights_version`); if it is odd or moves while the
    weights are read, WeightsChangedError, so a checkpoint never mixes two training steps.
    Raises a SyncError subclass, with the files untouched, on any refusal.
    """
    report, _ = _sync(Path(model_dir), live, names=names, dry_run=dry_run, block_size=block_size, expect=expect,
                      on_alias=on_alias, lock=lock, on_event=on_event, progress=progress,
                      weights_version=weights_version)
    return report


class CheckpointSyncer:
    """Syncs one served model to its directory, refusing to overwrite changes made by anyone else.

    Create it right after loading the model (after `recover`); it records the files' fingerprints
    then and after each of its syncs, and a file that differs from the record is refused
    (StaleFileError) until `rebase()`. With `weights_version` (the training worker's seqlock), a sync
    that overlaps a training step is retried a few times, then refused (WeightsChangedError).
    """

    def __init__(self, model_dir: Path, live: Any, *, names: NameScheme = "transformers", lock: Any = None,
                 block_size: int = BLOCK_SIZE, on_alias: AliasPolicy = "copy",
                 weights_version: Callable[[], int] | None = None, retries: int = 3, retry_wait_s: float = 1.0):
        self.model_dir = Path(model_dir)
        if pending_journal(self.model_dir):
            raise JournalError(f"{self.model_dir} has an unfinished sync journal: call "
                               "training.checkpoint.sync.recover(model_dir) before loading the model from it, "
                               "or the served weights would be the pre-crash ones")
        self.live = live
        self.names: NameScheme = names
        self.lock = lock
        self.block_size = block_size
        self.on_alias: AliasPolicy = on_alias
        self.weights_version = weights_version
        self.retries = retries
        self.retry_wait_s = retry_wait_s
        self.fingerprints: dict[str, Fingerprint] = {}
        self.rebase()

    def rebase(self) -> None:
        """Accept the files as they are on disk now as the baseline."""
        self.fingerprints = {p.name: fingerprint(p) for p in model_files(self.model_dir)}

    def sync(self, dry_run: bool = False, progress: bool = False) -> SyncReport:
        for attempt in range(self.retries + 1):
            try:
                report, after = _sync(self.model_dir, self.live, names=self.names, dry_run=dry_run,
                                      block_size=self.block_size, expect=self.fingerprints, on_alias=self.on_alias,
                                      lock=self.lock, on_event=None, progress=progress,
                                      weights_version=self.weights_version)
            except WeightsChangedError:
                if attempt == self.retries:
                    raise
                log.info("training wrote weights during sync; retrying in %.1f s", self.retry_wait_s)
                time.sleep(self.retry_wait_s)
                continue
            self.fingerprints = after
            return report
        raise AssertionError("unreachable")
