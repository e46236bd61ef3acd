"""The store: idempotency, thread safety, fsync before acknowledging, torn tails, corruption,
interrupted compactions and repair (single process; see test_memory_graph_durability for kills)."""

from __future__ import annotations

import hashlib
import threading
import warnings
from pathlib import Path

import pytest

from amygdala.memory_graph import (CorruptGraphError, IdempotencyConflictError, LockTimeoutError, MemoryGraph,
                          MemoryGraphError, TornTailWarning, repair)
from amygdala.memory_graph import store as store_module


def _files(d: Path) -> dict[str, str]:
    """Hashes of the graph's data files (the lock file's holder note legitimately changes)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())
            if p.is_file() and p.name != "writer.lock"}


def _texts(d: Path) -> set[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TornTailWarning)
        with MemoryGraph(d, readonly=True) as g:
            return {n.text for n in g.nodes("memory")}  # type: ignore[union-attr]


def _journal_lines(d: Path) -> list[bytes]:
    return (d / "journal.log").read_bytes().splitlines(keepends=True)


# ---------------------------------------------------------------- acknowledgement and idempotency

def test_a_write_is_fsynced_before_the_call_returns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "g"
    g = MemoryGraph(d)
    synced: list[bytes] = []
    real = store_module.sync_data

    def spy(fd: int) -> None:
        real(fd)
        synced.append((d / "journal.log").read_bytes())

    monkeypatch.setattr(store_module, "sync_data", spy)
    m = g.add_memory("remember this")
    assert len(synced) == 1 and m.id.encode() in synced[0] and synced[0].endswith(b"\n")
    g.submit_correction("c", "p", "r", idempotency_key="k")
    g.submit_correction("c", "p", "r", idempotency_key="k")  # retry: nothing new to sync
    assert len(synced) == 2
    g.close()


def test_a_retried_submit_correction_is_stored_once(tmp_path: Path) -> None:
    d = tmp_path / "g"
    with MemoryGraph(d) as g:
        g.add_invariant("honest", "No invented facts.", {"kind": "regex"}, threshold=0.9)
        first = g.submit_correction("ctx", "good", "bad", invariant="honest", note="n", idempotency_key="req-1")
        seq = g.seq
        again = g.submit_correction("ctx", "good", "bad", invariant="honest", note="n", idempotency_key="req-1")
        assert again == first and g.seq == seq
        with pytest.raises(IdempotencyConflictError, match="differs in: preferred"):
            g.submit_correction("ctx", "better", "bad", invariant="honest", note="n", idempotency_key="req-1")
        with pytest.raises(IdempotencyConflictError, match="invariant_id"):
            g.submit_correction("ctx", "good", "bad", note="n", idempotency_key="req-1")
        g.set_correction_status(first.id, "queued")
        # Lifecycle changes since the first call do not turn a retry into a conflict.
        assert g.submit_correction("ctx", "good", "bad", invariant="honest", note="n", idempotency_key="req-1").id == first.id
    # A different process (here: a fresh instance) retrying after a restart also gets the stored one.
    with MemoryGraph(d) as g2:
        assert g2.submit_correction("ctx", "good", "bad", invariant="honest", note="n", idempotency_key="req-1").id == first.id
        assert len(g2.nodes("correction")) == 1
        assert g2.find_by_key("req-1") is not None and g2.find_by_key("nope") is None


def test_idempotency_sees_writes_from_another_instance_immediately(tmp_path: Path) -> None:
    d = tmp_path / "g"
    a, b = MemoryGraph(d), MemoryGraph(d)
    first = a.submit_correction("c", "p", "r", idempotency_key="k")
    assert b.submit_correction("c", "p", "r", idempotency_key="k").id == first.id
    b.add_memory("from b")
    assert {n.kind for n in a.nodes()} == {"correction", "memory"}  # reads catch up too
    a.close()
    b.close()


def test_many_threads_share_one_store(tmp_path: Path) -> None:
    d = tmp_path / "g"
    g = MemoryGraph(d, snapshot_every=37)
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker(t: int) -> None:
        try:
            barrier.wait()
            for i in range(40):
                g.submit_correction(f"ctx {t} {i}", "p", "r", idempotency_key=f"t{t}-{i}")
                # Every thread also retries a shared key: exactly one correction may come of it.
                g.submit_correction("shared", "p", "r", idempotency_key=f"shared-{i}")
                if i % 10 == 0:
                    g.nodes()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(g.nodes("correction")) == 8 * 40 + 40
    g.close()
    with MemoryGraph(d, readonly=True) as r:
        keys = [n.idempotency_key for n in r.nodes()]
        assert len(keys) == len(set(keys)) == 8 * 40 + 40


def test_lock_timeout_names_the_holder(tmp_path: Path) -> None:
    import os

    d = tmp_path / "g"
    holder = MemoryGraph(d)
    other = MemoryGraph(d, lock_timeout=0.2)
    with holder.batch():
        holder.add_memory("inside a batch")
        with pytest.raises(LockTimeoutError, match=f"pid {os.getpid()}"):
            other.add_memory("blocked")
    other.add_memory("after the batch")
    assert _texts(d) == {"inside a batch", "after the batch"}
    holder.close()
    other.close()


def test_readonly_store_refuses_writes_and_missing_graph_is_explained(tmp_path: Path) -> None:
    with pytest.raises(MemoryGraphError, match="no memory graph at"):
        MemoryGraph(tmp_path / "missing", readonly=True)
    assert not (tmp_path / "missing").exists()
    MemoryGraph(tmp_path / "g").close()
    with MemoryGraph(tmp_path / "g", readonly=True) as r:
        with pytest.raises(MemoryGraphError, match="read-only"):
            r.add_memory("x")


def test_reader_catches_up_across_compactions(tmp_path: Path) -> None:
    d = tmp_path / "g"
    w = MemoryGraph(d, snapshot_every=4)
    r = MemoryGraph(d, readonly=True)
    for i in range(30):
        w.add_memory(f"m{i}")
        assert len(r) == i + 1
    assert r.stats().snapshot_seq > 0
    w.close()
    r.close()


# ---------------------------------------------------------------- torn tails

def _graph_with(d: Path, n: int) -> None:
    with MemoryGraph(d, snapshot_every=None) as g:
        for i in range(n):
            g.add_memory(f"m{i}")


def test_torn_last_line_is_dropped_with_a_warning_at_every_cut(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _graph_with(src, 4)
    data = (src / "journal.log").read_bytes()
    last_start = data.rstrip(b"\n").rfind(b"\n") + 1
    d = tmp_path / "cut"
    d.mkdir()
    for cut in range(last_start + 1, len(data)):  # every proper prefix of the last line, newline excluded
        (d / "journal.log").write_bytes(data[:cut])
        with pytest.warns(TornTailWarning, match="never acknowledged"):
            with MemoryGraph(d, readonly=True) as r:
                assert {n.text for n in r.nodes()} == {"m0", "m1", "m2"}  # type: ignore[union-attr]
        assert (d / "journal.log").read_bytes() == data[:cut]  # a reader changes nothing
        if cut % 5:
            continue  # the writer side (fsyncs) on every fifth cut keeps the test fast
        with pytest.warns(TornTailWarning):
            w = MemoryGraph(d)
        assert (d / "journal.log").read_bytes() == data[:last_start]  # the writer cut the tail off
        w.add_memory("after")
        w.close()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert _texts(d) == {"m0", "m1", "m2", "after"}


def test_garbage_after_the_last_line_is_a_torn_tail(tmp_path: Path) -> None:
    d = tmp_path / "g"
    _graph_with(d, 2)
    with open(d / "journal.log", "ab") as fh:
        fh.write(b"\x00\x00\x00\x00")  # what a crash can leave after extending the file
    with pytest.warns(TornTailWarning):
        assert _texts_strict(d) == {"m0", "m1"}


def _texts_strict(d: Path) -> set[str]:
    with MemoryGraph(d, readonly=True) as g:
        return {n.text for n in g.nodes("memory")}  # type: ignore[union-attr]


def test_a_complete_but_damaged_last_line_is_also_torn(tmp_path: Path) -> None:
    d = tmp_path / "g"
    _graph_with(d, 3)
    lines = _journal_lines(d)
    lines[-1] = lines[-1][:30] + b"\x00" * 10 + lines[-1][40:]  # zeroed page inside the last line
    (d / "journal.log").write_bytes(b"".join(lines))
    with pytest.warns(TornTailWarning, match="checksum"):
        assert _texts_strict(d) == {"m0", "m1"}


def test_writer_started_in_another_instance_fixes_a_torn_tail_before_appending(tmp_path: Path) -> None:
    d = tmp_path / "g"
    w = MemoryGraph(d, snapshot_every=None)
    w.add_memory("m0")
    with open(d / "journal.log", "ab") as fh:  # another process died mid-write
        fh.write(b'0badc0de {"seq": 2, "time"')
    with pytest.warns(TornTailWarning):
        w.add_memory("m1")  # catch-up under the lock truncates, then appends
    w.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _texts_strict(d) == {"m0", "m1"}


# ---------------------------------------------------------------- corruption

def test_corruption_in_the_middle_refuses_to_load_and_changes_nothing(tmp_path: Path) -> None:
    d = tmp_path / "g"
    _graph_with(d, 5)
    lines = _journal_lines(d)
    lines[2] = lines[2].replace(b"m1", b"mX")  # record seq 2 (line 3): checksum no longer matches
    (d / "journal.log").write_bytes(b"".join(lines))
    before = _files(d)
    for readonly in (True, False):
        with pytest.raises(CorruptGraphError) as exc:
            MemoryGraph(d, readonly=readonly)
        msg = str(exc.value)
        assert "journal line 3" in msg and "checksum mismatch" in msg
        assert f"amygdala memory repair --dir {d}" in msg
    assert _files(d) == before

    report = repair(d)
    assert not report.healthy and report.backup is not None
    assert (report.backup / "journal.log").read_bytes() == b"".join(lines)
    assert len(report.lost) == 1 and "journal line 3" in report.lost[0]
    assert "m0" in _texts_strict(d) and _texts_strict(d) == {"m0", "m2", "m3", "m4"}
    assert repair(d).healthy


def test_missing_records_are_detected_by_sequence_number(tmp_path: Path) -> None:
    d = tmp_path / "g"
    _graph_with(d, 4)
    lines = _journal_lines(d)
    (d / "journal.log").write_bytes(b"".join(lines[:2] + lines[3:]))  # drop seq 2 entirely
    with pytest.raises(CorruptGraphError, match="expected 2"):
        MemoryGraph(d, readonly=True)
    report = repair(d)
    assert any("seq 2..2 are missing" in item for item in report.lost)
    assert _texts_strict(d) == {"m0", "m2", "m3"}


def test_damaged_snapshot_refuses_and_repair_rebuilds_from_the_previous_generation(tmp_path: Path) -> None:
    d = tmp_path / "g"
    with MemoryGraph(d, snapshot_every=None) as g:
        for i in range(3):
            g.add_memory(f"a{i}")
        g.snapshot()
        for i in range(3):
            g.add_memory(f"b{i}")
        g.snapshot()  # snapshot.prev.json + journal.prev.log now hold the first generation
        for i in range(2):
            g.add_memory(f"c{i}")
    raw = bytearray((d / "snapshot.json").read_bytes())
    raw[-20] ^= 0x01
    (d / "snapshot.json").write_bytes(bytes(raw))
    with pytest.raises(CorruptGraphError, match="snapshot checksum mismatch"):
        MemoryGraph(d, readonly=True)
    dry = repair(d, dry_run=True)
    assert dry.backup is None and dry.nodes == 8 and (d / "snapshot.json").read_bytes() == bytes(raw)
    report = repair(d)
    assert report.base == "the previous snapshot" and report.lost == []
    assert _texts_strict(d) == {"a0", "a1", "a2", "b0", "b1", "b2", "c0", "c1"}
    with MemoryGraph(d) as g:  # and it keeps working: the sequence continues
        assert g.seq == 8
        g.add_memory("d0")


def test_damaged_snapshot_without_a_previous_one_is_rebuilt_from_the_old_journal(tmp_path: Path) -> None:
    d = tmp_path / "g"
    with MemoryGraph(d, snapshot_every=None) as g:
        g.add_memory("a0")
        g.add_memory("a1")
        g.snapshot()
        g.add_memory("b0")
    (d / "snapshot.json").write_bytes(b"not a snapshot\n")
    with pytest.raises(CorruptGraphError, match="snapshot header"):
        MemoryGraph(d)
    report = repair(d)
    assert report.lost == [] and _texts_strict(d) == {"a0", "a1", "b0"}


def test_journal_missing_next_to_a_snapshot_is_corruption_not_an_empty_graph(tmp_path: Path) -> None:
    d = tmp_path / "g"
    with MemoryGraph(d) as g:
        g.add_memory("kept")
        g.snapshot()
    (d / "journal.log").unlink()
    for readonly in (True, False):
        with pytest.raises(CorruptGraphError, match="journal.log is missing"):
            MemoryGraph(d, readonly=readonly)
    repair(d)
    assert _texts_strict(d) == {"kept"}


# ---------------------------------------------------------------- compaction

def test_automatic_compaction_keeps_everything(tmp_path: Path) -> None:
    d = tmp_path / "g"
    with MemoryGraph(d, snapshot_every=3) as g:
        for i in range(10):
            g.add_memory(f"m{i}")
        s = g.stats()
        assert s.snapshot_seq == 9 and s.journal_records == 1 and s.seq == 10
    assert _texts_strict(d) == {f"m{i}" for i in range(10)}


def test_crash_after_the_new_snapshot_but_before_the_new_journal(tmp_path: Path) -> None:
    d = tmp_path / "g"
    _graph_with(d, 4)
    old_journal = (d / "journal.log").read_bytes()
    with MemoryGraph(d) as g:
        g.snapshot()
    (d / "journal.log").write_bytes(old_journal)  # the journal swap never happened
    assert _texts_strict(d) == {"m0", "m1", "m2", "m3"}  # records already in the snapshot are skipped
    with MemoryGraph(d) as g:  # a writer finishes the compaction
        assert g.stats().journal_records == 0
        g.add_memory("m4")
    assert _texts_strict(d) == {f"m{i}" for i in range(5)}


def test_crash_while_writing_the_snapshot_leaves_a_temp_file_that_is_ignored(tmp_path: Path) -> None:
    d = tmp_path / "g"
    _graph_with(d, 2)
    stale = d / "snapshot.json.tmp-99999-deadbeef"
    stale.write_bytes(b'{"format": "amygdala.memory_graph.snapshot", "ver')
    assert _texts_strict(d) == {"m0", "m1"}
    with MemoryGraph(d) as g:
        g.snapshot()
    assert not stale.exists()


def test_records_a_journal_holds_twice_are_refused(tmp_path: Path) -> None:
    d = tmp_path / "g"
    _graph_with(d, 2)
    lines = _journal_lines(d)
    (d / "journal.log").write_bytes(b"".join(lines + [lines[1]]))  # seq 1 appended again
    with pytest.raises(CorruptGraphError, match="expected 3"):
        MemoryGraph(d, readonly=True)


def test_deleted_snapshot_is_reported_not_loaded_as_a_shorter_graph(tmp_path: Path) -> None:
    d = tmp_path / "g"
    with MemoryGraph(d, snapshot_every=None) as g:
        g.add_memory("a0")
        g.snapshot()
        g.add_memory("b0")
    (d / "snapshot.json").unlink()
    for readonly in (True, False):
        with pytest.raises(CorruptGraphError, match="continues from seq 1 but snapshot.json only reaches seq 0"):
            MemoryGraph(d, readonly=readonly)
    report = repair(d)
    assert report.lost == [] and _texts_strict(d) == {"a0", "b0"}
