"""Crash safety of the undo-mode sync (the default): old bytes durable first, then the new bytes in place.

A sync killed before its applied record leaves, after recovery, the file byte-identical to before
the sync (no undo entry, no sync point); from the applied record on, wholly after it (its undo entry
landed, and `rollback` to point 0 gives the old bytes back exactly). The worker and weight sets are
the redo-mode crash tests' (tests/test_checkpoint_sync_crash.py), run with MODE "undo" or "undo0"
(keep_undo=0: the old bytes are journaled for crash safety only, then deleted).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time

import numpy as np
import pytest
from amygdala.engine.checkpoint_journal import (
    MAGIC,
    UNDO_NAME,
    journal_path,
    read_journal,
    redo_path,
    replay_before_load,
)
from amygdala.training.checkpoint.sync import (
    CheckpointSyncer,
    JournalError,
    recover,
    sync_checkpoint,
)
from amygdala.training.checkpoint.undo import rollback, sync_log, undo_dir
from safetensors.numpy import load_file

from tests.test_checkpoint_sync_crash import ST, run_worker, state_of, weights  # noqa: F401 (fixture)


def events_of(w: dict, mode: str) -> list[str]:
    out, err = run_worker(w, "event", "0", mode).communicate(timeout=60)
    assert "Traceback" not in err, err
    reset(w)
    return json.loads(out)


def reset(w: dict) -> None:
    shutil.copyfile(w["A"], w["dir"] / ST)
    shutil.rmtree(undo_dir(w["dir"]), ignore_errors=True)


def kill_at(w: dict, n: int, mode: str) -> None:
    proc = run_worker(w, "event", str(n), mode)
    proc.communicate(timeout=60)
    assert proc.returncode == -9, f"worker was not killed at event {n} (exit {proc.returncode})"


def leftovers(w: dict) -> list[str]:
    """Journal-side files that must not outlive a recovery."""
    d = w["dir"]
    return [p.name for p in (journal_path(d), redo_path(d), d / UNDO_NAME) if p.exists()]


@pytest.mark.parametrize("mode", ["undo", "undo0"])
def test_kills_at_each_undo_mode_event_leave_before_or_after(weights, mode):  # noqa: F811
    w = weights
    events = events_of(w, mode)
    assert "journal-record" not in events and events[-1] == "done"
    commit = events.index("journal-committed") + 1  # 1-based: the undo data is durable from here
    applied = events.index("journal-applied") + 1  # the in-place writes are durable from here
    writes = [i + 1 for i, e in enumerate(events) if e == "block-written"]
    assert events.count("journal-undo") > 50 and len(writes) > 50 and commit < writes[0] < writes[-1] < applied
    a_bytes = w["A"].read_bytes()
    rng = random.Random(11)
    # Each new event: after the undo data is durable (commit), the first, a middle and the last
    # in-place write, after the files' fdatasync, the applied record, and the finish.
    picks = {1, commit - 1, commit, commit + 1, writes[0], writes[len(writes) // 2], writes[-1],
             events.index("files-synced") + 1, applied, applied + 1, len(events)}
    while len(picks) < 24:
        picks.add(rng.randint(commit, len(events)))
    for n in sorted(picks):
        kill_at(w, n, mode)
        if commit <= n < applied:
            on_disk = (w["dir"] / ST).read_bytes()
            if n > writes[len(writes) // 2]:
                assert on_disk != a_bytes, "the kill should have left new bytes in the file"
        status = recover(w["dir"]).status
        got = state_of(w)
        assert not leftovers(w), f"killed at event {n} ({events[n - 1]}): {leftovers(w)} left"
        log = sync_log(w["dir"])
        if n < applied:
            assert (w["dir"] / ST).read_bytes() == a_bytes, f"killed at event {n} ({events[n - 1]}): file is {got}"
            assert status == ("discarded" if n < commit else "restored"), (n, events[n - 1], status)
            assert log.head == 0 and not log.points  # the sync did not happen: no sync point, no entry
            assert not list(undo_dir(w["dir"]).glob("*.data"))
        else:
            assert got == "B", f"killed at event {n} ({events[n - 1]}): file is {got}"
            assert status == ("clean" if n == len(events) else "replayed"), (n, events[n - 1], status)
            if mode == "undo":
                assert log.head == 1 and [p.sync_id for p in log.points] == [1]
                rollback(w["dir"], 0)
                assert (w["dir"] / ST).read_bytes() == a_bytes  # the undo log restores exactly
            else:
                assert not undo_dir(w["dir"]).exists()
        reset(w)


def test_random_kills_of_undo_mode_syncs_leave_old_or_new(weights):  # noqa: F811
    w = weights
    rng = random.Random(5)
    seen = {"A": 0, "B": 0}
    for _ in range(24):
        proc = run_worker(w, "loop", "undo")
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.5))
        proc.kill()
        proc.communicate(timeout=60)
        recover(w["dir"])
        seen[state_of(w)] += 1
        assert not leftovers(w)
        log = sync_log(w["dir"])
        assert not log.points or log.points[-1].sync_id == log.head  # a restored sync left no entry behind
        if log.points:  # the undo log still walks back as far as it reaches, to one of the two states
            rollback(w["dir"], log.reachable[-1])
            assert state_of(w) == ("A" if log.reachable[-1] == 0 else state_of(w))
            assert not sync_log(w["dir"]).points
    assert seen["A"] and seen["B"], f"random kills never caught the file in both states: {seen}"


def test_undo_journal_damage_and_partial_applied_record(weights):  # noqa: F811
    w = weights
    events = events_of(w, "undo")
    synced = events.index("files-synced") + 1
    kill_at(w, synced, "undo")  # every new byte written and fdatasynced, not yet marked applied
    jpath = journal_path(w["dir"])
    journal = jpath.read_bytes()
    parsed = read_journal(jpath)
    assert parsed.meta.mode == "undo" and not parsed.applied and not parsed.records and parsed.undo
    data = w["dir"] / parsed.meta.undo_data
    old = data.read_bytes()
    new_state = (w["dir"] / ST).read_bytes()
    assert state_of(w) == "B"  # the bytes are all there, but nothing says so durably

    # A torn applied record (killed while appending it): restored, as without one.
    jpath.write_bytes(journal + b"D" + MAGIC[:3])
    assert recover(w["dir"]).status == "restored" and (w["dir"] / ST).read_bytes() == w["A"].read_bytes()
    assert not data.exists() and not jpath.exists()

    # A complete applied record: rolled forward (the undo entry and state land), never restored.
    (w["dir"] / ST).write_bytes(new_state)
    jpath.write_bytes(journal + b"D" + MAGIC)
    data.write_bytes(old)
    assert recover(w["dir"]).status == "replayed" and state_of(w) == "B"
    assert sync_log(w["dir"]).head == 1
    rollback(w["dir"], 0)
    assert (w["dir"] / ST).read_bytes() == w["A"].read_bytes()

    # Committed and unapplied, but its old bytes damaged (bit rot, not a crash): refused, nothing written.
    reset(w)
    (w["dir"] / ST).write_bytes(new_state)
    jpath.write_bytes(journal)
    data.parent.mkdir(exist_ok=True)
    bad = bytearray(old)
    bad[len(old) // 3] ^= 0x40
    data.write_bytes(bytes(bad))
    with pytest.raises(JournalError, match="corrupt"):
        recover(w["dir"])
    assert (w["dir"] / ST).read_bytes() == new_state and jpath.exists()
    data.unlink()
    with pytest.raises(JournalError, match="missing"):
        recover(w["dir"])
    assert (w["dir"] / ST).read_bytes() == new_state and jpath.exists()

    # Unknown bytes after the commit record (damage, not a torn append): refused, never discarded as torn.
    data.write_bytes(old)
    jpath.write_bytes(journal + b"garbage!!")
    with pytest.raises(JournalError, match="after its commit record"):
        recover(w["dir"])
    assert (w["dir"] / ST).read_bytes() == new_state and jpath.exists()


def test_loader_restores_a_half_written_undo_mode_sync(weights):  # noqa: F811
    w = weights
    events = events_of(w, "undo")
    writes = [i + 1 for i, e in enumerate(events) if e == "block-written"]
    kill_at(w, writes[len(writes) // 2], "undo")
    on_disk = load_file(w["dir"] / ST)
    assert any(not np.array_equal(on_disk[k], w["a"][k]) for k in w["a"])  # half-written
    report = replay_before_load(w["dir"])
    assert report.status == "restored" and report.blocks_written > 0
    assert (w["dir"] / ST).read_bytes() == w["A"].read_bytes() and not leftovers(w)


def test_weights_moving_during_the_in_place_writes_restore_the_file_then_retry(weights):  # noqa: F811
    w = weights
    path = w["dir"] / ST
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    before, mtime = path.read_bytes(), path.stat().st_mtime_ns
    b = load_file(w["B"])
    wrote = []
    readings = iter([4, 6, 6, 6])  # a step lands while the first attempt copies the weights in place

    def on_event(event: str) -> None:
        wrote.append(event)

    with pytest.raises(Exception, match="training step"):
        sync_checkpoint(w["dir"], b, weights_version=lambda: next(readings), on_event=on_event)
    assert "block-written" in wrote and "journal-applied" not in wrote  # it did write in place, then undid it
    assert path.read_bytes() == before and path.stat().st_mtime_ns == mtime  # same bytes, same fingerprint
    assert not leftovers(w) and not sync_log(w["dir"]).points and not list(undo_dir(w["dir"]).glob("*.data"))

    readings = iter([4, 6, 6, 6])
    syncer = CheckpointSyncer(w["dir"], b, weights_version=lambda: next(readings), retry_wait_s=0.0)
    report = syncer.sync()  # the restore kept the fingerprint, so the retry is not refused as an outside change
    assert report.blocks_written > 0 and state_of(w) == "B" and sync_log(w["dir"]).head == 1
