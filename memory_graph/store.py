"""The graph store: a networkx MultiDiGraph kept durable by snapshot + journal, one writer at a time.

Files in the graph directory:

* ``journal.log``: every acknowledged write since the snapshot (see journal.py).
* ``snapshot.json``: the whole graph at sequence number ``seq`` (see snapshot.py).
* ``snapshot.prev.json`` / ``journal.prev.log``: hard links to the generation before the last
  compaction, kept so `repair` can rebuild even if the current snapshot is damaged.
* ``writer.lock``: the cross-process writer lock (see lock.py).

Writes: take the thread lock, then the file lock, catch up with anything other processes appended,
check the mutations, append one journal line, fsync, apply in memory, return. The write is
acknowledged only when the method returns, and by then it is on disk.

Reads never take the file lock. They catch up from the journal (a stat, then reading only new
bytes) and retry a full load if a compaction by another process raced with them; sequence numbers
must be contiguous, so a race or a lost record is always noticed.
"""

from __future__ import annotations

import fcntl
import os
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from time import sleep
from types import TracebackType
from typing import Any, TypeVar

import networkx as nx
from pydantic import BaseModel, ConfigDict, ValidationError

from . import ops
from .errors import (CorruptGraphError, IdempotencyConflictError, InvalidInputError, InvalidTransitionError,
                     MalformedTagLinesError, MemoryGraphError, NodeNotFoundError, TornTailWarning)
from amygdala.fsio import atomic_write, fsync_dir, link_replace, remove_stale_temps, sync_data, write_all
from .journal import JournalHeader, JournalRecord, JournalScan, encode_line, scan
from .lock import WriterLock
from .models import (NODE_CLASSES, STATUS_TRANSITIONS, Certificate, CertificateReview, Correction, CorrectionStatus, DreamCycle, Edge,
                     EdgeKind, Invariant, JudgeSpec, Memory, Node, NodeKind, Scenario, StatusChange, edge_from_attrs, new_id,
                     node_from_attrs, utc_now)
from .snapshot import SnapshotError, SnapshotHeader, read_snapshot, write_snapshot
from .tags import parse_tag_lines

JOURNAL_NAME = "journal.log"
SNAPSHOT_NAME = "snapshot.json"
PREV_JOURNAL_NAME = "journal.prev.log"
PREV_SNAPSHOT_NAME = "snapshot.prev.json"
LOCK_NAME = "writer.lock"
DEFAULT_SNAPSHOT_EVERY = 10_000
DEFAULT_LOCK_TIMEOUT = 10.0
_LOAD_ATTEMPTS = 20

T = TypeVar("T")
N = TypeVar("N", bound=BaseModel)
Links = Sequence[tuple[EdgeKind, str]]


class GraphStats(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    directory: str
    nodes: int
    edges: int
    nodes_by_kind: dict[str, int]
    edges_by_kind: dict[str, int]
    corrections_by_status: dict[str, int]
    seq: int
    snapshot_seq: int
    journal_records: int
    journal_bytes: int


class _Raced(Exception):
    """A compaction by another process happened between reading the snapshot and the journal."""


@dataclass
class _Loaded:
    graph: nx.MultiDiGraph
    idx: ops.Indexes
    seq: int
    base_seq: int
    snapshot_seq: int
    fd: int
    ino: int
    offset: int
    lines: int


def _describe_bad(scan_result: JournalScan, limit: int = 3) -> str:
    bad = scan_result.corrupt
    text = "; ".join(b.describe() for b in bad[:limit])
    return text + (f"; and {len(bad) - limit} more bad line(s)" if len(bad) > limit else "")


def _read_fd(fd: int, offset: int) -> bytes:
    chunks = []
    while True:
        chunk = os.pread(fd, 1 << 20, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


def _invalid(what: str, exc: ValidationError) -> InvalidInputError:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ())) or what
        parts.append(f"{loc}: {err.get('msg')}")
    return InvalidInputError(f"invalid {what}: " + "; ".join(parts) + "; nothing was stored")


def merge_scores(text: str, emotions: Mapping[str, float] | None) -> dict[str, float]:
    """Tag-line scores from `text` plus explicit `emotions`; malformed lines or a conflict raise."""
    parsed = parse_tag_lines(text)
    if parsed.errors:
        raise MalformedTagLinesError(list(parsed.errors))
    scores = dict(parsed.scores)
    for name, score in (emotions or {}).items():
        if name in scores and scores[name] != score:
            raise InvalidInputError(f"emotion {name!r} is {scores[name]} in the text's tag line but {score} in "
                                    f"`emotions`; give it once; nothing was stored")
        scores[name] = score
    return scores


class MemoryGraph:
    """A durable, thread-safe memory graph in one directory.

    `readonly=True` never takes the writer lock and never changes a file (CLI `list`/`show`, or
    a process that only samples). `snapshot_every` journal records trigger a compaction; None
    turns that off (call `snapshot()` yourself). `lock_timeout` is how long a write waits for
    another process's write before failing with the holder's pid.
    """

    def __init__(self, directory: Path | str, *, readonly: bool = False, create: bool = True,
                 lock_timeout: float = DEFAULT_LOCK_TIMEOUT, snapshot_every: int | None = DEFAULT_SNAPSHOT_EVERY,
                 validate_snapshot: bool = True, clock: Callable[[], datetime] = utc_now) -> None:
        self.directory = Path(directory).expanduser()
        self.readonly = readonly
        self.snapshot_every = snapshot_every
        self.validate_snapshot = validate_snapshot
        self._clock = clock
        self._mutex = threading.RLock()
        self._jpath = self.directory / JOURNAL_NAME
        self._spath = self.directory / SNAPSHOT_NAME
        self._lock: WriterLock | None = None
        self._wfd: int | None = None
        self._fd: int | None = None
        self._batch_depth = 0
        self._unsynced = False
        self._closed = False
        self._graph = nx.MultiDiGraph()
        self._idx = ops.Indexes()
        self._seq = self._base_seq = self._snapshot_seq = 0
        self._ino = -1
        self._offset = self._lines = 0

        if not self._jpath.exists():
            if self._spath.exists():
                raise CorruptGraphError(self.directory, f"{SNAPSHOT_NAME} exists but {JOURNAL_NAME} is missing")
            if readonly or not create:
                raise MemoryGraphError(
                    f"no memory graph at {self.directory} (no {JOURNAL_NAME}); create one by writing to it, "
                    f"e.g. `amygdala memory add --dir {self.directory} 'first memory'`")
        try:
            if readonly:
                self._reload(locked=False)
            else:
                self.directory.mkdir(parents=True, exist_ok=True)
                self._lock = WriterLock(self.directory / LOCK_NAME, lock_timeout)
                with self._locked():
                    if not self._jpath.exists():
                        if self._spath.exists():
                            raise CorruptGraphError(self.directory, f"{SNAPSHOT_NAME} exists but {JOURNAL_NAME} is missing")
                        atomic_write(self._jpath, encode_line(JournalHeader(base_seq=0)))
                        fsync_dir(self.directory.parent)  # a new graph directory must survive a crash too
                    self._reload(locked=True)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            for fd in (self._wfd, self._fd):
                if fd is not None:
                    os.close(fd)
            self._wfd = self._fd = None
            if self._lock is not None:
                self._lock.close()

    def __enter__(self) -> "MemoryGraph":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MemoryGraph({str(self.directory)!r}, nodes={self._graph.number_of_nodes()}, seq={self._seq})"

    @property
    def seq(self) -> int:
        """Sequence number of the last write this instance has seen."""
        return self._seq

    # ------------------------------------------------------------------ locking

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Thread lock + file lock; re-entrant inside a batch."""
        with self._mutex:
            if self._closed:
                raise MemoryGraphError(f"memory graph at {self.directory} is closed")
            assert self._lock is not None
            if self._lock.held:
                yield
                return
            self._lock.acquire()
            try:
                yield
            finally:
                self._lock.release()

    @contextmanager
    def batch(self) -> Iterator["MemoryGraph"]:
        """Hold the writer lock across many writes and fsync once at the end.

        Writes inside the block are acknowledged when the block exits, not when each call
        returns: use it for imports and benchmarks, not for agent writes. It is not a transaction;
        a write that succeeded stays even if a later one in the block fails.
        """
        if self.readonly:
            raise MemoryGraphError("this memory graph was opened read-only")
        with self._locked():
            self._batch_depth += 1
            try:
                yield self
            finally:
                self._batch_depth -= 1
                if self._batch_depth == 0:
                    self._flush()
                    self._maybe_compact()

    def _flush(self) -> None:
        if self._unsynced and self._wfd is not None:
            sync_data(self._wfd)
            self._unsynced = False

    # ------------------------------------------------------------------ loading

    def _install(self, loaded: _Loaded) -> None:
        if self._fd is not None:
            os.close(self._fd)
        if self._wfd is not None:
            os.close(self._wfd)
            self._wfd = None
        self._graph, self._idx = loaded.graph, loaded.idx
        self._seq, self._base_seq, self._snapshot_seq = loaded.seq, loaded.base_seq, loaded.snapshot_seq
        self._fd, self._ino, self._offset, self._lines = loaded.fd, loaded.ino, loaded.offset, loaded.lines

    def _reload(self, *, locked: bool) -> None:
        for attempt in range(_LOAD_ATTEMPTS):
            # Without the lock a mismatch may be a compaction racing with us: retry. On the last
            # attempt (or with the lock) a mismatch is reported as the damage it then must be.
            may_race = not locked and attempt < _LOAD_ATTEMPTS - 1
            try:
                loaded = self._load_once(locked=locked, may_race=may_race)
            except _Raced:
                sleep(0.002 * (attempt + 1))  # let the compaction we raced with finish
                continue
            self._install(loaded)
            if locked and loaded.base_seq < loaded.snapshot_seq:
                # A compaction was interrupted after the new snapshot landed; finish it so the
                # journal's base matches the snapshot again.
                self._compact_locked()
            return

    def _load_once(self, *, locked: bool, may_race: bool) -> _Loaded:
        snapshot_seq = 0
        graph = nx.MultiDiGraph()
        # Open the journal before reading the snapshot: if a compaction lands in between, the
        # journal we hold is older than the snapshot and the sequence check below skips or
        # detects it, instead of pairing an old snapshot with a newer journal.
        try:
            fd = os.open(self._jpath, os.O_RDONLY)
        except FileNotFoundError:
            raise CorruptGraphError(self.directory, f"{JOURNAL_NAME} is missing") from None
        try:
            if self._spath.exists():
                try:
                    snap = read_snapshot(self._spath, validate_nodes=self.validate_snapshot)
                except SnapshotError as exc:
                    raise CorruptGraphError(self.directory, f"{SNAPSHOT_NAME}: {exc}") from None
                except FileNotFoundError:
                    if may_race:
                        raise _Raced() from None
                    raise CorruptGraphError(self.directory, f"{SNAPSHOT_NAME} disappeared while loading") from None
                graph, snapshot_seq = snap.graph, snap.header.seq
            data = _read_fd(fd, 0)
            ino = os.fstat(fd).st_ino
            result = scan(data)
            if result.header is None:
                raise CorruptGraphError(self.directory, f"{JOURNAL_NAME} has no valid header line")
            base = result.header.base_seq
            if base > snapshot_seq:
                if may_race:
                    raise _Raced()
                raise CorruptGraphError(self.directory, f"{JOURNAL_NAME} continues from seq {base} but "
                                                        f"{SNAPSHOT_NAME} only reaches seq {snapshot_seq}")
            if result.corrupt:
                raise CorruptGraphError(self.directory, _describe_bad(result))
            torn = result.torn
            if torn is not None:
                if locked or not self._writer_active():
                    warnings.warn(f"memory graph {self.directory}: dropped an incomplete last journal line "
                                  f"({torn.describe()}); it was never acknowledged", TornTailWarning, stacklevel=4)
                if locked:
                    self._truncate(result.valid_end)
            idx = ops.Indexes.build(graph)
            seq = base
            for rec in result.records:
                if rec.record.seq != seq + 1:
                    raise CorruptGraphError(self.directory, f"journal line {rec.line_no} has seq {rec.record.seq}, "
                                                            f"expected {seq + 1} (records are missing)")
                seq = rec.record.seq
                if seq <= snapshot_seq:
                    continue  # already in the snapshot (compaction was interrupted)
                self._replay(graph, idx, rec.record, rec.line_no)
            if seq < snapshot_seq:
                # Compaction always snapshots at the journal's last seq, so a shorter journal
                # means a compaction ran between our two reads (or records were lost).
                if may_race:
                    raise _Raced()
                raise CorruptGraphError(self.directory, f"{JOURNAL_NAME} ends at seq {seq} but {SNAPSHOT_NAME} "
                                                        f"is at seq {snapshot_seq}")
            lines = result.lines - (1 if torn is not None else 0)
            return _Loaded(graph, idx, seq, base, snapshot_seq, fd, ino, result.valid_end, lines)
        except BaseException:
            os.close(fd)
            raise

    def _replay(self, graph: nx.MultiDiGraph, idx: ops.Indexes, record: JournalRecord, line_no: int) -> None:
        try:
            ops.check(graph, record.mutations, idx)
        except (ops.MutationError, ValidationError) as exc:
            raise CorruptGraphError(self.directory, f"journal line {line_no} (seq {record.seq}) does not apply: {exc}") from None
        ops.apply(graph, record.mutations, idx)

    def _writer_active(self) -> bool:
        """Whether some process holds the writer lock (so a partial last line may be a write in
        progress rather than a crash; only then is dropping it not worth a warning)."""
        try:
            fd = os.open(self.directory / LOCK_NAME, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def _truncate(self, length: int) -> None:
        fd = os.open(self._jpath, os.O_WRONLY)
        try:
            os.ftruncate(fd, length)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _catch_up(self, *, locked: bool) -> None:
        """Apply what other processes appended since we last looked (or reload after a compaction)."""
        try:
            st = os.stat(self._jpath)
        except FileNotFoundError:
            if locked:
                raise CorruptGraphError(self.directory, f"{JOURNAL_NAME} is missing") from None
            return self._reload(locked=locked)
        if st.st_ino != self._ino or st.st_size < self._offset:
            return self._reload(locked=locked)
        if st.st_size == self._offset:
            return None
        assert self._fd is not None
        data = _read_fd(self._fd, self._offset)
        result = scan(data, start_offset=self._offset, start_line=self._lines, with_header=False)
        if result.corrupt:
            raise CorruptGraphError(self.directory, _describe_bad(result))
        for rec in result.records:
            if rec.record.seq != self._seq + 1:
                raise CorruptGraphError(self.directory, f"journal line {rec.line_no} has seq {rec.record.seq}, "
                                                        f"expected {self._seq + 1} (records are missing)")
            self._replay(self._graph, self._idx, rec.record, rec.line_no)
            self._seq, self._offset, self._lines = rec.record.seq, rec.end_offset, rec.line_no
        torn = result.torn
        if torn is not None and locked:
            # We hold the lock, so nobody is mid-write: this line was cut off by a crash. Cut it
            # before appending, or our next line would be glued onto it and both would be lost.
            warnings.warn(f"memory graph {self.directory}: dropped an incomplete last journal line "
                          f"({torn.describe()}); it was never acknowledged", TornTailWarning, stacklevel=4)
            self._truncate(self._offset)
        return None

    def refresh(self) -> None:
        """See writes made by other processes since this instance last looked."""
        with self._mutex:
            self._check_open()
            self._catch_up(locked=self._lock is not None and self._lock.held)

    def _check_open(self) -> None:
        if self._closed:
            raise MemoryGraphError(f"memory graph at {self.directory} is closed")

    # ------------------------------------------------------------------ writing

    def _write(self, plan: Callable[[], tuple[list[ops.Mutation], T]]) -> T:
        """Run `plan` against the caught-up graph and make its mutations durable before returning.

        `plan` runs under both locks, after catching up, so idempotency and uniqueness checks see
        every write any process acknowledged before ours.
        """
        if self.readonly:
            raise MemoryGraphError(f"memory graph at {self.directory} was opened read-only")
        with self._locked():
            self._catch_up(locked=True)
            mutations, result = plan()
            if not mutations:
                return result
            try:
                ops.check(self._graph, mutations, self._idx)
            except ops.MutationError as exc:
                raise InvalidInputError(f"{exc}; nothing was stored") from None
            record = JournalRecord(seq=self._seq + 1, time=self._clock(), mutations=tuple(mutations))
            line = encode_line(record)
            self._append(line)
            ops.apply(self._graph, mutations, self._idx)
            self._seq += 1
            self._offset += len(line)
            self._lines += 1
            if self._batch_depth == 0:
                self._maybe_compact()
            return result

    def _append(self, line: bytes) -> None:
        if self._wfd is None:
            self._wfd = os.open(self._jpath, os.O_WRONLY | os.O_APPEND)
            if os.fstat(self._wfd).st_ino != self._ino:
                raise CorruptGraphError(self.directory, f"{JOURNAL_NAME} was replaced while the writer lock was held")
        try:
            write_all(self._wfd, line)
            if self._batch_depth == 0:
                sync_data(self._wfd)
            else:
                self._unsynced = True
        except OSError as exc:
            try:
                os.ftruncate(self._wfd, self._offset)
                os.fsync(self._wfd)
            except OSError:
                self._ino = -1  # force a full reload before the next write
            raise MemoryGraphError(f"could not write to {self._jpath} ({exc}); the write was not stored") from exc

    def _maybe_compact(self) -> None:
        if self.snapshot_every and self._seq - self._base_seq >= self.snapshot_every:
            try:
                self._compact_locked()
            except OSError as exc:
                # The write that triggered this is already durable; failing it now would make
                # the caller retry a write that was stored. The journal just keeps growing.
                warnings.warn(f"memory graph {self.directory}: compaction failed ({exc}); writes are safe in "
                              f"the journal, compaction will be retried", RuntimeWarning, stacklevel=4)

    def _compact_locked(self) -> SnapshotHeader:
        self._flush()
        remove_stale_temps(self.directory)
        try:  # best effort: the previous generation only matters to `repair`
            if self._spath.exists():
                link_replace(self._spath, self.directory / PREV_SNAPSHOT_NAME)
            link_replace(self._jpath, self.directory / PREV_JOURNAL_NAME)
        except OSError:
            pass
        header = write_snapshot(self._spath, self._graph, self._seq)
        # The snapshot is durable: from here a crash leaves an old journal whose records the
        # snapshot already holds, which loading skips by sequence number.
        head_line = encode_line(JournalHeader(base_seq=self._seq))
        atomic_write(self._jpath, head_line)
        fd = os.open(self._jpath, os.O_RDONLY)
        if self._fd is not None:
            os.close(self._fd)
        if self._wfd is not None:
            os.close(self._wfd)
            self._wfd = None
        self._fd, self._ino = fd, os.fstat(fd).st_ino
        self._offset, self._lines = len(head_line), 1
        self._base_seq = self._snapshot_seq = self._seq
        return header

    def snapshot(self) -> SnapshotHeader:
        """Compact now: write the whole graph to a new snapshot and start an empty journal."""
        if self.readonly:
            raise MemoryGraphError(f"memory graph at {self.directory} was opened read-only")
        with self._locked():
            self._catch_up(locked=True)
            return self._compact_locked()

    # ------------------------------------------------------------------ write helpers

    def _now(self, time: datetime | None) -> datetime:
        return self._clock() if time is None else time

    def _build(self, cls: type[N], **fields: Any) -> N:
        try:
            return cls(**fields)
        except ValidationError as exc:
            raise _invalid(cls.__name__.lower(), exc) from None

    def _edges_for(self, source: str, links: Links, time: datetime) -> list[ops.Mutation]:
        out: list[ops.Mutation] = []
        for kind, target in links:
            try:
                out.append(ops.AddEdge(edge=Edge(source=source, target=target, kind=kind, time=time)))
            except ValidationError as exc:
                raise _invalid("link", exc) from None
        return out

    def _node_or_existing(self, node: Node, edges: list[ops.Mutation]) -> tuple[list[ops.Mutation], Node]:
        """Mutations to add `node`, or none if an earlier write with its idempotency key matches."""
        key = node.idempotency_key
        if key is not None and key in self._idx.keys:
            existing = self._get(self._idx.keys[key])
            diffs = [] if existing.kind == node.kind else ["kind"]
            if not diffs:
                old, new = existing.content(), node.content()
                diffs = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            wanted = {(m.edge.kind, m.edge.target) for m in edges if isinstance(m, ops.AddEdge)}
            have = {(k, t) for _, t, k in self._graph.out_edges(existing.id, keys=True)}
            if diffs or not wanted <= have:
                raise IdempotencyConflictError(key, existing.id, diffs)
            return [], existing
        return [ops.AddNode(node=node), *edges], node

    def _resolve(self, ref: str, kind: NodeKind, what: str) -> str:
        """An id, or for invariants also a name, of an existing node of `kind`."""
        if kind == "invariant" and ref in self._idx.names:
            return self._idx.names[ref]
        if ref in self._graph and self._graph.nodes[ref]["kind"] == kind:
            return ref
        hint = f"`amygdala memory list --kind {kind}` shows the ids" + (" and names" if kind == "invariant" else "")
        raise InvalidInputError(f"{what} {ref!r} is not an existing {kind}; {hint}; nothing was stored")

    # ------------------------------------------------------------------ public writes

    def add_memory(self, text: str, *, time: datetime | None = None, source: str = "agent",
                   tags: Sequence[str] = (), emotions: Mapping[str, float] | None = None,
                   links: Links = (), idempotency_key: str | None = None) -> Memory:
        """Store a memory; emotion tag lines in `text` become its emotion scores.

        Scores in `emotions` (e.g. from a residual-stream readout) are merged with the tag
        lines; the same emotion with two different scores is refused rather than guessed.
        """
        scores = merge_scores(text, emotions)
        when = self._now(time)

        def plan() -> tuple[list[ops.Mutation], Memory]:
            node = self._build(Memory, id=new_id("memory"), text=text, time=when, source=source, tags=tuple(tags),
                               emotions=scores, idempotency_key=idempotency_key)
            return self._node_or_existing(node, self._edges_for(node.id, links, when))  # type: ignore[return-value]

        return self._write(plan)

    def submit_correction(self, context: str, preferred: str, rejected: str | None = None,
                          invariant: str | None = None, note: str | None = None,
                          idempotency_key: str | None = None, *, emotions: Mapping[str, float] | None = None,
                          links: Links = (), time: datetime | None = None) -> Correction:
        """Store a correction (status "pending"); `invariant` is an invariant's id or name.

        Agents retry on timeouts: pass an `idempotency_key` and a retried call returns the
        correction stored the first time instead of storing it again.
        """
        return self.add_correction(context, preferred, rejected, invariant, note, idempotency_key, emotions=emotions,
                                   links=links, time=time)[0]

    def add_correction(self, context: str, preferred: str, rejected: str | None = None,
                       invariant: str | None = None, note: str | None = None,
                       idempotency_key: str | None = None, *, emotions: Mapping[str, float] | None = None,
                       links: Links = (), time: datetime | None = None) -> tuple[Correction, bool]:
        """`submit_correction` that also says whether this call stored it: (correction, created).

        `created` is decided under the writer lock, so of two concurrent retries with one
        idempotency key exactly one gets True (and only that one should, say, queue a job).
        """
        when = self._now(time)

        def plan() -> tuple[list[ops.Mutation], tuple[Correction, bool]]:
            inv_id = self._resolve(invariant, "invariant", "invariant") if invariant is not None else None
            node = self._build(Correction, id=new_id("correction"), context=context, preferred=preferred,
                               rejected=rejected, note=note, invariant_id=inv_id, emotions=dict(emotions or {}),
                               time=when, idempotency_key=idempotency_key,
                               history=(StatusChange(status="pending", time=when),))
            extra = [("about", inv_id)] if inv_id is not None else []
            muts, stored = self._node_or_existing(node, self._edges_for(node.id, [*extra, *links], when))
            return muts, (stored, bool(muts))  # type: ignore[return-value]

        return self._write(plan)

    def set_correction_status(self, correction_id: str, status: CorrectionStatus, *, note: str | None = None,
                              job_id: str | None = None, expect: CorrectionStatus | None = None,
                              time: datetime | None = None) -> Correction:
        """Move a correction along pending → queued → trained → certified / rolled_back.

        Asking for the status it already has is a no-op, so a dream loop that crashed after
        updating can safely redo the step. `job_id` records the training job (kept on trained and
        rolled_back, cleared on pending). With `expect`, the move happens only if the correction
        is in that status when the writer lock is held (a compare-and-set); otherwise it is
        returned unchanged.
        """
        when = self._now(time)

        def plan() -> tuple[list[ops.Mutation], Correction]:
            current = self._get_kind(correction_id, "correction")
            assert isinstance(current, Correction)
            if expect is not None and current.status != expect:
                return [], current
            if current.status == status and (job_id is None or job_id == current.job_id):
                return [], current
            allowed = list(STATUS_TRANSITIONS.get(current.status, ()))
            if status != current.status and status not in allowed:
                raise InvalidTransitionError(correction_id, current.status, status, allowed)
            new_job = None if status == "pending" else (job_id if job_id is not None else current.job_id)
            change = self._build(StatusChange, status=status, time=when, note=note, job_id=new_job)
            node = current.model_copy(update={"status": status, "job_id": new_job, "history": (*current.history, change)})
            node = Correction.model_validate(node.model_dump())
            return [ops.ReplaceNode(node=node)], node

        return self._write(plan)

    def add_invariant(self, name: str, description: str, judge: JudgeSpec | Mapping[str, Any], *,
                      threshold: float, templates: Sequence[str] = (), confidence: float = 0.95,
                      spec: Mapping[str, Any] | None = None, replace: bool = False,
                      links: Links = (), idempotency_key: str | None = None, time: datetime | None = None) -> Invariant:
        """Store a behavioural rule. Names are unique among active invariants; re-adding an identical one returns it.

        `spec` is the whole invariant as written (cases, templates), kept for the dream loop. With
        `replace`, an active invariant of that name and different content is retired and the new
        one added (linked to it by `derived_from`) in one journal record.
        """
        when = self._now(time)

        def plan() -> tuple[list[ops.Mutation], Invariant]:
            judge_spec = judge if isinstance(judge, JudgeSpec) else self._build(JudgeSpec, **dict(judge))
            node = self._build(Invariant, id=new_id("invariant"), name=name, description=description,
                               judge=judge_spec, templates=tuple(templates), threshold=threshold,
                               confidence=confidence, spec=None if spec is None else dict(spec), time=when,
                               idempotency_key=idempotency_key)
            edges = self._edges_for(node.id, links, when)
            existing = self._get(self._idx.names[name]) if name in self._idx.names else None
            if idempotency_key is None and isinstance(existing, Invariant) and not existing.retired:
                if existing.content() == node.content():
                    return [], existing
                if not replace:
                    raise InvalidInputError(f"an invariant named {name!r} already exists ({existing.id}) with "
                                            f"different content; choose another name or replace it; nothing was stored")
                retired = existing.model_copy(update={"retired": True})
                link = self._edges_for(node.id, [("derived_from", existing.id)], when)
                return [ops.ReplaceNode(node=retired), ops.AddNode(node=node), *edges, *link], node
            return self._node_or_existing(node, edges)  # type: ignore[return-value]

        return self._write(plan)

    def retire_invariant(self, invariant: str) -> Invariant:
        """Retire an invariant (id or name): kept with its certificates for history, no longer active. Idempotent."""
        def plan() -> tuple[list[ops.Mutation], Invariant]:
            current = self._get(self._resolve(invariant, "invariant", "invariant"))
            assert isinstance(current, Invariant)
            if current.retired:
                return [], current
            node = current.model_copy(update={"retired": True})
            return [ops.ReplaceNode(node=node)], node

        return self._write(plan)

    def add_scenario(self, invariant: str, prompt: str, *, template: str | None = None,
                     variables: Mapping[str, str] | None = None, expected: str | None = None,
                     generator: str = "dream", seed: int | None = None, derived_from: Sequence[str] = (),
                     idempotency_key: str | None = None, time: datetime | None = None) -> Scenario:
        """Store one generated test case for an invariant (id or name)."""
        when = self._now(time)

        def plan() -> tuple[list[ops.Mutation], Scenario]:
            inv_id = self._resolve(invariant, "invariant", "invariant")
            node = self._build(Scenario, id=new_id("scenario"), invariant_id=inv_id, prompt=prompt,
                               template=template, variables=dict(variables or {}), expected=expected,
                               generator=generator, seed=seed, time=when, idempotency_key=idempotency_key)
            links = [("derived_from", inv_id), *(("derived_from", s) for s in derived_from)]
            return self._node_or_existing(node, self._edges_for(node.id, links, when))  # type: ignore[return-value]

        return self._write(plan)

    def issue_certificate(self, invariant: str, *, model: str, trials: int, successes: int, lower_bound: float,
                          upper_bound: float, method: str, passed: bool, p_value: float | None = None,
                          threshold: float | None = None, confidence: float | None = None,
                          details: Mapping[str, Any] | None = None, corrections: Sequence[str] = (),
                          scenarios: Sequence[str] = (), idempotency_key: str | None = None,
                          time: datetime | None = None) -> Certificate:
        """Record an evaluation of an invariant; threshold and confidence default to the invariant's.

        A certificate may not use a lower threshold than its invariant: that would certify a
        weaker rule than the one the graph claims holds.
        """
        when = self._now(time)

        def plan() -> tuple[list[ops.Mutation], Certificate]:
            inv_id = self._resolve(invariant, "invariant", "invariant")
            inv = self._get(inv_id)
            assert isinstance(inv, Invariant)
            thr = inv.threshold if threshold is None else threshold
            if thr < inv.threshold:
                raise InvalidInputError(f"threshold {thr} is below invariant {inv.name!r}'s threshold {inv.threshold}; "
                                        "nothing was stored")
            node = self._build(Certificate, id=new_id("certificate"), invariant_id=inv_id, model=model,
                               trials=trials, successes=successes, threshold=thr,
                               confidence=inv.confidence if confidence is None else confidence,
                               lower_bound=lower_bound, upper_bound=upper_bound, method=method, passed=passed,
                               p_value=p_value, details=dict(details or {}), time=when,
                               idempotency_key=idempotency_key)
            links: list[tuple[EdgeKind, str]] = [("certifies", inv_id)]
            links += [("certifies", self._resolve(c, "correction", "correction")) for c in corrections]
            links += [("derived_from", self._resolve(s, "scenario", "scenario")) for s in scenarios]
            return self._node_or_existing(node, self._edges_for(node.id, links, when))  # type: ignore[return-value]

        return self._write(plan)

    def revoke_certificate(self, certificate_id: str, reason: str) -> Certificate:
        def plan() -> tuple[list[ops.Mutation], Certificate]:
            cert = self._get_kind(certificate_id, "certificate")
            assert isinstance(cert, Certificate)
            if cert.revoked:
                return [], cert
            node = self._build(Certificate, **{**cert.model_dump(), "revoked": True, "revoked_reason": reason})
            return [ops.ReplaceNode(node=node)], node

        return self._write(plan)

    def start_cycle(self, cycle: DreamCycle, *, is_running: Callable[[DreamCycle], bool],
                    links: Links = ()) -> tuple[DreamCycle, bool]:
        """Store a new dream cycle unless another one is running: (stored cycle, True) or (running one, False).

        The check and the write happen under the writer lock, so of two processes starting a cycle
        at once exactly one succeeds. `is_running` decides whether an unfinished cycle's owner is
        still alive (the dream loop knows how; the graph does not).
        """
        def plan() -> tuple[list[ops.Mutation], tuple[DreamCycle, bool]]:
            for nid, attrs in self._graph.nodes(data=True):
                if attrs.get("kind") == "cycle" and attrs.get("finished") is None:
                    other = self._get(nid)
                    assert isinstance(other, DreamCycle)
                    if is_running(other):
                        return [], (other, False)
            muts, stored = self._node_or_existing(cycle, self._edges_for(cycle.id, links, cycle.time))
            return muts, (stored, True)  # type: ignore[return-value]

        return self._write(plan)

    def update_cycle(self, cycle_id: str, *, links: Links = (), allow_finished: bool = False,
                     **fields: Any) -> DreamCycle:
        """Change a cycle's lifecycle fields (phase, progress, outcome, measurements) in one durable write.

        A finished cycle is returned unchanged unless `allow_finished`: a cycle another process
        already declared interrupted is not revived by a late write from its owner.
        """
        bad = sorted(set(fields) - DreamCycle.LIFECYCLE_FIELDS)
        if bad:
            raise InvalidInputError(f"update_cycle: {', '.join(bad)} cannot change after a cycle starts (lifecycle "
                                    f"fields: {', '.join(sorted(DreamCycle.LIFECYCLE_FIELDS))}); nothing was stored")

        def plan() -> tuple[list[ops.Mutation], DreamCycle]:
            current = self._get_kind(cycle_id, "cycle")
            assert isinstance(current, DreamCycle)
            if current.finished is not None and not allow_finished:
                return [], current
            node = self._build(DreamCycle, **{**current.model_dump(), **fields})
            edges = [m for m in self._edges_for(cycle_id, links, self._clock())
                     if not self._graph.has_edge(cycle_id, m.edge.target, key=m.edge.kind)]  # type: ignore[union-attr]
            if node == current and not edges:
                return [], current
            return [ops.ReplaceNode(node=node), *edges], node

        return self._write(plan)

    def review_certificate(self, certificate_id: str, decision: str, *, operator: str, reason: str,
                           via: str = "cli", time: datetime | None = None) -> Certificate:
        """Append an operator's decision (approve / reject) to a certificate; earlier ones are kept as they were."""
        when = self._now(time)

        def plan() -> tuple[list[ops.Mutation], Certificate]:
            cert = self._get_kind(certificate_id, "certificate")
            assert isinstance(cert, Certificate)
            review = self._build(CertificateReview, decision=decision, operator=operator, reason=reason, via=via,
                                 time=when)
            node = self._build(Certificate, **{**cert.model_dump(), "reviews": (*cert.reviews, review)})
            return [ops.ReplaceNode(node=node)], node

        return self._write(plan)

    def record_failure(self, node_id: str, *, time: datetime | None = None) -> Node:
        """Count a failure against a memory, correction or scenario (raises its replay weight)."""
        when = self._now(time)

        def plan() -> tuple[list[ops.Mutation], Node]:
            node = self._get(node_id)
            if not isinstance(node, (Memory, Correction, Scenario)):
                raise InvalidInputError(f"{node_id} is a {node.kind}; only memories, corrections and scenarios "
                                        "have a failure history")
            new = type(node).model_validate({**node.model_dump(), "failures": node.failures + 1, "last_failure": when})
            return [ops.ReplaceNode(node=new)], new

        return self._write(plan)

    def add_edge(self, source: str, target: str, kind: EdgeKind, *, note: str | None = None,
                 time: datetime | None = None) -> Edge:
        when = self._now(time)

        def plan() -> tuple[list[ops.Mutation], Edge]:
            edge = self._build(Edge, source=source, target=target, kind=kind, time=when, note=note)
            if self._graph.has_edge(source, target, key=kind):
                existing = edge_from_attrs(source, target, self._graph.edges[source, target, kind])
                if existing.note == note:
                    return [], existing
            return [ops.AddEdge(edge=edge)], edge

        return self._write(plan)

    def add_node(self, node: Node | Mapping[str, Any], links: Links = ()) -> Node:
        """Store a node built elsewhere (imports, `amygdala memory add --json`); a missing id is generated."""
        if not isinstance(node, BaseModel):
            data = dict(node)
            kind = data.get("kind")
            if kind not in NODE_CLASSES:
                raise InvalidInputError(f"node kind must be one of {sorted(NODE_CLASSES)}, got {kind!r}; nothing was stored")
            data.setdefault("id", new_id(kind))
            if kind == "memory" and isinstance(data.get("text"), str) and isinstance(data.get("emotions", {}), Mapping):
                data["emotions"] = merge_scores(data["text"], data.get("emotions"))
            node = self._build(NODE_CLASSES[kind], **data)  # type: ignore[assignment]
        built: Node = node  # type: ignore[assignment]

        def plan() -> tuple[list[ops.Mutation], Node]:
            return self._node_or_existing(built, self._edges_for(built.id, links, built.time))

        return self._write(plan)

    # ------------------------------------------------------------------ reads

    @contextmanager
    def _reading(self) -> Iterator[None]:
        with self._mutex:
            self._check_open()
            self._catch_up(locked=self._lock is not None and self._lock.held)
            yield

    def _get(self, node_id: str) -> Node:
        try:
            attrs = self._graph.nodes[node_id]
        except KeyError:
            raise NodeNotFoundError(node_id) from None
        return node_from_attrs(node_id, attrs)

    def _get_kind(self, node_id: str, kind: NodeKind) -> Node:
        node = self._get(node_id)
        if node.kind != kind:
            raise InvalidInputError(f"{node_id} is a {node.kind}, not a {kind}")
        return node

    def get(self, node_id: str) -> Node:
        with self._reading():
            return self._get(node_id)

    def __contains__(self, node_id: object) -> bool:
        with self._reading():
            return node_id in self._graph

    def __len__(self) -> int:
        with self._reading():
            return self._graph.number_of_nodes()

    def nodes(self, kind: NodeKind | None = None) -> list[Node]:
        """Nodes in write order (optionally of one kind)."""
        with self._reading():
            return [node_from_attrs(n, a) for n, a in self._graph.nodes(data=True) if kind is None or a["kind"] == kind]

    def find_by_key(self, idempotency_key: str) -> Node | None:
        with self._reading():
            nid = self._idx.keys.get(idempotency_key)
            return None if nid is None else self._get(nid)

    def invariant(self, ref: str) -> Invariant:
        """An invariant by id or name."""
        with self._reading():
            node = self._get(self._resolve(ref, "invariant", "invariant"))
            assert isinstance(node, Invariant)
            return node

    def edges(self, node_id: str | None = None, *, kind: EdgeKind | None = None,
              direction: str = "both") -> list[Edge]:
        """Edges, all or those touching `node_id` (direction "out", "in" or "both")."""
        if direction not in ("out", "in", "both"):
            raise InvalidInputError(f"direction must be 'out', 'in' or 'both', not {direction!r}")
        with self._reading():
            if node_id is None:
                triples = list(self._graph.edges(keys=True, data=True))
            else:
                if node_id not in self._graph:
                    raise NodeNotFoundError(node_id)
                triples = []
                if direction in ("out", "both"):
                    triples += list(self._graph.out_edges(node_id, keys=True, data=True))
                if direction in ("in", "both"):
                    triples += list(self._graph.in_edges(node_id, keys=True, data=True))
            return [edge_from_attrs(u, v, d) for u, v, k, d in triples if kind is None or k == kind]

    def to_networkx(self) -> nx.MultiDiGraph:
        """A private copy of the graph (safe to mutate; changes are not stored)."""
        with self._reading():
            return self._graph.copy()

    def stats(self) -> GraphStats:
        with self._reading():
            g = self._graph
            by_kind = Counter(a["kind"] for _, a in g.nodes(data=True))
            statuses = Counter(a["status"] for _, a in g.nodes(data=True) if a["kind"] == "correction")
            edge_kinds = Counter(k for _, _, k in g.edges(keys=True))
            return GraphStats(directory=str(self.directory), nodes=g.number_of_nodes(), edges=g.number_of_edges(),
                              nodes_by_kind=dict(sorted(by_kind.items())), edges_by_kind=dict(sorted(edge_kinds.items())),
                              corrections_by_status=dict(sorted(statuses.items())), seq=self._seq,
                              snapshot_seq=self._snapshot_seq, journal_records=self._seq - self._base_seq,
                              journal_bytes=self._offset)


def open_graph(directory: Path | str, **kwargs: Any) -> MemoryGraph:
    return MemoryGraph(directory, **kwargs)
