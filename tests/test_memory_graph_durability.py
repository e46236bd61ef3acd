"""Crash and concurrency tests with real processes: SIGKILLed writers and two writers at once."""

from __future__ import annotations

import os
import random
import signal
import sys
import time
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ may or may not be a package
from memgraph_writer import WriterServer  # noqa: E402

from amygdala.memory_graph import LockTimeoutError, MemoryGraph, TornTailWarning  # noqa: E402

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the writer server forks")


@pytest.fixture(scope="module")
def server():
    s = WriterServer()
    yield s
    s.close()


def _acks(lines: list[str], prefix: str) -> set[int]:
    return {int(line.split()[2]) for line in lines if line.startswith(f"ack {prefix} ")}


def _keys(directory: Path) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TornTailWarning)
        with MemoryGraph(directory, readonly=True) as g:
            return [n.idempotency_key for n in g.nodes("memory")]  # type: ignore[misc]


def test_killed_writer_never_loses_an_acknowledged_write(tmp_path: Path, server: WriterServer) -> None:
    rng = random.Random(20240611)
    kills = total_acks = 0
    rounds_per_dir = 12
    for d_i in range(9):  # 9 x 12 = 108 kills; a fresh directory every 12 keeps graphs (and loads) small
        directory = tmp_path / f"graph{d_i}"
        MemoryGraph(directory).close()
        acked: set[int] = set()
        for _ in range(rounds_per_dir):
            start = max(acked) + 1 if acked else 0
            # Frequent compaction, so kills also land mid-snapshot and mid-journal-swap. Kill after
            # a random number of acknowledgements (0: during start-up and crash recovery) plus a
            # random delay, so the kill lands anywhere in a write, whatever the disk's fsync speed.
            lines: list[str] = []
            pid = server.fork(f"write {directory} w {start} 1000000 {rng.choice([3, 5, 8, 20])}", sink=lines)
            target = rng.choice([0, rng.randint(1, 5), rng.randint(1, 30), rng.randint(1, 30)])
            while len(_acks(lines, "w")) < target:
                lines.append(server.line())
            time.sleep(rng.choice([0.0, rng.uniform(0, 0.0005), rng.uniform(0, 0.004), rng.uniform(0, 0.015)]))
            os.kill(pid, signal.SIGKILL)
            server.send(f"reap {pid}")
            server.expect(f"reaped {pid}", sink=lines)
            assert not any(line.startswith("done") for line in lines), "writer finished before it was killed"
            kills += 1
            acked |= _acks(lines, "w")
            total_acks += len(_acks(lines, "w"))

            keys = _keys(directory)
            assert len(keys) == len(set(keys)), "a retried write (same idempotency key) was stored twice"
            missing = sorted(i for i in acked if f"w-{i}" not in set(keys))
            assert not missing, f"kill {kills}: acknowledged writes lost: {missing[:10]}"
        # A writer reopening the crashed directory repairs any torn tail and keeps everything.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TornTailWarning)
            MemoryGraph(directory).close()
        assert {f"w-{i}" for i in acked} <= set(_keys(directory))
    assert kills >= 100
    assert total_acks >= 300, f"only {total_acks} acknowledged writes: the kills tested too little"


def test_two_writer_processes_lose_nothing(tmp_path: Path, server: WriterServer) -> None:
    directory = tmp_path / "graph"
    MemoryGraph(directory).close()
    n = 300
    start_at = time.time() + 0.5
    lines: list[str] = []
    # Small snapshot_every: each writer compacts often, so the other must notice a replaced
    # journal and reload before its next write.
    pid_a = server.fork(f"write {directory} a 0 {n} 7 {start_at}", sink=lines)
    pid_b = server.fork(f"write {directory} b 0 {n} 11 {start_at}", sink=lines)

    # Meanwhile this process reads without the lock; it must never fail or go backwards.
    reader_sizes = []
    with MemoryGraph(directory, readonly=True) as reader:
        done: set[str] = set()
        while len(done) < 2:
            try:
                line = server.lines.get(timeout=0.005)
            except Exception:
                line = ""
            if line is None:
                raise AssertionError("writer server died")
            if line.startswith("error"):
                raise AssertionError(line)
            if line.startswith("done "):
                done.add(line.split()[1])
            elif line:
                lines.append(line)
            reader.refresh()
            reader_sizes.append(len(reader))
        assert time.time() < start_at + 60
    for pid in (pid_a, pid_b):
        server.send(f"reap {pid}")
        server.expect(f"reaped {pid}", sink=lines)

    a, b = _acks(lines, "a"), _acks(lines, "b")
    assert a == set(range(n)) and b == set(range(n))
    keys = _keys(directory)
    assert len(keys) == 2 * n == len(set(keys))
    assert set(keys) == {f"a-{i}" for i in range(n)} | {f"b-{i}" for i in range(n)}
    assert reader_sizes == sorted(reader_sizes), "the lock-free reader saw the graph shrink"
    # Both really wrote at the same time: their acknowledgements alternate, not one block then the other.
    order = [line.split()[1] for line in lines if line.startswith("ack ")]
    switches = sum(1 for x, y in zip(order, order[1:]) if x != y)
    assert switches > 2, f"writers did not interleave ({switches} switches)"


def test_second_writer_waits_then_fails_naming_the_holder(tmp_path: Path, server: WriterServer) -> None:
    directory = tmp_path / "graph"
    MemoryGraph(directory).close()
    pid = server.fork(f"hold {directory} 1.5")
    server.expect("holding")
    t0 = time.monotonic()
    with pytest.raises(LockTimeoutError) as exc:
        MemoryGraph(directory, lock_timeout=0.3)
    assert 0.25 < time.monotonic() - t0 < 1.4
    assert f"pid {pid}" in str(exc.value)
    # A patient writer just waits for the holder to finish.
    with MemoryGraph(directory, lock_timeout=20) as g:
        g.add_memory("after the holder left")
        assert len(g) == 1
    server.send(f"reap {pid}")
    server.expect(f"reaped {pid}")
