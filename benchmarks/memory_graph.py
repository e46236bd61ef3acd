"""Memory graph benchmark: acknowledged writes/s with fsync, snapshot time, load time for 100k nodes.

    python benchmarks/memory_graph.py            # 100k-node graph
    python benchmarks/memory_graph.py --quick    # 10k nodes, fewer writes (a few seconds)

Runs in a temporary directory on the file system of --tmp (default: the system temp dir); fsync
cost depends entirely on that device, so say which one when quoting numbers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

# This file is called memory_graph.py: drop its own folder from sys.path so `import memory_graph`
# finds the package, not this script.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from amygdala.memory_graph import MemoryGraph  # noqa: E402

_EMOTIONS = ("frustrated", "curious", "calm", "anxious", "proud", "ashamed", "bored", "hopeful")


def _text(i: int) -> str:
    a, b = _EMOTIONS[i % len(_EMOTIONS)], _EMOTIONS[(i * 7 + 3) % len(_EMOTIONS)]
    if a == b:
        b = _EMOTIONS[(i + 1) % len(_EMOTIONS)]
    return (f"Memory {i}: the user asked for a refactor of module {i % 97} and the tests failed twice before "
            f"passing.\nemotion: {a}={(i % 10) / 10:.1f} {b}={((i * 3) % 10) / 10:.1f}")


def bench_writes(root: Path, n: int) -> dict[str, float]:
    """Each call returns only after its journal line is fsync'd: that is the acknowledged rate."""
    lat: list[float] = []
    with MemoryGraph(root / "writes", snapshot_every=None) as g:
        inv = g.add_invariant("honest", "No invented facts.", {"kind": "regex", "params": {"pattern": "x"}}, threshold=0.9)
        start = time.perf_counter()
        for i in range(n):
            t0 = time.perf_counter()
            if i % 4 == 3:
                g.submit_correction(f"context {i}", f"preferred {i}", f"rejected {i}", invariant=inv.id,
                                    idempotency_key=f"key-{i}")
            else:
                g.add_memory(_text(i), tags=("bench",))
            lat.append(time.perf_counter() - t0)
        total = time.perf_counter() - start
    lat.sort()
    return {"writes": n, "writes_per_s": n / total, "p50_ms": statistics.median(lat) * 1e3,
            "p99_ms": lat[int(0.99 * (len(lat) - 1))] * 1e3}


def bench_big(root: Path, nodes: int, tail_fraction: float) -> dict[str, float]:
    """Build `nodes` nodes (most in the snapshot, `tail_fraction` left in the journal), then time
    a snapshot and fresh loads (snapshot + journal replay), with and without node validation."""
    d = root / "big"
    tail = int(nodes * tail_fraction)
    with MemoryGraph(d, snapshot_every=None) as g:
        t0 = time.perf_counter()
        with g.batch():
            for i in range(nodes - tail):
                g.add_memory(_text(i), tags=("bench",))
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        header = g.snapshot()
        snap = time.perf_counter() - t0
        with g.batch():
            for i in range(nodes - tail, nodes):
                g.add_memory(_text(i), tags=("bench",))
    size_mb = (d / "snapshot.json").stat().st_size / 1e6
    loads = {}
    for validate in (True, False):
        best = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            with MemoryGraph(d, readonly=True, validate_snapshot=validate) as g2:
                assert len(g2) == nodes, (len(g2), nodes)
            best = min(best, time.perf_counter() - t0)
        loads[validate] = best
    return {"nodes": nodes, "journal_tail": tail, "build_s": build, "snapshot_s": snap, "snapshot_mb": size_mb,
            "snapshot_nodes": header.nodes, "load_s": loads[True], "load_novalidate_s": loads[False]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10k nodes and 300 writes instead of 100k and 2000")
    ap.add_argument("--nodes", type=int, default=None, help="graph size for the load/snapshot benchmark")
    ap.add_argument("--writes", type=int, default=None, help="number of fsync'd writes to time")
    ap.add_argument("--tail", type=float, default=0.05, help="fraction of nodes left in the journal for the load")
    ap.add_argument("--tmp", type=Path, default=None, help="directory to run in (its file system is what is measured)")
    args = ap.parse_args(argv)
    nodes = args.nodes or (10_000 if args.quick else 100_000)
    writes = args.writes or (300 if args.quick else 2_000)

    with tempfile.TemporaryDirectory(prefix="amygdala-mg-bench-", dir=args.tmp) as tmp:
        root = Path(tmp)
        w = bench_writes(root, writes)
        b = bench_big(root, nodes, args.tail)
    rows = [
        ("acknowledged writes/s (fsync each)", f"{w['writes_per_s']:,.0f}", f"{writes} writes; p50 {w['p50_ms']:.2f} ms, p99 {w['p99_ms']:.2f} ms"),
        (f"snapshot time, {nodes:,} nodes", f"{b['snapshot_s']:.2f} s", f"{b['snapshot_mb']:.1f} MB node-link JSON"),
        (f"load time, {nodes:,} nodes", f"{b['load_s']:.2f} s", f"snapshot {b['snapshot_nodes']:,} + replay {b['journal_tail']:,} journal records, nodes validated"),
        (f"load time, {nodes:,} nodes, no validation", f"{b['load_novalidate_s']:.2f} s", "validate_snapshot=False (checksum only)"),
        (f"bulk build, {nodes - b['journal_tail']:,} nodes in one batch", f"{b['build_s']:.2f} s", "one fsync for the whole batch"),
    ]
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    print(f"memory graph benchmark (python {sys.version.split()[0]}, tmp {args.tmp or tempfile.gettempdir()})")
    print(f"{'metric':<{width}}  {'value':>{vwidth}}  notes")
    print(f"{'-' * width}  {'-' * vwidth}  {'-' * 5}")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>{vwidth}}  {note}")


if __name__ == "__main__":
    main()
