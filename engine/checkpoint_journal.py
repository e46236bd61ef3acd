"""The journal that makes a checkpoint write all-or-nothing across a model's files, and its recovery.

Why this lives in engine and not in training/checkpoint (which writes the journals): every path that
loads a model directory must first finish an interrupted write, or it reads a half-written file.
`engine.model.load_model` does that through `replay_before_load`, and engine may not import
training, so the journal format and its replay sit here, below both. No torch import: the crash-test
worker and offline commands stay light.

Two modes, one journal per model directory (`.amygdala-sync.journal`), written under its lock.

Undo mode (meta `mode: "undo"`, what a sync writes): every changed byte is written twice, once as
the old bytes it replaces (which the undo log keeps anyway), once into the model file.
1. write the header (meta JSON and its crc), the undo records (U: where the *old* bytes of every
   block run about to be overwritten were saved in the undo data file, with their crcs and the crc
   of each new block), then a commit record; fsync the undo data, the journal and its directory.
   Until the commit record is durable no model file has been touched: a crash leaves a torn journal
   and wholly old files, and recovery deletes the journal (and the undo data its header names).
2. the caller pwrites the new bytes in place (a separate fd, never a memory map) and fdatasyncs the
   files. A crash here leaves a committed, unapplied journal: recovery writes every U run's old
   bytes back (`restore_undo`, idempotent) and deletes the journal: the files are exactly as before
   the write, which is lost, not torn (a sync's new bytes are the live weights, still in memory).
3. append the applied record (D) and fdatasync the journal: from here recovery rolls forward.
4. as redo mode's 3 below (file actions, then the journal goes or becomes the undo-log entry); an undo data
   file no undo log keeps (meta undo_data = `.amygdala-sync.undo`) is deleted after the journal.
If the write fails in step 2 (or the caller finds the new bytes were not consistent), it restores
the old bytes itself and abandons the journal (`abandon_journal`): no file action runs.

Redo mode (older journals, rollbacks, `journal_mode="redo"`): the new bytes are journaled too, so a
crash after the commit still lands the write, at the cost of writing every changed byte once more
and reading it back.
1. as in undo mode, but after the undo records come the redo records (B inline, or R: the new bytes
   in `.amygdala-sync.redo`), all before the commit record.
2. pwrite the B/R runs into the model files, fdatasync each file.
3. (the same step as undo mode's 4) do the meta's small file actions (`after`: whole-file writes and
   deletes, e.g. the undo log's state file, or the undo entries a rollback consumed), then either
   delete the journal or, when `keep_as` names a place, rename it there: it is this write's
   undo-log entry, and is cut after its undo records (the redo bytes are in the model files now).
A crash between 1 and 3 leaves a committed journal: recovery does 2 and 3 again. Both are idempotent
(absolute offsets, whole new bytes, fixed file contents), and a normal write applies through the same
functions, so the recovery path runs on every rollback, not only after crashes.

The bytes themselves live beside the journal, page-aligned and written with O_DIRECT where the file
system allows: the old ones in the undo data file (meta `undo_data`), the new ones (redo mode) in
`.amygdala-sync.redo` (meta `redo_data`; deleted once the journal is gone). Neither is read again
in the normal case except once by redo's apply step, so they skip the page cache, whose page
allocation (not the disk) is what makes writing new files slow on a busy machine; the journal itself
holds only headers.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import struct
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Literal, Self

from filelock import FileLock, Timeout
from pydantic import BaseModel, field_validator

from amygdala.fsio import fsync_dir, tmp_path_for

from .safetensors_file import header_length, header_sha256

log = logging.getLogger(__name__)

JOURNAL_NAME = ".amygdala-sync.journal"
REDO_NAME = ".amygdala-sync.redo"
UNDO_NAME = ".amygdala-sync.undo"  # an undo-mode journal's old bytes when no undo log keeps them
LOCK_NAME = ".amygdala-sync.lock"
LOCK_TIMEOUT_S = 600
MAGIC_V1 = b"AMYSYNC\x01"  # redo records only, meta without a checksum (still replayed)
MAGIC = b"AMYSYNC\x03"
ALIGN = 4096  # undo data positions and O_DIRECT buffers
_LEN = struct.Struct("<I")
_RECORD = struct.Struct("<IQII")  # B: file index, absolute offset, length, crc32(new data); data inline
_REDO = struct.Struct("<IQIIQ")  # R: file index, offset, length, crc32(new data), position in the redo file
_UNDO = struct.Struct("<IQIIIIQ")  # U: file, offset, length, crc32(old data), blocks, crc32(block crcs), data position
_COMMIT = struct.Struct("<QQI")  # records (U and B), data bytes, crc32 chained over meta and record headers
_APPLIED = b"D" + MAGIC  # undo mode, after the commit record: every in-place write is durable

EventHook = Callable[[str], None]


class SyncError(ValueError):
    """A checkpoint write or replay refused before touching any file; the message says how to fix it."""


class JournalError(SyncError):
    """An unfinished journal cannot be replayed onto the files it was written for."""


class TornJournal(Exception):
    """The journal has no valid commit record: it was being written when the process died."""


class JournalFile(BaseModel):
    name: str
    size: int
    header_sha256: str


class FileAction(BaseModel):
    """A small whole-file change that belongs to the transaction: done after the blocks, before the journal goes."""

    op: Literal["write", "delete"]
    path: str  # relative to the model directory
    text: str = ""

    @field_validator("path")
    @classmethod
    def _inside(cls, v: str) -> str:
        p = PurePosixPath(v)
        if p.is_absolute() or ".." in p.parts or not p.parts:
            raise ValueError(f"journal file action path {v!r} must be relative and inside the model directory")
        return v


class JournalMeta(BaseModel):
    version: int = 2
    block_size: int
    files: list[JournalFile]
    created: float
    kind: Literal["sync", "rollback"] = "sync"
    sync_id: int | None = None
    keep_as: str | None = None  # relative path the applied journal is renamed to (its undo-log entry)
    undo_data: str | None = None  # relative path of the file holding the undo records' old bytes
    redo_data: bool = False  # the redo records' bytes are in REDO_NAME, not inline
    mode: Literal["redo", "undo"] = "redo"  # undo: no redo records, the new bytes go straight into the files
    after: list[FileAction] = []
    info: dict = {}

    @field_validator("keep_as", "undo_data")
    @classmethod
    def _keep_inside(cls, v: str | None) -> str | None:
        return None if v is None else FileAction._inside(v)


@dataclass(frozen=True)
class JournalRecord:
    """A redo run: `length` new bytes at `offset` of file `file_index`, stored at `position` in the
    journal (inline) or in the redo data file (meta.redo_data)."""

    file_index: int
    offset: int
    length: int
    position: int
    crc: int = 0


@dataclass(frozen=True)
class UndoRecord:
    """The old bytes of a run the write replaced (at `position` of the undo data file, crc `crc`), and the
    crc of each block of the bytes that replaced them."""

    file_index: int
    offset: int
    length: int
    position: int
    new_block_crcs: tuple[int, ...]
    crc: int = 0


@dataclass(frozen=True)
class Journal:
    """A parsed, checksum-verified journal (committed) or undo-log entry (its undo records)."""

    path: Path
    meta: JournalMeta
    records: list[JournalRecord]
    undo: list[UndoRecord] = field(default_factory=list)
    redo_start: int = 0  # where the redo records begin: an undo entry is cut here
    applied: bool = False  # undo mode: the applied record follows the commit (the in-place writes are durable)

    @property
    def data_bytes(self) -> int:
        return sum(r.length for r in self.records)

    @property
    def undo_bytes(self) -> int:
        return sum(r.length for r in self.undo)

    def blocks(self) -> int:
        b = self.meta.block_size
        return sum((r.length + b - 1) // b for r in self.records)


@dataclass(frozen=True)
class ApplyStats:
    writes: int
    bytes_written: int
    blocks_written: int


class RecoveryReport(BaseModel):
    """What recovery found: no journal, a committed one (replayed), or a torn one (discarded)."""

    status: Literal["clean", "replayed", "discarded", "restored"]
    detail: str = ""
    blocks_written: int = 0
    bytes_written: int = 0


def journal_path(model_dir: Path) -> Path:
    return Path(model_dir) / JOURNAL_NAME


def redo_path(model_dir: Path) -> Path:
    return Path(model_dir) / REDO_NAME


def pending_journal(model_dir: Path) -> bool:
    """True if a write of this directory was interrupted and `recover` has work to do."""
    return journal_path(Path(model_dir)).exists()


# --- writing --------------------------------------------------------------------------------------

class _AlignedData:
    """A data file of runs at 4 KiB-aligned positions, written with O_DIRECT when the file system takes it."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        self.direct = hasattr(os, "O_DIRECT")
        try:
            self.fd = os.open(path, flags | (os.O_DIRECT if self.direct else 0), 0o644)
        except OSError:
            self.direct = False
            self.fd = os.open(path, flags, 0o644)
        self.size = 0
        self._bounce: mmap.mmap | None = None

    def _aligned(self, data: memoryview) -> memoryview:
        """`data` itself if O_DIRECT can take it, else a copy padded in a page-aligned buffer."""
        import numpy as np

        n = len(data)
        if n % ALIGN == 0 and np.frombuffer(data, np.uint8).ctypes.data % ALIGN == 0:
            return data
        padded = -(-n // ALIGN) * ALIGN
        if self._bounce is None or len(self._bounce) < padded:
            self._bounce = mmap.mmap(-1, max(padded, 1 << 20))
        view = memoryview(self._bounce)[:padded]
        view[:n] = data
        view[n:] = bytes(padded - n)
        return view

    def _write(self, buf: memoryview) -> None:
        done = 0
        while done < len(buf):  # sequential os.write: pwrite is kept for the model files alone
            done += os.write(self.fd, buf[done:])

    def append(self, data: memoryview | bytes) -> int:
        """Write `data` at the next aligned position; returns that position."""
        data = memoryview(data).cast("B")
        position = self.size
        padded = -(-len(data) // ALIGN) * ALIGN
        if self.direct:
            try:
                self._write(self._aligned(data))
                self.size = position + padded
                return position
            except OSError:  # e.g. EINVAL: this file system refuses O_DIRECT after all
                os.close(self.fd)
                self.fd = os.open(self.path, os.O_WRONLY)
                os.lseek(self.fd, position, os.SEEK_SET)
                self.direct = False
        self._write(data)
        self._write(memoryview(bytes(padded - len(data))))
        self.size = position + padded
        return position

    def close(self, sync: bool) -> None:
        if self.fd >= 0:
            if sync:
                os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
        if self._bounce is not None:
            self._bounce.close()
            self._bounce = None


class JournalWriter:
    """Appends undo records, then redo records; nothing is replayable until `commit()` returns."""

    def __init__(self, path: Path, meta: JournalMeta, on_event: EventHook | None = None):
        self.path = Path(path)
        self.meta = meta
        self._undo_data = _AlignedData(self.path.parent / meta.undo_data) if meta.undo_data else None
        self._redo_data = _AlignedData(redo_path(self.path.parent)) if meta.redo_data else None
        self._on_event = on_event or (lambda _e: None)
        # "x": a journal left by a crash must be recovered first, never overwritten.
        self._fh = open(self.path, "xb", buffering=1 << 20)  # noqa: SIM115 (closed by commit or discard)
        raw = meta.model_dump_json().encode()
        self._fh.write(MAGIC + _LEN.pack(len(raw)) + raw + _LEN.pack(zlib.crc32(raw)))
        self._fh.flush()  # the header first (no fsync): a killed writer's recovery can name its undo data
        self._size = len(MAGIC) + 2 * _LEN.size + len(raw)
        self._chain = zlib.crc32(raw)
        self.records: list[JournalRecord] = []
        self.undo: list[UndoRecord] = []
        self.redo_start: int | None = None
        self.data_bytes = 0

    def add_undo(self, file_index: int, offset: int, old: memoryview | bytes, new_block_crcs: Sequence[int],
                 crc: int | None = None) -> None:
        """The bytes about to be replaced at `offset`, with the crc of each block of their replacement.

        `crc`: the crc of `old` if the caller already has it (the sync computed it while comparing, and
        re-checks the file against it after the commit), so the bytes are not checksummed twice.
        """
        if self.redo_start is not None:
            raise RuntimeError("undo records must all come before the first redo record")
        if self._undo_data is None:
            raise RuntimeError("this journal's meta names no undo_data file")
        crc = zlib.crc32(old) if crc is None else crc
        position = self._undo_data.append(old)
        crcs = struct.pack(f"<{len(new_block_crcs)}I", *new_block_crcs)
        head = _UNDO.pack(file_index, offset, len(old), crc, len(new_block_crcs), zlib.crc32(crcs), position)
        self._chain = zlib.crc32(head, self._chain)
        self._fh.write(b"U" + head + crcs)
        self._size += 1 + len(head) + len(crcs)
        self.undo.append(UndoRecord(file_index, offset, len(old), position, tuple(new_block_crcs), crc))
        self.data_bytes += len(old)
        self._on_event("journal-undo")

    @property
    def undo_data_bytes(self) -> int:
        return self._undo_data.size if self._undo_data is not None else 0

    @property
    def side_bytes(self) -> int:
        """Bytes in the undo and redo data files (written besides the journal itself)."""
        return self.undo_data_bytes + (self._redo_data.size if self._redo_data is not None else 0)

    def add(self, file_index: int, offset: int, data: memoryview | bytes) -> None:
        """A redo run: `data` is written at `offset` of file `file_index` when the journal is applied."""
        if self.meta.mode == "undo":
            raise RuntimeError("an undo-mode journal has no redo records: its caller writes the files in place")
        if self.redo_start is None:
            self.redo_start = self._size
        crc = zlib.crc32(data)
        if self._redo_data is not None:
            position = self._redo_data.append(data)
            head = _REDO.pack(file_index, offset, len(data), crc, position)
            self._fh.write(b"R" + head)
            self._size += 1 + len(head)
        else:
            head = _RECORD.pack(file_index, offset, len(data), crc)
            self._fh.write(b"B" + head)
            self._fh.write(data)
            position = self._size + 1 + len(head)
            self._size = position + len(data)
        self._chain = zlib.crc32(head, self._chain)
        self.records.append(JournalRecord(file_index, offset, len(data), position, crc))
        self.data_bytes += len(data)
        self._on_event("journal-record")

    def commit(self) -> tuple[Journal, int]:
        """Write the commit record and make the journal durable; returns it (ready to apply) and its size."""
        if self.redo_start is None:
            self.redo_start = self._size
        for side in (self._undo_data, self._redo_data):
            if side is not None:
                side.close(sync=True)  # old and new bytes are durable before the commit record
        n = len(self.records) + len(self.undo)
        self._fh.write(b"C" + _COMMIT.pack(n, self.data_bytes, self._chain) + MAGIC)
        self._fh.flush()
        os.fsync(self._fh.fileno())
        size = self._fh.tell()
        self._fh.close()
        fsync_dir(self.path.parent)
        self._on_event("journal-committed")
        return Journal(self.path, self.meta, list(self.records), list(self.undo), self.redo_start), size

    def write_and_commit(self, fill: Callable[[], None]) -> tuple[Journal, int]:
        """Run `fill` (which adds the records), then commit; any error in either discards the journal.

        The one shape every writer needs: a half-written journal must never be left where the next
        loader would find it. Returns the journal and its bytes including the undo and redo data files.
        """
        try:
            fill()
            side = self.side_bytes
            journal, size = self.commit()
        except BaseException:
            self.discard()
            raise
        return journal, size + side

    def discard(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        self.path.unlink(missing_ok=True)
        for side in (self._undo_data, self._redo_data):
            if side is not None:
                side.close(sync=False)
                side.path.unlink(missing_ok=True)


def new_meta(block_size: int, files: list[tuple[str, int, str]], **kw: object) -> JournalMeta:
    return JournalMeta(block_size=block_size, created=time.time(),
                       files=[JournalFile(name=n, size=s, header_sha256=h) for n, s, h in files], **kw)


# --- reading --------------------------------------------------------------------------------------

def _read_exact(fh: BinaryIO, n: int, what: str) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise TornJournal(f"truncated in {what}")
    return data


def _parse(path: Path, committed: bool) -> Journal:
    with open(path, "rb") as fh:
        magic = fh.read(len(MAGIC))
        if magic not in (MAGIC, MAGIC_V1):
            raise TornJournal("empty: nothing reached the disk" if not magic else "bad or missing magic")
        v1 = magic == MAGIC_V1
        (n,) = _LEN.unpack(_read_exact(fh, _LEN.size, "the header"))
        raw = _read_exact(fh, n, "the header")
        chain = 0
        if not v1:
            (want,) = _LEN.unpack(_read_exact(fh, _LEN.size, "the header"))
            if zlib.crc32(raw) != want:
                raise TornJournal("header checksum mismatch")
            chain = want
        try:
            meta = JournalMeta.model_validate_json(raw)
        except ValueError as exc:
            raise TornJournal(f"header unreadable ({exc})") from None
        records: list[JournalRecord] = []
        undo: list[UndoRecord] = []
        redo_start: int | None = None
        while True:
            at = fh.tell()
            tag = fh.read(1)
            if tag == b"U" and redo_start is None and not v1:
                head = _read_exact(fh, _UNDO.size, f"undo record {len(undo)}")
                file_index, offset, length, crc, nblocks, crcs_crc, position = _UNDO.unpack(head)
                crcs = _read_exact(fh, 4 * nblocks, f"undo record {len(undo)}")
                if zlib.crc32(crcs) != crcs_crc:
                    raise TornJournal(f"undo record {len(undo)} incomplete or corrupt")
                if file_index >= len(meta.files):
                    raise TornJournal(f"undo record {len(undo)} names file {file_index} of {len(meta.files)}")
                chain = zlib.crc32(head, chain)
                undo.append(UndoRecord(file_index, offset, length, position, struct.unpack(f"<{nblocks}I", crcs), crc))
                continue
            if redo_start is None:
                redo_start = at
            if not committed and tag in (b"B", b"R", b"C", b""):
                return Journal(path, meta, [], undo, redo_start)  # an undo entry: its redo part is not needed
            if tag == b"R" and meta.redo_data:
                head = fh.read(_REDO.size)
                if len(head) != _REDO.size:
                    raise TornJournal(f"truncated after {len(records)} records")
                file_index, offset, length, crc, position = _REDO.unpack(head)
                if file_index >= len(meta.files):
                    raise TornJournal(f"record {len(records)} names file {file_index} of {len(meta.files)}")
                chain = zlib.crc32(head, chain)
                records.append(JournalRecord(file_index, offset, length, position, crc))
            elif tag == b"B":
                head = fh.read(_RECORD.size)
                if len(head) != _RECORD.size:
                    raise TornJournal(f"truncated after {len(records)} records")
                file_index, offset, length, crc = _RECORD.unpack(head)
                position = fh.tell()
                data = fh.read(length)
                if len(data) != length or zlib.crc32(data) != crc:
                    raise TornJournal(f"record {len(records)} incomplete or corrupt")
                if file_index >= len(meta.files):
                    raise TornJournal(f"record {len(records)} names file {file_index} of {len(meta.files)}")
                chain = zlib.crc32(head, chain)
                records.append(JournalRecord(file_index, offset, length, position, crc))
            elif tag == b"C":
                tail = fh.read(_COMMIT.size + len(MAGIC))
                if len(tail) != _COMMIT.size + len(MAGIC) or tail[_COMMIT.size:] != magic:
                    raise TornJournal("commit record incomplete")
                count, data_bytes, want_chain = _COMMIT.unpack(tail[:_COMMIT.size])
                total = sum(r.length for r in records) + sum(r.length for r in undo)
                if count != len(records) + len(undo) or data_bytes != total or want_chain != chain:
                    raise TornJournal("commit record disagrees with the records")
                rest = fh.read(len(_APPLIED) + 1)
                applied = meta.mode == "undo" and rest == _APPLIED
                # A partial applied record is a crash while writing it: the in-place writes are not known
                # to be durable, so the journal counts as committed and unapplied (its files are restored).
                if rest and not applied and not (meta.mode == "undo" and _APPLIED.startswith(rest)):
                    if meta.mode == "undo":  # committed: the files may be half-written, so never discarded
                        raise JournalError(f"committed journal {path} has unknown data after its commit record; the "
                                           "model files may be half-written. Restore the model directory from a backup.")
                    raise TornJournal("data after the commit record")
                return Journal(path, meta, records, undo, redo_start, applied)
            else:
                raise TornJournal(f"no commit record (ends after {len(records)} records)")


def read_journal(path: Path) -> Journal:
    """Parse and verify a journal; raises TornJournal unless it is complete and every checksum holds.

    The commit record is written after the redo data file was fsynced, so a committed journal whose
    redo data fails its crc is damage, not a crash: JournalError (nothing is applied).
    """
    journal = _parse(Path(path), committed=True)
    if journal.meta.mode == "undo" and not journal.applied:
        data = undo_data_path(journal, Path(path).parent)
        if data is None:
            raise JournalError(f"committed undo-mode journal {path} names no undo data file; the model files may be "
                               "half-written. Restore the model directory from a backup.")
        with _AlignedReader(data) as reader:
            for i, rec in enumerate(journal.undo):
                if zlib.crc32(reader.read(rec.position, rec.length)) != rec.crc:
                    raise JournalError(f"committed journal {path}: undo record {i}'s old bytes in {data} are corrupt; "
                                       "the model files may be half-written. Restore the model directory from a backup.")
    if journal.meta.redo_data:
        with _AlignedReader(redo_path(Path(path).parent)) as reader:
            for i, rec in enumerate(journal.records):
                if zlib.crc32(reader.read(rec.position, rec.length)) != rec.crc:
                    raise JournalError(f"committed journal {path}: redo record {i}'s bytes in {REDO_NAME} are corrupt; "
                                       "the model files may be half-written. Restore the model directory from a backup.")
    return journal


class _AlignedReader:
    """Reads runs of an aligned data file, with O_DIRECT when possible (no page-cache pollution)."""

    def __init__(self, path: Path):
        self.path = path
        self.direct = hasattr(os, "O_DIRECT")
        try:
            self.fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if self.direct else 0))
        except FileNotFoundError:
            raise JournalError(f"{path} is missing: the committed journal beside it cannot be replayed; restore "
                               "the model directory from a backup") from None
        except OSError:
            self.direct = False
            self.fd = os.open(path, os.O_RDONLY)
        self._buf: mmap.mmap | None = None

    def read(self, position: int, length: int) -> bytes:
        if self.direct and position % ALIGN == 0:
            padded = -(-length // ALIGN) * ALIGN
            if self._buf is None or len(self._buf) < padded:
                if self._buf is not None:
                    self._buf.close()
                self._buf = mmap.mmap(-1, max(padded, 1 << 20))
            try:
                got = os.preadv(self.fd, [memoryview(self._buf)[:padded]], position)
            except OSError:
                self.direct = False
            else:
                if got < length:
                    raise JournalError(f"{self.path} is shorter than its journal says (run at {position})")
                return self._buf[:length]
        data = os.pread(self.fd, length, position)
        if len(data) != length:
            raise JournalError(f"{self.path} is shorter than its journal says (run at {position})")
        return data

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)
        if self._buf is not None:
            self._buf.close()


def undo_data_path(journal: Journal, model_dir: Path) -> Path | None:
    return Path(model_dir) / journal.meta.undo_data if journal.meta.undo_data else None


def read_undo_entry(path: Path, model_dir: Path | None = None, verify: bool = True) -> Journal:
    """Parse a kept journal (an undo-log entry): its meta and undo records; raises TornJournal.

    With `verify`, every record's old bytes are read from the undo data file and checked against
    their crc (`model_dir`: where the entry's relative undo_data path starts; default the entry's
    model directory, two levels up).
    """
    entry = _parse(Path(path), committed=False)
    if verify and entry.undo:
        data = undo_data_path(entry, model_dir if model_dir is not None else Path(path).parent.parent)
        try:
            fd = os.open(data, os.O_RDONLY)  # type: ignore[arg-type]
        except (OSError, TypeError) as exc:
            raise TornJournal(f"its undo data {data} is missing ({exc})") from None
        try:
            for i, rec in enumerate(entry.undo):
                got = os.pread(fd, rec.length, rec.position)
                if len(got) != rec.length or zlib.crc32(got) != rec.crc:
                    raise TornJournal(f"undo record {i}: its old bytes in {data} are incomplete or corrupt")
        finally:
            os.close(fd)
    return entry


def read_meta(path: Path) -> JournalMeta:
    """Only the header of a journal or undo entry (checksum-verified): cheap, for listings."""
    with open(path, "rb") as fh:
        if fh.read(len(MAGIC)) != MAGIC:
            raise TornJournal("bad or missing magic")
        (n,) = _LEN.unpack(_read_exact(fh, _LEN.size, "the header"))
        raw = _read_exact(fh, n, "the header")
        (want,) = _LEN.unpack(_read_exact(fh, _LEN.size, "the header"))
    if zlib.crc32(raw) != want:
        raise TornJournal("header checksum mismatch")
    try:
        return JournalMeta.model_validate_json(raw)
    except ValueError as exc:
        raise TornJournal(f"header unreadable ({exc})") from None


def file_identity(path: Path) -> tuple[int, str]:
    """(size, header sha256) of a safetensors file: what a journal checks before writing into it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        n = header_length(fd)
        return size, header_sha256(fd=fd, length=n) if 8 + n <= size else "unreadable"
    finally:
        os.close(fd)


def check_targets(journal: Journal, model_dir: Path, what: str = "unfinished sync journal") -> list[Path]:
    """The files a journal was written for, verified to still be those files (size, header)."""
    paths = []
    for f in journal.meta.files:
        p = Path(model_dir) / f.name
        if not p.is_file():
            raise JournalError(f"{what} {journal.path} targets {f.name}, which is gone. If the model was "
                               f"deliberately replaced, delete {journal.path}; otherwise restore {f.name} first.")
        size, digest = file_identity(p)
        if size != f.size or digest != f.header_sha256:
            raise JournalError(f"{what} {journal.path} was written for a different {f.name} (size or header "
                               f"changed). If the model was deliberately replaced, delete {journal.path}; "
                               "replaying it would corrupt the new file.")
        paths.append(p)
    return paths


# --- applying -------------------------------------------------------------------------------------

datasync = getattr(os, "fdatasync", os.fsync)


def pwrite_all(fd: int, data: object, offset: int) -> int:
    """Write all of `data` (bytes or any buffer, e.g. a tensor's memoryview) at `offset`; returns the pwrite calls."""
    view = memoryview(data).cast("B")  # type: ignore[arg-type]
    done = calls = 0
    while done < len(view):
        n = os.pwrite(fd, view[done:], offset + done)
        if n <= 0:
            raise OSError(f"pwrite wrote {n} bytes")
        done += n
        calls += 1
    return calls


def apply_journal(journal: Journal, targets: list[Path], on_event: EventHook | None = None) -> ApplyStats:
    """Write every redo run into its file with positioned writes, then fdatasync each file."""
    on_event = on_event or (lambda _e: None)
    fds = [os.open(p, os.O_RDWR) for p in targets]
    writes = 0
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: [os.close(fd) for fd in fds])
        if journal.meta.redo_data:
            read = stack.enter_context(_AlignedReader(redo_path(journal.path.parent))).read
        else:
            jfd = os.open(journal.path, os.O_RDONLY)
            stack.callback(os.close, jfd)

            def read(position: int, length: int) -> bytes:
                data = os.pread(jfd, length, position)
                if len(data) != length:
                    raise OSError(f"journal {journal.path} shrank while replaying")
                return data
        for rec in journal.records:
            writes += pwrite_all(fds[rec.file_index], read(rec.position, rec.length), rec.offset)
            on_event("block-written")
        for fd in fds:
            datasync(fd)  # overwrites only: size unchanged, so the data is all that must reach disk
        on_event("files-synced")
    return ApplyStats(writes=writes, bytes_written=journal.data_bytes, blocks_written=journal.blocks())


def drop_journal(path: Path) -> None:
    """Delete a journal that must not be applied (torn, or refused before any file was touched)."""
    Path(path).unlink(missing_ok=True)
    fsync_dir(Path(path).parent)
    redo_path(Path(path).parent).unlink(missing_ok=True)
    (Path(path).parent / UNDO_NAME).unlink(missing_ok=True)  # an undo log's own data file is pruned by the log


def mark_applied(journal: Journal, on_event: EventHook | None = None) -> Journal:
    """Undo mode: append the applied record, durably. Call once the in-place writes are fdatasynced.

    From here on a crash rolls forward (finish_journal again) instead of restoring the old bytes.
    """
    if journal.meta.mode != "undo":
        raise RuntimeError("only an undo-mode journal has an applied record")
    with open(journal.path, "ab") as fh:
        fh.write(_APPLIED)
        fh.flush()
        datasync(fh.fileno())
    if on_event:
        on_event("journal-applied")
    return Journal(journal.path, journal.meta, journal.records, journal.undo, journal.redo_start, applied=True)


def restore_undo(journal: Journal, targets: list[Path], on_event: EventHook | None = None) -> ApplyStats:
    """Undo mode: write every undo record's old bytes back where they came from, then fdatasync each file.

    Idempotent (absolute offsets, whole old bytes), so a crash while restoring is finished by the
    next recovery. Afterwards the files are exactly as before the write the journal belongs to.
    """
    data = undo_data_path(journal, journal.path.parent)
    if data is None:
        raise JournalError(f"undo-mode journal {journal.path} names no undo data file; restore the model directory "
                           "from a backup")
    fds = [os.open(p, os.O_RDWR) for p in targets]
    writes = 0
    try:
        with _AlignedReader(data) as reader:
            for rec in journal.undo:
                writes += pwrite_all(fds[rec.file_index], reader.read(rec.position, rec.length), rec.offset)
                if on_event:
                    on_event("block-restored")
        for fd in fds:
            datasync(fd)
    finally:
        for fd in fds:
            os.close(fd)
    b = journal.meta.block_size
    return ApplyStats(writes=writes, bytes_written=journal.undo_bytes,
                      blocks_written=sum((r.length + b - 1) // b for r in journal.undo))


def abandon_journal(journal: Journal, model_dir: Path) -> None:
    """Undo mode, files restored (or never touched): the journal goes durably, then its undo data.

    None of the meta's file actions run and nothing is kept: the write did not happen. Until the
    journal is gone a crash restores again; an undo data file left behind belongs to no journal and
    is deleted by the next recovery or undo-log prune.
    """
    journal.path.unlink(missing_ok=True)
    fsync_dir(journal.path.parent)
    data = undo_data_path(journal, Path(model_dir))
    if data is not None:
        data.unlink(missing_ok=True)


def finish_journal(journal: Journal, model_dir: Path, on_event: EventHook | None = None) -> None:
    """Step 3: the file actions, then the journal disappears durably (deleted, or kept as an undo entry)."""
    # Each touched directory is fsynced once, at the end, the journal's own directory last: until
    # then a crash leaves the journal in place and the whole step is redone (it is idempotent).
    model_dir = Path(model_dir)
    dirs: list[Path] = []
    for act in journal.meta.after:
        target = model_dir / act.path
        if act.op == "write":
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = tmp_path_for(target)
            with open(tmp, "wb") as fh:
                fh.write(act.text.encode())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        else:
            target.unlink(missing_ok=True)
        if target.parent.is_dir() and target.parent not in dirs:
            dirs.append(target.parent)
    kept = None
    if journal.meta.keep_as is None:
        journal.path.unlink(missing_ok=True)
    else:
        kept = model_dir / journal.meta.keep_as
        kept.parent.mkdir(parents=True, exist_ok=True)
        os.replace(journal.path, kept)
        if kept.parent not in dirs:
            dirs.append(kept.parent)
    for d in [d for d in dirs if d != journal.path.parent] + [journal.path.parent]:
        fsync_dir(d)
    redo_path(model_dir).unlink(missing_ok=True)  # only now: until the journal is gone, replay needs it
    if kept is None and journal.meta.mode == "undo" and journal.meta.undo_data:
        (model_dir / journal.meta.undo_data).unlink(missing_ok=True)  # not kept: only crash safety needed it
    if kept is not None:
        # The redo bytes are in the model files now; the undo entry keeps header and undo records only.
        # A crash before this cut (not fsynced: only space is at stake) leaves them in; readers stop at
        # the first redo record either way.
        os.truncate(kept, journal.redo_start)
    if on_event:
        on_event("done")


# --- recovery -------------------------------------------------------------------------------------

@contextlib.contextmanager
def locked(model_dir: Path) -> Iterator[None]:
    """The model directory's writer lock: one sync, rollback or replay at a time."""
    lock = FileLock(str(Path(model_dir) / LOCK_NAME), timeout=LOCK_TIMEOUT_S)
    try:
        lock.acquire()
    except Timeout:
        raise SyncError(f"another sync of {model_dir} has held {LOCK_NAME} for {LOCK_TIMEOUT_S} s; "
                        "wait for it or check for a stuck process") from None
    try:
        yield
    finally:
        lock.release()


def recover_locked(model_dir: Path) -> RecoveryReport:
    """`recover` for a caller that already holds `locked(model_dir)`."""
    path = journal_path(model_dir)
    if not path.exists():
        redo_path(model_dir).unlink(missing_ok=True)  # left by a process killed after its journal went
        (Path(model_dir) / UNDO_NAME).unlink(missing_ok=True)
        return RecoveryReport(status="clean")
    try:
        journal = read_journal(path)
    except TornJournal as exc:
        # The commit record is written (and fsynced) before any model file is touched, so a journal
        # without one means the files are wholly old. Its undo data (when the header names it) is
        # this journal's alone: a sync's is a fresh undo-log id, a rollback has none.
        with contextlib.suppress(OSError, TornJournal):
            meta = read_meta(path)
            if meta.undo_data and meta.kind == "sync":
                (Path(model_dir) / meta.undo_data).unlink(missing_ok=True)
        drop_journal(path)
        log.warning("discarded a torn sync journal in %s (%s): the checkpoint is unchanged", model_dir, exc)
        return RecoveryReport(status="discarded", detail=f"torn journal ({exc}); files were untouched")
    targets = check_targets(journal, model_dir)
    if journal.meta.mode == "undo" and not journal.applied:
        # In-place writes may have begun and are not known to be complete: put the old bytes back. The
        # write is lost, not half-done; its new bytes were the caller's (the live weights), who syncs again.
        stats = restore_undo(journal, targets)
        abandon_journal(journal, model_dir)
        log.warning("restored %s to before an interrupted %s: %d blocks", model_dir, journal.meta.kind,
                    stats.blocks_written)
        return RecoveryReport(status="restored", detail=f"{stats.blocks_written} blocks put back to before the "
                              f"interrupted {journal.meta.kind}", blocks_written=stats.blocks_written,
                              bytes_written=stats.bytes_written)
    stats = apply_journal(journal, targets)  # undo mode, applied: no records, only the files' fdatasync
    finish_journal(journal, model_dir)
    log.warning("replayed an interrupted %s of %s: %d blocks", journal.meta.kind, model_dir, stats.blocks_written)
    detail = (f"{stats.blocks_written} blocks re-applied ({journal.meta.kind})" if journal.meta.mode == "redo" else
              f"its in-place writes were complete; finished the {journal.meta.kind}")
    return RecoveryReport(status="replayed", detail=detail,
                          blocks_written=stats.blocks_written, bytes_written=stats.bytes_written)


def recover(model_dir: Path) -> RecoveryReport:
    """Finish or discard an interrupted write of `model_dir`; call before loading a model from it."""
    model_dir = Path(model_dir)
    if not pending_journal(model_dir):
        return RecoveryReport(status="clean")
    with locked(model_dir):
        return recover_locked(model_dir)


def replay_before_load(model_dir: Path) -> RecoveryReport:
    """What a loader calls: replay an unfinished journal, or refuse (JournalError) when it cannot.

    A directory without a journal costs one stat and needs no write access (read-only model stores
    load as before). With a journal, the files may be half-written: loading them would serve a mix of
    old and new weights, so a journal that cannot be replayed (read-only directory, foreign files)
    stops the load instead.
    """
    model_dir = Path(model_dir)
    if not pending_journal(model_dir):
        return RecoveryReport(status="clean")
    try:
        return recover(model_dir)
    except OSError as exc:
        raise JournalError(f"{model_dir} has an unfinished checkpoint sync journal ({JOURNAL_NAME}) that could not "
                           f"be replayed ({exc.strerror or exc}): its safetensors files may be half-written, so the "
                           "model is not loaded. Make the directory writable for this user and load again (the "
                           "journal is replayed first).") from None
