"""The redo journal that makes a block-level sync all-or-nothing across every file of a model.

Protocol (one journal per model directory, `.amygdala-sync.journal`):
1. append every changed block run (file, offset, bytes, crc32), then a commit record; fsync the
   journal and its directory. Until the commit record is durable no model file has been touched,
   so a crash leaves a torn journal and wholly old files: recovery deletes the journal.
2. pwrite the runs into the model files (a separate fd, never a memory map), fsync each file.
3. delete the journal and fsync the directory ("done").
A crash between 1 and 3 leaves a committed journal: recovery writes all runs again (idempotent:
absolute offsets, whole new bytes) and every file ends wholly new. Normal sync applies through the
same replay code, so the recovery path runs on every sync, not only after crashes.

No torch import here (the crash-test worker stays light).
"""

from __future__ import annotations

import os
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from amygdala.fsio import fsync_dir

from .format import JournalError, fingerprint

JOURNAL_NAME = ".amygdala-sync.journal"
MAGIC = b"AMYSYNC\x01"
_RECORD = struct.Struct("<IQII")  # file index, absolute offset, length, crc32(data)
_COMMIT = struct.Struct("<QQI")  # record count, data bytes, crc32 chained over record headers

EventHook = Callable[[str], None]


class TornJournal(Exception):
    """The journal has no valid commit record: it was being written when the process died."""


class JournalFile(BaseModel):
    name: str
    size: int
    header_sha256: str


class JournalMeta(BaseModel):
    version: int = 1
    block_size: int
    files: list[JournalFile]
    created: float


@dataclass(frozen=True)
class JournalRecord:
    file_index: int
    offset: int
    length: int
    position: int  # where the data starts inside the journal


@dataclass(frozen=True)
class Journal:
    """A committed, checksum-verified journal ready to replay."""

    path: Path
    meta: JournalMeta
    records: list[JournalRecord]

    @property
    def data_bytes(self) -> int:
        return sum(r.length for r in self.records)

    def blocks(self) -> int:
        b = self.meta.block_size
        return sum((r.length + b - 1) // b for r in self.records)


@dataclass(frozen=True)
class ApplyStats:
    writes: int
    bytes_written: int
    blocks_written: int


def journal_path(model_dir: Path) -> Path:
    return Path(model_dir) / JOURNAL_NAME


class JournalWriter:
    """Appends block runs; nothing is replayable until `commit()` returns."""

    def __init__(self, path: Path, meta: JournalMeta, on_event: EventHook | None = None):
        self.path = path
        self._on_event = on_event or (lambda _e: None)
        # "x": a journal left by a crash must be recovered first, never overwritten.
        self._fh = open(path, "xb", buffering=1 << 20)
        raw = meta.model_dump_json().encode()
        self._fh.write(MAGIC + struct.pack("<I", len(raw)) + raw)
        self._size = len(MAGIC) + 4 + len(raw)
        self.last_position = 0  # where the data of the latest record starts
        self.records = 0
        self.data_bytes = 0
        self._chain = 0

    def add(self, file_index: int, offset: int, data: memoryview | bytes) -> None:
        head = _RECORD.pack(file_index, offset, len(data), zlib.crc32(data))
        self._chain = zlib.crc32(head, self._chain)
        self._fh.write(b"B" + head)
        self._fh.write(data)
        self.last_position = self._size + 1 + len(head)
        self._size = self.last_position + len(data)
        self.records += 1
        self.data_bytes += len(data)
        self._on_event("journal-record")

    def commit(self) -> int:
        """Write the commit record and make the journal durable; returns its size in bytes."""
        self._fh.write(b"C" + _COMMIT.pack(self.records, self.data_bytes, self._chain) + MAGIC)
        self._fh.flush()
        os.fsync(self._fh.fileno())
        size = self._fh.tell()
        self._fh.close()
        fsync_dir(self.path.parent)
        self._on_event("journal-committed")
        return size

    def discard(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        self.path.unlink(missing_ok=True)


def new_meta(block_size: int, files: list[tuple[str, int, str]]) -> JournalMeta:
    return JournalMeta(block_size=block_size, created=time.time(),
                       files=[JournalFile(name=n, size=s, header_sha256=h) for n, s, h in files])


def read_journal(path: Path) -> Journal:
    """Parse and verify a journal; raises TornJournal unless it is complete and every checksum holds."""
    with open(path, "rb") as fh:
        magic = fh.read(len(MAGIC))
        if magic != MAGIC:
            raise TornJournal("empty: nothing reached the disk" if not magic else "bad or missing magic")
        raw_len = fh.read(4)
        if len(raw_len) != 4:
            raise TornJournal("truncated in the header")
        (n,) = struct.unpack("<I", raw_len)
        raw = fh.read(n)
        if len(raw) != n:
            raise TornJournal("truncated in the header")
        try:
            meta = JournalMeta.model_validate_json(raw)
        except ValueError as exc:
            raise TornJournal(f"header unreadable ({exc})") from None
        records: list[JournalRecord] = []
        chain = 0
        while True:
            tag = fh.read(1)
            if tag == b"B":
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
                records.append(JournalRecord(file_index, offset, length, position))
            elif tag == b"C":
                tail = fh.read(_COMMIT.size + len(MAGIC))
                if len(tail) != _COMMIT.size + len(MAGIC) or tail[_COMMIT.size:] != MAGIC:
                    raise TornJournal("commit record incomplete")
                count, data_bytes, want_chain = _COMMIT.unpack(tail[:_COMMIT.size])
                if count != len(records) or data_bytes != sum(r.length for r in records) or want_chain != chain:
                    raise TornJournal("commit record disagrees with the records")
                if fh.read(1):
                    raise TornJournal("data after the commit record")
                return Journal(path, meta, records)
            else:
                raise TornJournal(f"no commit record (ends after {len(records)} records)")


def check_targets(journal: Journal, model_dir: Path) -> list[Path]:
    """The files a committed journal was written for, verified to still be those files (size, header)."""
    paths = []
    for f in journal.meta.files:
        p = Path(model_dir) / f.name
        if not p.is_file():
            raise JournalError(f"unfinished sync journal {journal.path} targets {f.name}, which is gone. If the model "
                               f"was deliberately replaced, delete {journal.path}; otherwise restore {f.name} first.")
        fp = fingerprint(p)
        if fp.size != f.size or fp.header_sha256 != f.header_sha256:
            raise JournalError(f"unfinished sync journal {journal.path} was written for a different {f.name} "
                               f"(size or header changed). If the model was deliberately replaced, delete "
                               f"{journal.path}; replaying it would corrupt the new file.")
        paths.append(p)
    return paths


_datasync = getattr(os, "fdatasync", os.fsync)


def _pwrite_all(fd: int, data: bytes, offset: int) -> int:
    done = 0
    calls = 0
    view = memoryview(data)
    while done < len(data):
        n = os.pwrite(fd, view[done:], offset + done)
        if n <= 0:
            raise OSError(f"pwrite wrote {n} bytes")
        done += n
        calls += 1
    return calls


def apply_journal(journal: Journal, targets: list[Path], on_event: EventHook | None = None) -> ApplyStats:
    """Write every run into its file with positioned writes, then fsync each file."""
    on_event = on_event or (lambda _e: None)
    fds = [os.open(p, os.O_RDWR) for p in targets]
    jfd = os.open(journal.path, os.O_RDONLY)
    writes = 0
    try:
        for rec in journal.records:
            data = os.pread(jfd, rec.length, rec.position)
            if len(data) != rec.length:
                raise OSError(f"journal {journal.path} shrank while replaying")
            writes += _pwrite_all(fds[rec.file_index], data, rec.offset)
            on_event("block-written")
        for fd in fds:
            _datasync(fd)  # overwrites only: size unchanged, so the data is all that must reach disk
        on_event("files-synced")
    finally:
        os.close(jfd)
        for fd in fds:
            os.close(fd)
    return ApplyStats(writes=writes, bytes_written=journal.data_bytes, blocks_written=journal.blocks())


def finish_journal(path: Path, on_event: EventHook | None = None) -> None:
    """Mark the sync done: the journal disappears durably."""
    path.unlink(missing_ok=True)
    fsync_dir(path.parent)
    if on_event:
        on_event("done")
