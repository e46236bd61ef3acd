"""The undo log: the bytes the last K syncs overwrote, so the checkpoint can be put back exactly to an earlier sync point.

Why on disk: the training worker keeps in-memory snapshots for exact rollback, but they die with
the process. A regression the dream loop finds after the weights were synced (or after a restart)
needs the checkpoint's own history.

Layout, inside the model directory (same file system, so renames are atomic):

    .amygdala-undo/state.json        {"last_id": N, "head": S}: the last sync id handed out, and the
                                     sync point the files are at now
    .amygdala-undo/00000007.undo     one per kept sync: that sync's journal, kept after it was applied
                                     and cut after its undo records (where each run's old bytes are,
                                     their crc, and the crc of each block the sync wrote)
    .amygdala-undo/00000007.data     the old bytes themselves, page-aligned (written with O_DIRECT)

Sync ids count up and are never handed out twice (a rolled-back sync's id is not reused), so an id
names one state of the files for good. Sync point 0 is the checkpoint as it was before its first
sync with an undo log. Both the entry and state.json are part of the sync's own journal transaction
(`keep_as` and a file action), so a killed sync leaves either no entry and the old files, or the
entry and the new files.

Rollback to sync point S undoes every kept sync after S in one transaction: a rollback journal
whose redo records hold, for every block, the old bytes of the oldest undone sync that wrote it,
applied through the same code as a sync (a killed rollback is finished by the next load or sync),
whose file actions delete the undone entries and move head to S. Before anything is written, every
block each undone sync wrote is checked against the file as undoing the newer syncs will leave it,
so a file changed outside the log (or a log from another model) is refused, not corrupted.
Entries beyond `keep` are pruned oldest first after each sync.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from amygdala.engine.checkpoint_journal import (
    FileAction,
    Journal,
    JournalWriter,
    TornJournal,
    apply_journal,
    check_targets,
    file_identity,
    finish_journal,
    journal_path,
    locked,
    new_meta,
    read_meta,
    read_undo_entry,
    recover_locked,
)
from pydantic import BaseModel, Field

from amygdala.fsio import fsync_dir

from .format import (
    Fingerprint,
    JournalError,
    StaleFileError,
    SyncError,
    fingerprint,
    model_files,
)

log = logging.getLogger(__name__)

UNDO_DIR = ".amygdala-undo"
STATE_NAME = "state.json"
SUFFIX = ".undo"
DATA_SUFFIX = ".data"
DEFAULT_KEEP = 4
MAX_RUN_BYTES = 1 << 20


class UndoState(BaseModel):
    last_id: int = 0
    head: int = 0


class SyncPoint(BaseModel):
    """One kept sync: undoing it puts the checkpoint back to sync point `parent`."""

    sync_id: int
    parent: int
    created: float
    kind: str = "sync"
    tensors: list[str] = Field(default_factory=list, description="checkpoint tensors the sync wrote")
    blocks: int = 0
    bytes: int = 0
    weights_version: int | None = None
    label: str | None = None

    def line(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.created))
        shown = ", ".join(self.tensors[:3]) + (f", ... ({len(self.tensors)} tensors)" if len(self.tensors) > 3 else "")
        return f"{self.sync_id:>6}  {when}  {self.blocks:>8} blocks  {self.bytes / 2**20:>9.2f} MiB  {shown}"


class SyncLog(BaseModel):
    """What `amygdala sync list` shows: where the files are, and where rollback can take them."""

    model_dir: str
    head: int = Field(description="the sync point the files are at now")
    points: list[SyncPoint] = Field(description="kept syncs, oldest first")
    reachable: list[int] = Field(description="sync points `rollback --to` accepts, newest first")
    problems: list[str] = Field(default_factory=list, description="entries that could not be read (left out)")

    def render(self) -> str:
        if not self.points:
            lines = [f"{self.model_dir}: at sync point {self.head}; the undo log is empty (nothing to roll back)"]
        else:
            lines = [f"{self.model_dir}: at sync point {self.head}; kept syncs (rollback undoes them newest first):",
                     f"{'id':>6}  {'synced at':<19}  {'written':>15}  {'size':>13}  tensors"]
            lines += [p.line() for p in reversed(self.points)]
            lines.append(f"rollback --to accepts: {', '.join(map(str, self.reachable))} "
                         f"(the oldest is the checkpoint before sync {self.points[0].sync_id})")
        lines += [f"warning: {p}" for p in self.problems]
        return "\n".join(lines)


class RollbackReport(BaseModel):
    model_dir: str
    from_point: int
    to_point: int
    undone: list[int] = Field(description="sync ids undone, newest first")
    tensors: list[str] = Field(description="checkpoint tensors whose bytes were restored")
    blocks_written: int
    bytes_written: int
    journal_bytes: int
    seconds: float
    recovery: str = "clean"

    def summary(self) -> str:
        if not self.undone:
            return f"{self.model_dir}: already at sync point {self.to_point}; nothing to roll back"
        return (f"{self.model_dir}: rolled back from sync point {self.from_point} to {self.to_point} (undid "
                f"{', '.join(map(str, self.undone))}): {len(self.tensors)} tensors, {self.blocks_written} blocks "
                f"({self.bytes_written / 2**20:.2f} MiB) restored in {self.seconds:.2f} s")


# --- layout ---------------------------------------------------------------------------------------

def undo_dir(model_dir: Path) -> Path:
    return Path(model_dir) / UNDO_DIR


def entry_relpath(sync_id: int) -> str:
    return f"{UNDO_DIR}/{sync_id:08d}{SUFFIX}"


def data_relpath(sync_id: int) -> str:
    return f"{UNDO_DIR}/{sync_id:08d}{DATA_SUFFIX}"


def _entries(model_dir: Path) -> list[tuple[int, Path]]:
    d = undo_dir(model_dir)
    if not d.is_dir():
        return []
    out = []
    for p in d.glob(f"*{SUFFIX}"):
        stem = p.name[: -len(SUFFIX)]
        if stem.isdigit():
            out.append((int(stem), p))
    return sorted(out)


def read_state(model_dir: Path) -> UndoState:
    """state.json, or what the entries imply when it is missing (an older log, or one deleted by hand)."""
    path = undo_dir(model_dir) / STATE_NAME
    ids = [i for i, _ in _entries(model_dir)]
    try:
        state = UndoState.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        top = max(ids, default=0)
        return UndoState(last_id=top, head=top)
    except ValueError as exc:
        raise SyncError(f"{path} is not a valid undo-log state ({exc}); delete {undo_dir(model_dir)} to start a new "
                        "undo log (earlier sync points are then lost)") from None
    if ids and max(ids) > state.last_id:  # never hand out an id that is on disk
        state.last_id = max(ids)
    return state


def _state_action(state: UndoState) -> FileAction:
    return FileAction(op="write", path=f"{UNDO_DIR}/{STATE_NAME}", text=state.model_dump_json())


@dataclass(frozen=True)
class SyncSlot:
    """What a sync writes into its journal meta so the undo entry and the state move with it."""

    sync_id: int
    parent: int
    keep_as: str
    undo_data: str
    after: list[FileAction]


def reserve(model_dir: Path) -> SyncSlot:
    """The next sync's id and its journal's undo-log parts; call holding the directory lock."""
    state = read_state(model_dir)
    sync_id = state.last_id + 1
    return SyncSlot(sync_id, state.head, entry_relpath(sync_id), data_relpath(sync_id),
                    [_state_action(UndoState(last_id=sync_id, head=sync_id))])


def prune(model_dir: Path, keep: int) -> list[int]:
    """Delete entries beyond the newest `keep`, oldest first, and undo data no entry owns; returns the ids removed.

    Call holding the directory lock (an orphaned data file is one a killed sync left before its commit).
    """
    entries = _entries(model_dir)
    removed = []
    for sync_id, path in entries[: max(0, len(entries) - keep)]:
        path.unlink(missing_ok=True)
        (Path(model_dir) / data_relpath(sync_id)).unlink(missing_ok=True)
        removed.append(sync_id)
    kept = {i for i, _ in entries} - set(removed)
    for data in undo_dir(model_dir).glob(f"*{DATA_SUFFIX}"):
        stem = data.name[: -len(DATA_SUFFIX)]
        if stem.isdigit() and int(stem) not in kept:
            data.unlink(missing_ok=True)
            removed.append(int(stem))
    if removed:
        fsync_dir(undo_dir(model_dir))
        log.info("undo log of %s: pruned sync(s) %s (keeping the last %d)", model_dir, removed, keep)
    return removed


def _point(sync_id: int, path: Path) -> SyncPoint:
    meta = read_meta(path)
    info = meta.info
    return SyncPoint(sync_id=sync_id, parent=int(info.get("parent", sync_id - 1)), created=meta.created,
                     tensors=list(info.get("tensors", [])), blocks=int(info.get("blocks", 0)),
                     bytes=int(info.get("bytes", 0)), weights_version=info.get("weights_version"),
                     label=info.get("label"))


def sync_log(model_dir: Path) -> SyncLog:
    """The kept sync points (header reads only: cheap). Does not take the lock or write anything."""
    model_dir = Path(model_dir)
    state = read_state(model_dir)
    points, problems = [], []
    for sync_id, path in _entries(model_dir):
        try:
            points.append(_point(sync_id, path))
        except (OSError, TornJournal) as exc:
            problems.append(f"undo entry {path.name} unreadable ({exc}); sync points before it cannot be reached")
    reachable = [state.head]
    by_id = {p.sync_id: p for p in points}
    cur = state.head
    while cur in by_id:
        cur = by_id[cur].parent
        reachable.append(cur)
    return SyncLog(model_dir=str(model_dir), head=state.head, points=points, reachable=reachable, problems=problems)


# --- rollback -------------------------------------------------------------------------------------

def _chain(model_dir: Path, state: UndoState, to: int | None) -> tuple[int, list[tuple[int, Path]]]:
    """(target point, entries to undo newest first); refuses unreachable targets naming the reachable ones."""
    entries = dict(_entries(model_dir))
    if to is None:
        if state.head not in entries:
            raise SyncError(f"{model_dir}: nothing to roll back: the undo log holds no sync leading to the current "
                            f"sync point {state.head} (`amygdala sync list` shows the log)")
        to = int(read_meta(entries[state.head]).info.get("parent", state.head - 1))
    undone: list[tuple[int, Path]] = []
    cur = state.head
    reachable = [cur]
    while cur != to and cur in entries:
        undone.append((cur, entries[cur]))
        cur = int(read_meta(entries[cur]).info.get("parent", cur - 1))
        reachable.append(cur)
    if cur != to:
        raise SyncError(f"sync point {to} cannot be reached from the current point {state.head}: the undo log keeps "
                        f"the last syncs only; reachable: {', '.join(map(str, reachable))} (`amygdala sync list`)")
    return to, undone


@dataclass
class _Source:
    path: Path  # undo data file holding the old bytes
    position: int
    length: int


def _block_crc_of_file(fds: dict[int, int], file_index: int, offset: int, length: int) -> int:
    data = os.pread(fds[file_index], length, offset)
    if len(data) != length:
        raise SyncError(f"model file is shorter than its undo log expects (offset {offset}); nothing was written")
    return zlib.crc32(data)


def _plan(model_dir: Path, undone: list[tuple[int, Journal]]) -> tuple[list[Path], dict[tuple[int, int], _Source]]:
    """Verify the chain against the files and pick, per block, the oldest undone sync's old bytes."""
    first = undone[0][1]
    block = first.meta.block_size
    names = [f.name for f in first.meta.files]
    targets = check_targets(first, model_dir, what="undo entry")
    for sync_id, entry in undone[1:]:
        if entry.meta.block_size != block or [f.name for f in entry.meta.files] != names:
            raise JournalError(f"undo entry of sync {sync_id} was written for other files or another block size than "
                               f"the newer ones; the undo log is inconsistent: delete {undo_dir(model_dir)}")
        check_targets(entry, model_dir, what="undo entry")
    fds = {i: os.open(p, os.O_RDONLY) for i, p in enumerate(targets)}
    virtual: dict[tuple[int, int], int] = {}  # block -> crc of its bytes once the newer syncs are undone
    sources: dict[tuple[int, int], _Source] = {}
    try:
        for sync_id, entry in undone:  # newest first
            data_path = Path(model_dir) / (entry.meta.undo_data or "")
            with open(data_path, "rb") as fh:
                for rec in entry.undo:
                    if rec.offset % block:
                        raise JournalError(f"undo entry {entry.path.name}: a run at offset {rec.offset} is not block "
                                           "aligned; the undo log is damaged")
                    for k, want in enumerate(rec.new_block_crcs):
                        off = rec.offset + k * block
                        n = min(block, rec.length - k * block)
                        key = (rec.file_index, off // block)
                        have = virtual.get(key)
                        if have is None:
                            have = _block_crc_of_file(fds, rec.file_index, off, n)
                        if have != want:
                            raise StaleFileError(
                                f"{names[rec.file_index]}: the bytes at offset {off} are not the ones sync {sync_id} "
                                "wrote: the checkpoint was changed outside its undo log (another tool, or a restore "
                                "from backup), so rolling back would mix two histories; nothing was written. Delete "
                                f"{undo_dir(model_dir)} to accept the files as they are.")
                        fh.seek(rec.position + k * block)
                        virtual[key] = zlib.crc32(fh.read(n))
                        sources[key] = _Source(data_path, rec.position + k * block, n)  # older syncs overwrite
    finally:
        for fd in fds.values():
            os.close(fd)
    return targets, sources


def rollback(model_dir: Path, to: int | None = None, *, expect: Mapping[str, Fingerprint] | None = None,
             on_event: Callable[[str], None] | None = None) -> tuple[RollbackReport, dict[str, Fingerprint]]:
    """Put the checkpoint back to sync point `to` (default: undo the last sync), crash-safely.

    `expect`: file name -> fingerprint the files must still have (the serving process's syncer), so
    a checkpoint changed by someone else is refused. Returns the report and the files' new fingerprints.
    """
    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    with locked(model_dir):
        recovery = recover_locked(model_dir)
        if expect is not None:
            for name, known in expect.items():
                why = known.differs(fingerprint(model_dir / name))
                if why:
                    raise StaleFileError(f"{model_dir / name} changed on disk since the served model was loaded ({why}); "
                                         "a rollback now would act on a checkpoint this process does not know. "
                                         "Restart to serve the new checkpoint first.")
        state = read_state(model_dir)
        target, chain = _chain(model_dir, state, to)
        if not chain:
            report = RollbackReport(model_dir=str(model_dir), from_point=state.head, to_point=target, undone=[],
                                    tensors=[], blocks_written=0, bytes_written=0, journal_bytes=0,
                                    seconds=round(time.perf_counter() - t0, 4), recovery=recovery.status)
            return report, {p.name: fingerprint(p) for p in model_files(model_dir)}
        undone: list[tuple[int, Journal]] = []
        for sync_id, path in chain:
            try:
                entry = read_undo_entry(path, model_dir)
                if entry.undo and not entry.meta.undo_data:
                    raise TornJournal("it names no undo data file")
                undone.append((sync_id, entry))
            except TornJournal as exc:
                raise JournalError(f"undo entry {path} is damaged ({exc}); sync points before sync {sync_id} cannot be "
                                   "restored. Roll back to a newer point, or delete the entry and the older ones.") from None
        targets, sources = _plan(model_dir, undone)
        first = undone[0][1]
        files = [(p.name, *file_identity(p)) for p in targets]
        tensors = sorted({t for _, e in undone for t in e.meta.info.get("tensors", [])})
        after = [FileAction(op="delete", path=p) for i, _ in chain for p in (entry_relpath(i), data_relpath(i))]
        after.append(_state_action(UndoState(last_id=state.last_id, head=target)))
        meta = new_meta(first.meta.block_size, files, kind="rollback", sync_id=target, after=after, redo_data=True,
                        info={"undone": [i for i, _ in chain], "from": state.head, "to": target, "tensors": tensors})
        writer = JournalWriter(journal_path(model_dir), meta, on_event=on_event)
        journal, journal_bytes = writer.write_and_commit(lambda: _write_runs(writer, sources, first.meta.block_size))
        stats = apply_journal(journal, targets, on_event=on_event)
        finish_journal(journal, model_dir, on_event=on_event)
        after_fp = {p.name: fingerprint(p) for p in targets}
    report = RollbackReport(model_dir=str(model_dir), from_point=state.head, to_point=target,
                            undone=[i for i, _ in chain], tensors=tensors, blocks_written=stats.blocks_written,
                            bytes_written=stats.bytes_written, journal_bytes=journal_bytes,
                            seconds=round(time.perf_counter() - t0, 4), recovery=recovery.status)
    log.info("rollback: %s", report.summary())
    return report, after_fp


def _write_runs(writer: JournalWriter, sources: dict[tuple[int, int], _Source], block: int) -> None:
    """Redo records for the chosen old bytes, consecutive blocks merged into runs of up to 1 MiB."""
    with contextlib.ExitStack() as stack:
        handles: dict[Path, BinaryIO] = {}
        keys = sorted(sources)
        i = 0
        while i < len(keys):
            fi, b0 = keys[i]
            parts = []
            j = i
            size = 0
            while j < len(keys) and keys[j] == (fi, b0 + (j - i)) and size < MAX_RUN_BYTES:
                src = sources[keys[j]]
                fh = handles.get(src.path)
                if fh is None:
                    fh = handles[src.path] = stack.enter_context(open(src.path, "rb"))
                fh.seek(src.position)
                data = fh.read(src.length)
                if len(data) != src.length:
                    raise JournalError(f"undo entry {src.path} shrank while rolling back; nothing was written")
                parts.append(data)
                size += len(data)
                j += 1
                if src.length < block:  # a file's short last block ends the run
                    break
            writer.add(fi, b0 * block, b"".join(parts))
            i = j

