"""Crash safety: a sync killed at any moment leaves the checkpoint wholly old or wholly new.

A subprocess (tests/sync_crash_worker.py, numpy only so restarts are cheap) syncs a ~4 MB file
with unaligned tensors between two weight sets and is SIGKILLed, either at a chosen sync event
(deterministic: before the journal commit the file must come back old, from the commit on new) or
at a random moment while it flips the file back and forth. After each kill, recovery runs as the
next start would, and the file must load and equal one of the two weight sets exactly.
These run the sync in redo mode (the worker's default), the journal format older versions wrote
and rollback uses; the default undo mode's kills are in test_checkpoint_sync_undo_mode.py.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from amygdala.engine.checkpoint_journal import journal_path, redo_path
from amygdala.training.checkpoint.sync import JournalError, recover
from safetensors.numpy import load_file, save_file

WORKER = Path(__file__).with_name("sync_crash_worker.py")
ST = "model.safetensors"


@pytest.fixture
def weights(tmp_path) -> dict:
    """Two weight sets A and B (B differs in ~300 blocks spread over every tensor), and a model dir holding A."""
    rng = np.random.default_rng(0)
    shapes = {"a.weight": (700, 513), "b.bias": (3,), "c.weight": (257, 1001), "d.norm": (1,),
              "e.weight": (1024, 400), "f.odd": (7, 3)}  # odd sizes: tensors start off block and word boundaries
    a = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    b = {k: v.copy() for k, v in a.items()}
    for v in b.values():
        flat = v.reshape(-1)
        flat[rng.choice(flat.size, max(1, flat.size // 3000), replace=False)] += 1
    save_file(a, tmp_path / "A.safetensors")
    save_file(b, tmp_path / "B.safetensors")
    model = tmp_path / "model"
    model.mkdir()
    shutil.copyfile(tmp_path / "A.safetensors", model / ST)
    return {"dir": model, "A": tmp_path / "A.safetensors", "B": tmp_path / "B.safetensors", "a": a, "b": b,
            "header": (tmp_path / "A.safetensors").read_bytes()[:4096]}


def run_worker(w: dict, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), str(w["dir"]), str(w["A"]), str(w["B"]), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def state_of(w: dict) -> str:
    """'A' or 'B' if the file loads and equals that weight set exactly; fails on anything else."""
    path = w["dir"] / ST
    assert path.stat().st_size == w["A"].stat().st_size
    (n,) = np.frombuffer(path.read_bytes()[:8], "<u8")
    assert path.read_bytes()[:8 + int(n)] == w["A"].read_bytes()[:8 + int(n)]  # header never rewritten
    got = load_file(path)
    for name, want in (("A", w["a"]), ("B", w["b"])):
        if got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want):
            return name
    mixed = {k: ("A" if np.array_equal(got[k], w["a"][k]) else "B" if np.array_equal(got[k], w["b"][k]) else "?")
             for k in got}
    raise AssertionError(f"checkpoint is a mix of old and new weights after a crash: {mixed}")


def sync_events(w: dict) -> list[str]:
    """The event sequence of a full A -> B sync (and leave the file at A again)."""
    out, err = run_worker(w, "event", "0").communicate(timeout=60)
    assert err == "" or "Traceback" not in err, err
    shutil.copyfile(w["A"], w["dir"] / ST)
    return json.loads(out)


def kill_at_event(w: dict, n: int) -> None:
    proc = run_worker(w, "event", str(n))
    proc.communicate(timeout=60)
    assert proc.returncode == -9, f"worker was not killed at event {n} (exit {proc.returncode})"


def test_kills_at_random_points_leave_old_or_new(weights):
    w = weights
    events = sync_events(w)
    commit = events.index("journal-committed") + 1  # 1-based event numbers
    assert events.count("journal-record") > 50 and events[-1] == "done"
    rng = random.Random(7)
    # Deterministic part: kill at chosen events, including each phase's first and last.
    picks = {1, commit - 1, commit, commit + 1, len(events) - 2, len(events) - 1, len(events)}
    while len(picks) < 20:
        picks.add(rng.randint(1, len(events)))
    for n in sorted(picks):
        kill_at_event(w, n)
        status = recover(w["dir"]).status
        got = state_of(w)
        assert got == ("A" if n < commit else "B"), f"killed at event {n} ({events[n - 1]}): file is {got}"
        assert status == ("discarded" if n < commit else "clean" if n == len(events) else "replayed")
        assert not journal_path(w["dir"]).exists()
        if got == "B":
            shutil.copyfile(w["A"], w["dir"] / ST)

    # Random part: kill at a random moment while the worker flips the file A -> B -> A ...
    seen = {"A": 0, "B": 0}
    for _ in range(30):
        proc = run_worker(w, "loop")
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.5))  # a B-and-back cycle takes 0.1-0.3 s on a loaded 2-core machine
        proc.kill()
        proc.communicate(timeout=60)
        recover(w["dir"])  # what the next start does
        seen[state_of(w)] += 1
        assert not journal_path(w["dir"]).exists()
    assert len(picks) + 30 >= 50  # the issue asks for at least 50 kills
    assert seen["A"] and seen["B"], f"random kills never caught the file in both states: {seen}"


def test_journal_replay_torn_journal_and_foreign_file(weights):
    w = weights
    events = sync_events(w)
    commit = events.index("journal-committed") + 1
    kill_at_event(w, commit)  # journal committed, no model byte written yet
    jpath = journal_path(w["dir"])
    journal = jpath.read_bytes()
    redo = redo_path(w["dir"]).read_bytes()  # the new bytes; the journal holds their headers and crcs
    assert state_of(w) == "A"

    # Torn journals (crash while writing the journal itself): discarded, file wholly old.
    rng = random.Random(3)
    cuts = {0, 7, 12, len(journal) - 1, len(journal) - 20} | set(rng.sample(range(len(journal)), 10))
    for cut in sorted(cuts):
        jpath.write_bytes(journal[:cut])
        assert recover(w["dir"]).status == "discarded"
        assert state_of(w) == "A" and not jpath.exists()
    flipped = bytearray(journal)
    flipped[len(journal) // 2] ^= 0xFF  # a bad checksum inside some record
    jpath.write_bytes(bytes(flipped))
    assert recover(w["dir"]).status == "discarded" and state_of(w) == "A"

    # A committed journal for a file that was since replaced: refused, nothing touched.
    jpath.write_bytes(journal)
    redo_path(w["dir"]).write_bytes(redo)  # a torn journal's recovery dropped it with the journal
    other = {k: v + 1 for k, v in w["a"].items()}
    save_file(other, w["dir"] / ST, metadata={"replaced": "yes"})
    before = (w["dir"] / ST).read_bytes()
    with pytest.raises(JournalError, match="different"):
        recover(w["dir"])
    assert (w["dir"] / ST).read_bytes() == before and jpath.exists()

    # The intact journal over the right file: replayed, wholly new; replaying twice is harmless.
    shutil.copyfile(w["A"], w["dir"] / ST)
    report = recover(w["dir"])
    assert report.status == "replayed" and report.blocks_written > 0
    assert state_of(w) == "B" and not jpath.exists()
    jpath.write_bytes(journal)
    redo_path(w["dir"]).write_bytes(redo)
    assert recover(w["dir"]).status == "replayed" and state_of(w) == "B"

    # Committed, but its redo data damaged (not a crash: bit rot or a hand edit): refused, nothing written.
    shutil.copyfile(w["A"], w["dir"] / ST)
    jpath.write_bytes(journal)
    bad = bytearray(redo)
    bad[len(redo) // 3] ^= 0x40
    redo_path(w["dir"]).write_bytes(bytes(bad))
    with pytest.raises(JournalError, match="corrupt"):
        recover(w["dir"])
    assert state_of(w) == "A" and jpath.exists()
