"""The fsync'd append-only journal: one checksummed JSON line per acknowledged write.

File layout (``journal.log``)::

    <crc32 hex> {"format": "amygdala.memory_graph.journal", "version": 1, "base_seq": S}
    <crc32 hex> {"seq": S+1, "time": "...", "mutations": [...]}
    <crc32 hex> {"seq": S+2, ...}

`base_seq` is the sequence number of the snapshot the journal continues from. Each record is
written with a single write call and fsync'd before the write is acknowledged, so after a crash
only the *last* line can be damaged; it is reported as torn and dropped. A bad line anywhere else
means the file was damaged after it was written, and scanning refuses it.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from .ops import Mutation

JOURNAL_FORMAT = "amygdala.memory_graph.journal"


class JournalHeader(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["amygdala.memory_graph.journal"] = JOURNAL_FORMAT
    version: Literal[1] = 1
    base_seq: int = Field(ge=0)


class JournalRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    seq: int = Field(ge=1)
    time: AwareDatetime
    mutations: tuple[Mutation, ...] = Field(min_length=1)


def encode_line(model: BaseModel) -> bytes:
    body = model.model_dump_json().encode("utf-8")
    return b"%08x %s\n" % (zlib.crc32(body), body)


def _decode(raw: bytes) -> tuple[dict | None, str]:
    """(parsed JSON object, "") or (None, why the line is bad)."""
    if len(raw) < 10 or raw[8:9] != b" ":
        return None, "missing the 8-digit checksum prefix"
    try:
        crc = int(raw[:8], 16)
    except ValueError:
        return None, "checksum prefix is not hexadecimal"
    body = raw[9:]
    if zlib.crc32(body) != crc:
        return None, "checksum mismatch"
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"not valid JSON ({exc})"
    if not isinstance(obj, dict):
        return None, "not a JSON object"
    return obj, ""


@dataclass(frozen=True)
class BadLine:
    line_no: int
    offset: int
    raw: bytes
    reason: str

    def describe(self) -> str:
        preview = self.raw[:80].decode("utf-8", "replace")
        return f"journal line {self.line_no} (byte {self.offset}): {self.reason}: {preview!r}"


@dataclass(frozen=True)
class ScannedRecord:
    line_no: int
    end_offset: int
    record: JournalRecord


@dataclass
class JournalScan:
    """What a scan found. `valid_end` is the byte offset just past the last good line: the point a
    writer truncates back to before appending, so a torn tail never ends up mid-file."""

    header: JournalHeader | None
    records: list[ScannedRecord] = field(default_factory=list)
    bad: list[BadLine] = field(default_factory=list)
    valid_end: int = 0
    lines: int = 0

    @property
    def torn(self) -> BadLine | None:
        """The damaged last line, if the only damage is there."""
        if len(self.bad) == 1 and self.bad[0].line_no == self.lines:
            return self.bad[0]
        return None

    @property
    def corrupt(self) -> list[BadLine]:
        """Damage that is not a torn last line."""
        return [b for b in self.bad if b.line_no != self.lines]


def scan(data: bytes, *, start_offset: int = 0, start_line: int = 0, with_header: bool = True) -> JournalScan:
    """Parse journal bytes (the whole file, or the tail from `start_offset` after `start_line` lines).

    An unterminated final segment is always treated as torn, even if it parses: the newline is
    part of the single write, so a line without it was never fsync'd and never acknowledged.
    """
    result = JournalScan(header=None, valid_end=start_offset, lines=start_line)
    pos = 0
    line_no = start_line
    need_header = with_header
    while pos < len(data):
        nl = data.find(b"\n", pos)
        terminated = nl != -1
        end = nl + 1 if terminated else len(data)
        raw = data[pos:nl] if terminated else data[pos:]
        line_no += 1
        offset = start_offset + pos
        pos = end
        if not terminated:
            result.bad.append(BadLine(line_no, offset, raw, "incomplete line (no newline): a write cut off by a crash"))
            continue
        obj, why = _decode(raw)
        if obj is not None:
            try:
                if need_header:
                    result.header = JournalHeader.model_validate(obj)
                else:
                    rec = JournalRecord.model_validate(obj)
                    result.records.append(ScannedRecord(line_no, start_offset + end, rec))
            except ValidationError as exc:
                obj, why = None, "does not match the record schema: " + _short(exc)
        if obj is None:
            result.bad.append(BadLine(line_no, offset, raw, why))
            need_header = False  # a bad header is reported once; later lines are records
            continue
        need_header = False
        if not result.bad:
            result.valid_end = start_offset + end
    result.lines = line_no
    return result


def _short(exc: ValidationError) -> str:
    errs = exc.errors()
    first = errs[0]
    loc = ".".join(str(p) for p in first.get("loc", ()))
    more = f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""
    return f"{loc}: {first.get('msg')}{more}"
