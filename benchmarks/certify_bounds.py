"""Certification cost: cases the sequential test needs against a fixed-n Clopper-Pearson run.

    python benchmarks/certify_bounds.py            # 10,000 simulated runs per rate
    python benchmarks/certify_bounds.py --quick    # 2,000 runs (a few seconds)

Threshold 0.8 at 95% confidence, sequential n_max 400. For each true pass rate: how often the
sequential test certifies / refutes / stays inconclusive, and the mean, median and 90th percentile
of the cases it judged; then the fixed-n side, computed exactly from the binomial: its verdict rates
with n = n_max, and the smallest fixed n that reaches the sequential test's rate of the correct
verdict (capped at 99%, which a fixed n reaches). "saved" is the fixed n (400, or the matched one)
minus the sequential mean; a negative number means the sequential test costs more there. A fixed run has to choose n before it
sees any case, so in practice it pays for the rate it cannot know; the sequential test adapts.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from amygdala.dream.bounds import fixed_n_power, min_cases_to_certify, sequential_batch  # noqa: E402

THRESHOLD = 0.8
CONFIDENCE = 0.95
N_MAX = 400
RATES = (1.0, 0.97, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6)
CAP = 0.99


def matched_fixed_n(rate: float, target: float) -> int | None:
    """Smallest fixed n whose exact chance of the correct verdict reaches `target` (None past 5,000)."""
    if rate == THRESHOLD or target <= 0:
        return None
    want = min(target, CAP)
    for n in range(1, 5001):
        cert, ref = fixed_n_power(n, rate, THRESHOLD, CONFIDENCE)
        if (cert if rate > THRESHOLD else ref) >= want:
            return n
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2,000 runs per rate instead of 10,000")
    ap.add_argument("--seed", type=int, default=2024)
    args = ap.parse_args()
    runs = 2000 if args.quick else 10000
    rng = np.random.default_rng(args.seed)

    print(f"threshold {THRESHOLD}, confidence {CONFIDENCE:.0%}, sequential n_max {N_MAX}, {runs} runs per rate, "
          f"seed {args.seed}")
    print(f"fixed n all-pass floor: {min_cases_to_certify(THRESHOLD, CONFIDENCE)} cases with 0 failures, "
          f"{min_cases_to_certify(THRESHOLD, CONFIDENCE, 1)} with 1, {min_cases_to_certify(THRESHOLD, CONFIDENCE, 2)} "
          f"with 2, {min_cases_to_certify(THRESHOLD, CONFIDENCE, 5)} with 5")
    head = (f"{'rate':>5} | {'seq cert':>8} {'refute':>7} {'inconc':>7} {'mean n':>7} {'median':>6} {'p90':>5} | "
            f"{'fixed400 cert':>13} {'refute':>7} {'saved':>6} | {'fixed n same':>12} {'saved':>6}")
    print(head)
    print("-" * len(head))
    t0 = time.perf_counter()
    for rate in RATES:
        batch = sequential_batch(rng.random((runs, N_MAX)) < rate, THRESHOLD, CONFIDENCE)
        cert = float((batch.verdicts == "certified").mean())
        ref = float((batch.verdicts == "refuted").mean())
        inc = float((batch.verdicts == "inconclusive").mean())
        n = batch.stopped_at
        f_cert, f_ref = fixed_n_power(N_MAX, rate, THRESHOLD, CONFIDENCE)
        correct = cert if rate > THRESHOLD else ref
        fixed = matched_fixed_n(rate, correct)
        fixed_s = "-" if fixed is None else str(fixed)
        saved = "-" if fixed is None else f"{fixed - n.mean():+.0f}"
        print(f"{rate:>5.2f} | {cert:>8.2%} {ref:>7.2%} {inc:>7.2%} {n.mean():>7.1f} {np.median(n):>6.0f} "
              f"{np.percentile(n, 90):>5.0f} | {f_cert:>13.2%} {f_ref:>7.2%} {N_MAX - n.mean():>+6.0f} | {fixed_s:>12} {saved:>6}")
    print(f"error rates: 'seq cert' in the rows below {THRESHOLD}, 'refute' in the rows at or above it; each is "
          f"bounded by {1 - CONFIDENCE:.0%}, over the whole run however early it stops")
    print(f"simulation {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
