"""`amygdala memory repair`: get a damaged graph loading again while keeping every intact write.

Loading refuses damaged files; this is the explicit, reviewed path past that refusal. It

1. tries a normal load first (a torn last line is fixed by any writer; nothing else to do),
2. copies every graph file into ``repair-backup-<time>/`` before touching anything,
3. rebuilds from the newest readable base (the snapshot, else the previous generation's snapshot
   plus its journal), then replays every journal record whose line is intact and which still
   applies, in sequence order,
4. writes a fresh snapshot and an empty journal, and lists each line or record it could not keep.
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import networkx as nx
from pydantic import ValidationError

from . import ops
from .errors import CorruptGraphError, MemoryGraphError
from amygdala.fsio import atomic_write, fsync_dir, fsync_file
from .journal import JournalHeader, JournalRecord, encode_line, scan
from .lock import WriterLock
from .snapshot import SnapshotError, read_snapshot, write_snapshot
from .store import (DEFAULT_LOCK_TIMEOUT, JOURNAL_NAME, PREV_JOURNAL_NAME, PREV_SNAPSHOT_NAME, SNAPSHOT_NAME,
                    LOCK_NAME, MemoryGraph)


@dataclass
class RepairReport:
    directory: Path
    healthy: bool
    dry_run: bool
    base: str = ""
    backup: Path | None = None
    seq: int = 0
    nodes: int = 0
    edges: int = 0
    replayed: int = 0
    problems: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.healthy:
            extra = f" ({'; '.join(self.problems)})" if self.problems else ""
            return f"memory graph at {self.directory} loads cleanly{extra}; nothing to repair"
        verb = "would rebuild" if self.dry_run else "rebuilt"
        lines = [f"memory graph at {self.directory}: {verb} from {self.base}, replaying {self.replayed} journal "
                 f"record(s): {self.nodes} nodes, {self.edges} edges, seq {self.seq}"]
        if self.backup is not None:
            lines.append(f"original files backed up to {self.backup}")
        lines += [f"problem: {p}" for p in self.problems]
        lines += [f"not kept: {item}" for item in self.lost]
        if not self.lost:
            lines.append("no acknowledged write was lost")
        return "\n".join(lines)


def _records(path: Path, label: str, report: RepairReport) -> tuple[int | None, list[JournalRecord]]:
    """(journal base seq or None, intact records) from one journal file; bad lines go to `report`."""
    if not path.exists():
        return None, []
    result = scan(path.read_bytes())
    for bad in result.bad:
        if bad.line_no == result.lines:  # a crash mid-write: never acknowledged
            report.problems.append(f"{label}: dropped torn last line ({bad.describe()})")
        else:
            report.lost.append(f"{label}: {bad.describe()}")
    base = result.header.base_seq if result.header is not None else None
    if result.header is None:
        report.problems.append(f"{label}: header line unreadable")
    return base, [r.record for r in result.records]


def repair(directory: Path | str, *, dry_run: bool = False, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> RepairReport:
    directory = Path(directory).expanduser()
    jpath, spath = directory / JOURNAL_NAME, directory / SNAPSHOT_NAME
    if not jpath.exists() and not spath.exists():
        raise MemoryGraphError(f"no memory graph at {directory} (neither {JOURNAL_NAME} nor {SNAPSHOT_NAME}); nothing to repair")

    report = RepairReport(directory=directory, healthy=False, dry_run=dry_run)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            graph = MemoryGraph(directory, readonly=dry_run)
            graph.close()
        report.healthy = True
        report.problems = [str(w.message) for w in caught]
        return report
    except CorruptGraphError as exc:
        report.problems.append(exc.detail)

    lock = WriterLock(directory / LOCK_NAME, lock_timeout)
    with lock:
        base_graph, base_seq, report.base = _base(directory, report)
        # Both journals: records the base already holds are skipped by seq, and the previous
        # one is needed whenever the base is older than the current journal.
        prev_base, prev_records = _records(directory / PREV_JOURNAL_NAME, PREV_JOURNAL_NAME, report)
        cur_base, cur_records = _records(jpath, JOURNAL_NAME, report)

        by_seq: dict[int, JournalRecord] = {}
        for rec in [*prev_records, *cur_records]:
            by_seq.setdefault(rec.seq, rec)
        graph = base_graph
        idx = ops.Indexes.build(graph)
        seq = base_seq
        unreadable = len(report.lost)  # so far only unreadable lines are listed
        gaps: list[tuple[int, int]] = []
        for s in sorted(k for k in by_seq if k > base_seq):
            if s != seq + 1:
                gaps.append((seq + 1, s - 1))
            rec = by_seq[s]
            try:
                ops.check(graph, rec.mutations, idx)
            except (ops.MutationError, ValidationError) as exc:
                report.lost.append(f"record seq {s} no longer applies ({exc})")
                seq = s
                continue
            ops.apply(graph, rec.mutations, idx)
            report.replayed += 1
            seq = s
        # A missing seq is usually one of the unreadable lines already listed; only list gaps
        # as losses of their own when there are more missing records than unreadable lines.
        missing = sum(b - a + 1 for a, b in gaps)
        for a, b in gaps:
            note = f"journal records seq {a}..{b} are missing"
            if missing <= unreadable:
                report.problems.append(note + " (the unreadable line(s) listed)")
            else:
                report.lost.append(note)
        newest_known = max([seq, base_seq, *(b for b in (cur_base, prev_base) if b is not None)])
        if newest_known > seq:
            report.lost.append(f"writes up to seq {newest_known} were compacted into a snapshot that could not be read")
            seq = newest_known
        report.seq, report.nodes, report.edges = seq, graph.number_of_nodes(), graph.number_of_edges()
        if dry_run:
            return report

        report.backup = _backup(directory)
        write_snapshot(spath, graph, seq)
        atomic_write(jpath, encode_line(JournalHeader(base_seq=seq)))
        # The old generation no longer pairs with the new snapshot; its copy is in the backup.
        for name in (PREV_SNAPSHOT_NAME, PREV_JOURNAL_NAME):
            (directory / name).unlink(missing_ok=True)
        fsync_dir(directory)
    return report


def _base(directory: Path, report: RepairReport) -> tuple[nx.MultiDiGraph, int, str]:
    spath, prev = directory / SNAPSHOT_NAME, directory / PREV_SNAPSHOT_NAME
    for path, what in ((spath, "the snapshot"), (prev, "the previous snapshot")):
        if not path.exists():
            continue
        try:
            snap = read_snapshot(path)
            return snap.graph, snap.header.seq, what
        except (SnapshotError, OSError) as exc:
            report.problems.append(f"{path.name}: {exc}")
    if spath.exists() or prev.exists():
        report.problems.append("no readable snapshot; rebuilding from journal records alone")
        return nx.MultiDiGraph(), 0, "the journal alone (no readable snapshot)"
    return nx.MultiDiGraph(), 0, "the journal"


def _backup(directory: Path) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    target = directory / f"repair-backup-{stamp}"
    target.mkdir()
    for name in (JOURNAL_NAME, SNAPSHOT_NAME, PREV_JOURNAL_NAME, PREV_SNAPSHOT_NAME):
        src = directory / name
        if src.exists():
            shutil.copy2(src, target / name)
            fsync_file(target / name)
    fsync_dir(target)
    fsync_dir(directory)
    return target
