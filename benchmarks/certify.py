"""Certification on the embedded model: judge throughput, and what the sequential test saves.

    OMP_NUM_THREADS=2 python benchmarks/certify.py            # about 5-10 minutes on 2 CPU cores
    OMP_NUM_THREADS=2 python benchmarks/certify.py --quick    # fewer cases and runs

1. Cases judged per second per judge kind: the shipped `listen` invariant's held-out cases judged by
   each judge kind (preference: forced choice, two continuations in one forward; rules, direction,
   readout: one seeded greedy reply of --max-new-tokens tokens, then the judgement).
2. Cases needed by the sequential test against a fixed n at the same confidence, for true pass
   rates well above, near and below each shipped invariant's threshold (simulated coins, 2,000 or
   10,000 runs of the exact test the certificates use), and at the real preference judge's measured
   pass rate on the embedded model. "fixed n same" is the smallest fixed n whose exact chance of the
   correct verdict reaches the sequential test's (capped at 99%): what a fixed-n plan must spend to
   decide as reliably, had it known the rate in advance; a real fixed-n plan does not know it.
3. The real judge: a fixed-n certification of each shipped invariant on the embedded model, and
   where the sequential test (same seed, hence the same cases in the same order: a sequential run
   judges a prefix of the fixed run) stops on those very outcomes, against that fixed n.

Certificates and the graph go to a temporary home; the model (and a readout, if one is already in
the home or ships with the package) comes from $AMYGDALA_HOME.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import load_embedded, machine_line

from amygdala.dream import invariants
from amygdala.dream.bounds import SequentialTest, fixed_n_power, sequential_batch
from amygdala.dream.certify import DEFAULT_N, CertifySettings, certify, held_out_pool
from amygdala.dream.judges import JudgeContext, build_judge
from amygdala.engine.config import Config
from amygdala.memory_graph import MemoryGraph

CONFIDENCE = 0.95
N_MAX = 400
CAP = 0.99


def load_readout(lm):
    """The home's readout for the model, or the shipped one when its hashes match; None otherwise (never built here)."""
    from amygdala.corpus import load_corpus
    from amygdala.engine.readout import MANIFEST_FILE, ReadoutManager
    from amygdala.training.vectors.build import default_readout_dir
    from amygdala.training.vectors.shipped import try_shipped

    cfg = Config.load()
    directory = default_readout_dir(cfg, lm)
    if not (directory / MANIFEST_FILE).is_file():
        try:
            if not try_shipped(lm, load_corpus().content_hash(), directory, echo=lambda m: None):
                return None
        except Exception as exc:  # a benchmark reports what it could not measure
            print(f"readout unavailable: {exc}")
            return None
    return ReadoutManager.from_file(directory, model=lm)


def throughput(lm, readout, spec, kinds, n_pref: int, n_gen: int, max_new_tokens: int) -> dict[str, float]:
    pool = held_out_pool(spec, seed=0)
    out = {}
    judges = {
        "preference": {}, "rules": {"must_not": ["(?i)as an ai"]}, "direction": {},
        "readout": {"below": {(readout.concepts[0] if readout else "x"): 3.0}},
    }
    for kind in kinds:
        if kind == "readout" and readout is None:
            print(f"{kind:>10}: skipped (no readout in the home and none shipped for these weights)")
            continue
        data = invariants.spec_json(spec)
        data["judge"] = {"kind": kind, "params": judges[kind]}
        s = invariants.parse_spec(data)
        judge = build_judge(s, JudgeContext(lm=lm, readout=readout, max_new_tokens=max_new_tokens, seed=0))
        cases = pool[: n_pref if kind == "preference" else n_gen]
        if kind == "direction":
            judge.direction()  # fitted once per judge (all written cases): timed apart below
        t0 = time.perf_counter()
        verdicts = judge.judge_model(cases)
        dt = time.perf_counter() - t0
        out[kind] = len(cases) / dt
        rate = sum(v.passed for v in verdicts) / len(verdicts)
        print(f"{kind:>10}: {len(cases):>3} cases in {dt:6.1f} s = {len(cases) / dt:6.2f} cases/s "
              f"({dt / len(cases) * 1000:6.0f} ms/case), pass rate {rate:.2f}")
    return out


def matched_fixed_n(rate: float, threshold: float, target: float) -> int | None:
    if rate == threshold or target <= 0:
        return None
    want = min(target, CAP)
    lo, hi = 1, 5000

    def ok(n: int) -> bool:
        return fixed_n_power(n, rate, threshold, CONFIDENCE)[0 if rate > threshold else 1] >= want

    if not ok(hi):
        return None
    while lo < hi:  # the chance of the correct verdict grows with n (up to the lattice's small wiggles)
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid + 1, hi)
    return lo


def compare(threshold: float, rates: list[tuple[str, float]], runs: int, rng) -> None:
    print(f"threshold {threshold}: sequential n_max {N_MAX}, {runs} simulated runs per rate")
    head = (f"  {'':>14} {'rate':>5} | {'correct':>7} {'wrong':>6} {'inconc':>6} {'mean n':>7} {'p90 n':>6} | "
            f"{'fixed n same':>12} {'saved':>6}")
    print(head)
    for label, rate in rates:
        b = sequential_batch(rng.random((runs, N_MAX)) < rate, threshold, CONFIDENCE)
        good = "certified" if rate >= threshold else "refuted"
        bad = "refuted" if rate >= threshold else "certified"
        correct = float((b.verdicts == good).mean())
        wrong = float((b.verdicts == bad).mean())
        inc = float((b.verdicts == "inconclusive").mean())
        fixed = matched_fixed_n(rate, threshold, correct)
        saved = "-" if fixed is None else f"{fixed - b.stopped_at.mean():+.0f}"
        print(f"  {label:>14} {rate:>5.3f} | {correct:>7.1%} {wrong:>6.1%} {inc:>6.1%} {b.stopped_at.mean():>7.1f} "
              f"{np.percentile(b.stopped_at, 90):>6.0f} | {'-' if fixed is None else fixed:>12} {saved:>6}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--kinds", default="preference,rules,direction,readout")
    ap.add_argument("--fixed-n", type=int, default=DEFAULT_N, help="Cases of the real fixed-n certification.")
    ap.add_argument("--pref-cases", type=int, help="Cases timed for the preference judge (default 40; quick 16).")
    ap.add_argument("--gen-cases", type=int, help="Cases timed per generating judge (default 8; quick 4).")
    args = ap.parse_args()
    n_pref, n_gen, runs = (16, 4, 2000) if args.quick else (40, 8, 10000)
    n_pref, n_gen = args.pref_cases or n_pref, args.gen_cases or n_gen

    t_load = time.perf_counter()
    lm = load_embedded()
    readout = load_readout(lm)
    print(machine_line())
    print(f"model {lm.name} loaded in {time.perf_counter() - t_load:.1f} s; readout "
          f"{'loaded' if readout else 'not available'}")
    t_hash = time.perf_counter()
    lm.weights_sha256(refresh=True)
    print(f"weights sha256 of the served parameters: {time.perf_counter() - t_hash:.2f} s (cached until training)")
    specs = {p.stem: invariants.parse_spec(p) for p in invariants.shipped_paths()}

    print("\n1. cases judged per second (shipped 'listen' held-out cases)")
    throughput(lm, readout, specs["listen"], args.kinds.split(","), n_pref, n_gen, args.max_new_tokens)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = Config(home=Path(tmp))
        graph = MemoryGraph(cfg.memory_dir)
        for spec in specs.values():
            invariants.store(graph, spec)
        measured: dict[str, float] = {}
        print(f"\n2. real preference judge, fixed n={args.fixed_n} (capped by the held-out pool) per shipped "
              "invariant, and where the sequential test stops on the same cases")
        for name, spec in specs.items():
            rec = certify(graph, cfg, lm, name, settings=CertifySettings(n=args.fixed_n))
            measured[name] = rec.result.passes / rec.result.n
            print(f"  {name:>10}: {rec.result.summary}; pool {rec.pool_size}; {rec.duration_s:.1f} s "
                  f"({rec.result.n / rec.duration_s:.2f} cases/s)")
            test = SequentialTest(spec.threshold, spec.confidence, n_max=rec.pool_size)
            for c in rec.cases:
                if test.update(c.passed) != "continue":
                    break
            where = (f"stops after {test.n} cases: {test.state}" if test.done
                     else f"still undecided after {test.n} (bounds {test.lower:.3f}-{test.upper:.3f})")
            print(f"  {'':>10}  sequential on the same cases: {where} (fixed judged {rec.result.n})")
        graph.close()

    print("\n3. sequential vs fixed n at the same confidence (95%), simulated coins")
    rng = np.random.default_rng(2024)
    for name, spec in specs.items():
        t = spec.threshold
        rates = [("well above", min(1.0, t + 0.15)), ("near above", min(1.0, t + 0.03)),
                 ("near below", t - 0.03), ("well below", t - 0.15),
                 (f"{name} measured", measured[name])]
        compare(t, rates, runs, rng)


if __name__ == "__main__":
    main()
