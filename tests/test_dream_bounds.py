"""Certificate statistics: exact Clopper-Pearson, the anytime-valid sequential test, verification.

The simulations use fixed numpy seeds and enough runs (2,000) that a method which does not control
its error (the naive "recompute Clopper-Pearson after every case" one is run alongside to show it)
fails the same assertions.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, special, stats

from amygdala.dream import bounds
from amygdala.dream.bounds import (
    CertificationResult,
    SequentialTest,
    certify_fixed,
    clopper_pearson,
    fixed_n_power,
    min_cases_to_certify,
    recompute,
    reproduces,
    sequential_batch,
)

THRESHOLD = 0.8
ALPHA = 0.05
RUNS = 2000
N_MAX = 400


def coins(p: float, seed: int, runs: int = RUNS, n: int = N_MAX) -> np.ndarray:
    return np.random.default_rng(seed).random((runs, n)) < p


# ------------------------------------------------------------------------------ Clopper-Pearson

def test_all_pass_lower_bound_is_alpha_to_the_one_over_n():
    assert clopper_pearson(10, 10, 0.95) == pytest.approx(0.05 ** (1 / 10), rel=1e-13)
    assert clopper_pearson(10, 10, 0.95, side="upper") == 1.0


def test_no_pass_upper_bound_mirrors_it():
    assert clopper_pearson(0, 10, 0.95, side="upper") == pytest.approx(1 - 0.05 ** (1 / 10), rel=1e-13)
    assert clopper_pearson(0, 10, 0.95) == 0.0


def test_two_sided_edges_split_alpha():
    lo, hi = clopper_pearson(0, 25, 0.95, side="two-sided")
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 25), rel=1e-13)
    lo, hi = clopper_pearson(25, 25, 0.95, side="two-sided")
    assert hi == 1.0 and lo == pytest.approx(0.025 ** (1 / 25), rel=1e-13)


def test_no_cases_give_the_trivial_bounds():
    assert clopper_pearson(0, 0, 0.95, side="two-sided") == (0.0, 1.0)
    assert certify_fixed(0, 0, 0.8).verdict == "inconclusive"


@pytest.mark.parametrize("k,n", [(1, 1), (3, 10), (7, 20), (19, 20), (47, 50), (80, 100), (990, 1000)])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_matches_scipy_binomtest_exact(k, n, confidence):
    two = stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="exact")
    assert clopper_pearson(k, n, confidence, side="two-sided") == pytest.approx((two.low, two.high), rel=1e-9, abs=1e-12)
    low = stats.binomtest(k, n, alternative="greater").proportion_ci(confidence_level=confidence, method="exact").low
    high = stats.binomtest(k, n, alternative="less").proportion_ci(confidence_level=confidence, method="exact").high
    assert clopper_pearson(k, n, confidence, side="lower") == pytest.approx(low, rel=1e-9, abs=1e-12)
    assert clopper_pearson(k, n, confidence, side="upper") == pytest.approx(high, rel=1e-9, abs=1e-12)


def test_published_table_values():
    # Exact 95% two-sided limits as printed, to four places, in the usual binomial confidence tables:
    # 0 of 10 -> [0, 0.3085], 5 of 10 -> [0.1871, 0.8129], 1 of 20 -> [0.0013, 0.2487].
    assert clopper_pearson(0, 10, 0.95, side="two-sided") == pytest.approx((0.0, 0.3085), abs=5e-5)
    assert clopper_pearson(5, 10, 0.95, side="two-sided") == pytest.approx((0.1871, 0.8129), abs=5e-5)
    assert clopper_pearson(1, 20, 0.95, side="two-sided") == pytest.approx((0.0013, 0.2487), abs=5e-5)


def test_upper_is_the_mirror_of_lower():
    for n in (1, 7, 40):
        for k in range(n + 1):
            assert clopper_pearson(k, n, 0.95, side="upper") == 1 - clopper_pearson(n - k, n, 0.95)


@pytest.mark.parametrize("n", [10, 37, 120])
def test_one_sided_coverage_is_exact_and_conservative(n):
    # P(lower > p) <= alpha for every p, summed exactly over the binomial: a normal approximation fails this.
    lowers = np.array([clopper_pearson(k, n, 0.95) for k in range(n + 1)])
    uppers = np.array([clopper_pearson(k, n, 0.95, side="upper") for k in range(n + 1)])
    pmf_k = np.arange(n + 1)
    worst_low = worst_high = 0.0
    for p in np.linspace(0.01, 0.99, 197):
        pmf = stats.binom.pmf(pmf_k, n, p)
        worst_low = max(worst_low, pmf[lowers > p].sum())
        worst_high = max(worst_high, pmf[uppers < p].sum())
    assert worst_low <= ALPHA + 1e-12 and worst_high <= ALPHA + 1e-12
    assert worst_low > 0.03  # exact, not needlessly wide


def test_fixed_verdicts():
    assert certify_fixed(50, 50, 0.8).verdict == "certified"
    assert certify_fixed(30, 50, 0.8).verdict == "refuted"
    assert certify_fixed(40, 50, 0.8).verdict == "inconclusive"
    r = certify_fixed(47, 50, 0.8)
    assert (r.method, r.n, r.passes, r.threshold, r.confidence, r.n_max) == ("clopper-pearson", 50, 47, 0.8, 0.95, None)
    assert r.lower == clopper_pearson(47, 50) and r.upper == clopper_pearson(47, 50, side="upper")
    assert r.summary.startswith("certified: 47/50 passed") and "0.8" in r.summary and "\n" not in r.summary
    # Threshold 1: never certified, any failure refutes.
    assert certify_fixed(1000, 1000, 1.0).verdict == "inconclusive"
    assert certify_fixed(999, 1000, 1.0).verdict == "refuted"


def test_min_cases_to_certify():
    # 0.8^n <= 0.05 first at n = 14 (0.8^13 = 0.055).
    assert min_cases_to_certify(0.8, 0.95) == 14
    assert certify_fixed(14, 14, 0.8).verdict == "certified"
    assert certify_fixed(13, 13, 0.8).verdict == "inconclusive"
    n1 = min_cases_to_certify(0.8, 0.95, failures=1)
    assert certify_fixed(n1 - 1, n1, 0.8).verdict == "certified"
    assert certify_fixed(n1 - 2, n1 - 1, 0.8).verdict != "certified"
    assert min_cases_to_certify(0.99, 0.95) == math.ceil(math.log(0.05) / math.log(0.99))
    with pytest.raises(ValueError, match="threshold of 1"):
        min_cases_to_certify(1.0)


def test_fixed_n_power_is_the_exact_binomial_tail():
    rng = np.random.default_rng(11)
    k = (rng.random((20000, 60)) < 0.9).sum(axis=1)
    verdicts = np.array([certify_fixed(int(x), 60, 0.8).verdict for x in range(61)])[k]
    cert, ref = fixed_n_power(60, 0.9, 0.8)
    assert (verdicts == "certified").mean() == pytest.approx(cert, abs=0.01)
    assert (verdicts == "refuted").mean() == pytest.approx(ref, abs=0.005)


# ----------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("call,match", [
    (lambda: clopper_pearson(0, -1), "n must be >= 0"),
    (lambda: clopper_pearson(11, 10), "between 0 and n=10"),
    (lambda: clopper_pearson(-1, 10), "between 0 and n=10"),
    (lambda: clopper_pearson(2.5, 10), "integer count"),
    (lambda: clopper_pearson(True, 10), "integer count"),
    (lambda: clopper_pearson(5, 10, 0.0), r"strictly between 0 and 1.*0\.95"),
    (lambda: clopper_pearson(5, 10, 1.0), r"strictly between 0 and 1.*0\.95"),
    (lambda: clopper_pearson(5, 10, 95), r"strictly between 0 and 1.*0\.95"),
    (lambda: clopper_pearson(5, 10, -0.1), "strictly between 0 and 1"),
    (lambda: clopper_pearson(5, 10, float("nan")), "finite"),
    (lambda: clopper_pearson(5, 10, 0.3), "at least 0.5"),
    (lambda: clopper_pearson(5, 10, 0.95, side="both"), "'lower', 'upper' or 'two-sided'"),
    (lambda: certify_fixed(5, 10, 0.0), r"threshold must lie in \(0, 1\]"),
    (lambda: certify_fixed(5, 10, 1.2), r"threshold must lie in \(0, 1\]"),
    (lambda: certify_fixed(5, 10, 80), r"e\.g\. 0\.8"),
    (lambda: SequentialTest(-0.5), r"threshold must lie in \(0, 1\]"),
    (lambda: SequentialTest(0.8, 1.0), "strictly between 0 and 1"),
    (lambda: SequentialTest(0.8, 0.95, 0), "n_max must be between 1"),
    (lambda: SequentialTest(0.8).update(0.7), "pass/fail boolean"),
    (lambda: sequential_batch(np.zeros((3, 5)), 0.8), "boolean array"),
    (lambda: fixed_n_power(10, 1.5, 0.8), r"rate must be a pass rate"),
])
def test_bad_input_says_how_to_fix(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --------------------------------------------------------------------------- mixture martingale

@pytest.mark.parametrize("s,f,m", [(9, 1, 0.6), (40, 3, 0.8), (40, 3, 0.85), (3, 9, 0.5), (0, 5, 0.3), (12, 0, 0.9)])
def test_closed_form_matches_numerical_integral(s, f, m):
    def ratio(q: float) -> float:
        return (q / m) ** s * ((1 - q) / (1 - m)) ** f

    above = integrate.quad(ratio, max(m, THRESHOLD), 1, epsabs=0, epsrel=1e-11)[0] / (1 - THRESHOLD)
    below = integrate.quad(ratio, 0, min(m, THRESHOLD), epsabs=0, epsrel=1e-11)[0] / THRESHOLD
    assert float(bounds._log_above(s, f, m, THRESHOLD)) == pytest.approx(math.log(above), abs=1e-8)
    assert float(bounds._log_below(s, f, m, THRESHOLD)) == pytest.approx(math.log(below), abs=1e-8)


def test_bounds_are_the_roots_and_agree_with_the_verdict():
    barrier = -math.log(1 - 0.95)
    rng = np.random.default_rng(5)
    for p in (0.95, 0.85, 0.8, 0.7):
        for x in coins(p, int(p * 100), runs=15, n=120):
            test = SequentialTest(THRESHOLD, 0.95, 120)
            for passed in x:
                step = test.update(bool(passed))
                if rng.random() < 0.2 or test.done:
                    lo, hi = test.lower, test.upper
                    assert 0 <= lo <= test.passes / test.n <= hi <= 1
                    assert (lo >= THRESHOLD) == (step == "certified")
                    assert (hi < THRESHOLD) == (step == "refuted")
                    s, f = test.passes, test.n - test.passes
                    if 0 < lo < THRESHOLD:
                        assert float(bounds._log_above(s, f, lo, THRESHOLD)) == pytest.approx(barrier, abs=1e-9)
                    if THRESHOLD <= hi < 1:
                        assert float(bounds._log_below(s, f, hi, THRESHOLD)) == pytest.approx(barrier, abs=1e-9)
                if test.done:
                    break


def test_all_pass_run_certifies_at_the_first_case_the_mixture_allows():
    # M+ after n straight passes = (1 - 0.8^(n+1)) / ((n+1) * 0.2 * 0.8^n): 17.1 at n=19, 20.5 at n=20.
    test = SequentialTest(0.8, 0.95, 100)
    steps = [test.update(True) for _ in range(20)]
    assert steps[:19] == ["continue"] * 19 and steps[19] == "certified"
    # Three straight failures refute (M- = 39 >= 20); two do not (10.3).
    test = SequentialTest(0.8, 0.95, 100)
    assert [test.update(False) for _ in range(3)] == ["continue", "continue", "refuted"]


def test_threshold_one_never_certifies_and_one_failure_refutes():
    test = SequentialTest(1.0, 0.95, 50)
    assert all(test.update(True) == "continue" for _ in range(30))
    assert test.lower == pytest.approx(0.05 ** (1 / 30), rel=1e-9)
    assert test.update(False) == "refuted"


def test_runs_to_n_max_then_refuses_more_cases():
    test = SequentialTest(0.8, 0.95, 10)
    steps = [test.update(i % 5 != 0) for i in range(10)]
    assert steps[-1] == "inconclusive" and set(steps[:-1]) == {"continue"}
    assert test.result().verdict == "inconclusive" and test.result().n == 10
    with pytest.raises(ValueError, match="already stopped at case 10"):
        test.update(True)


def test_batch_matches_the_case_by_case_test():
    for p, seed in ((0.95, 1), (0.82, 2), (0.78, 3), (0.65, 4)):
        x = coins(p, seed, runs=25, n=200)
        batch = sequential_batch(x, THRESHOLD)
        for row, verdict, stop in zip(x, batch.verdicts, batch.stopped_at):
            test = SequentialTest(THRESHOLD, 0.95, 200)
            for passed in row:
                if test.update(bool(passed)) != "continue":
                    break
            assert (test.state, test.n) == (verdict, stop)


# ------------------------------------------------------------------------- simulated coins

def naive_peeking_certifies(x: np.ndarray) -> np.ndarray:
    """Recompute the fixed-n Clopper-Pearson lower bound after every case; certify at the first crossing."""
    s = np.cumsum(x, axis=1)
    t = np.arange(1, x.shape[1] + 1)
    # lower(s, t) >= threshold  <=>  P(Binomial(t, threshold) >= s) <= alpha = I_threshold(s, t - s + 1)
    with np.errstate(invalid="ignore"):
        tail = np.where(s > 0, special.betainc(np.maximum(s, 1), t - s + 1, THRESHOLD), 1.0)
    return (tail <= ALPHA).any(axis=1)


@pytest.mark.parametrize("p,seed", [(0.79, 101), (0.75, 102)])
def test_rate_below_threshold_certifies_at_most_alpha(p, seed):
    x = coins(p, seed)
    rate = (sequential_batch(x, THRESHOLD).verdicts == "certified").mean()
    assert rate <= ALPHA, f"p={p}: certified {rate:.3%} of {RUNS} runs (must be <= 5%)"


def test_at_the_threshold_the_exact_martingale_still_crosses_at_most_alpha():
    # At p = threshold the certification evidence is an exact martingale, the worst case for Ville's
    # bound (about 3.6% here over 400 cases); twice the evidence (alpha 0.1 in effect) gives 7%+.
    x = coins(THRESHOLD, 100)
    rate = (sequential_batch(x, THRESHOLD).verdicts == "certified").mean()
    assert rate <= ALPHA, f"p=threshold: certified {rate:.3%} of {RUNS} runs (must be <= 5%)"
    s = np.cumsum(x, axis=1)
    doubled = bounds._log_above(s, np.arange(1, N_MAX + 1) - s, THRESHOLD, THRESHOLD) + math.log(2)
    assert (doubled >= -math.log(ALPHA)).any(axis=1).mean() > ALPHA  # the check can fail


def test_naive_peeking_breaks_the_same_check():
    # The harness can fail: stopping at the first fixed-n crossing certifies far more than 5% at p=0.79.
    x = coins(0.79, 101)
    assert naive_peeking_certifies(x).mean() > 2 * ALPHA
    assert (sequential_batch(x, THRESHOLD).verdicts == "certified").mean() <= ALPHA


@pytest.mark.parametrize("p,seed", [(0.81, 103), (0.85, 104)])
def test_rate_above_threshold_refutes_at_most_alpha(p, seed):
    rate = (sequential_batch(coins(p, seed), THRESHOLD).verdicts == "refuted").mean()
    assert rate <= ALPHA, f"p={p}: refuted {rate:.3%} of {RUNS} runs (must be <= 5%)"


@pytest.mark.parametrize("p,seed", [(0.7, 105), (0.9, 106)])
def test_bounds_cover_rates_away_from_the_threshold_at_all_times(p, seed):
    # L_t > p at some t  <=>  M+_t(p) reaches 1/alpha at some t (the bound is that root); same for U_t.
    # Far from the threshold the mixture acts like a likelihood ratio against a single alternative,
    # for which Ville's bound is nearly tight (about 4.5% at p=0.7 over 400 cases), so this check
    # allows three standard errors of Monte Carlo noise; a 10% error rate still fails it.
    x = coins(p, seed)
    s = np.cumsum(x, axis=1)
    f = np.arange(1, N_MAX + 1) - s
    barrier = -math.log(ALPHA)
    noise = 3 * math.sqrt(ALPHA * (1 - ALPHA) / RUNS)
    assert (bounds._log_above(s, f, p, THRESHOLD) >= barrier).any(axis=1).mean() <= ALPHA + noise
    assert (bounds._log_below(s, f, p, THRESHOLD) >= barrier).any(axis=1).mean() <= ALPHA + noise


def test_power_well_above_threshold_and_cases_saved(capsys):
    p = 0.95
    batch = sequential_batch(coins(p, 107), THRESHOLD)
    certified = (batch.verdicts == "certified").mean()
    mean_n = batch.stopped_at.mean()
    # The fixed n that certifies as often (capped at 99%, which a fixed n reaches), computed exactly.
    target = min(certified, 0.99)
    fixed = next(n for n in range(1, 2000) if fixed_n_power(n, p, THRESHOLD)[0] >= target)
    with capsys.disabled():
        print(f"\np={p}: sequential certified {certified:.1%}, mean stopping n {mean_n:.1f} "
              f"(median {np.median(batch.stopped_at):.0f}); fixed n for the same power {fixed}")
    assert certified >= 0.99
    assert mean_n < fixed


# ------------------------------------------------------------------------------- verification

def test_recompute_reproduces_a_sequential_run_exactly():
    rng = np.random.default_rng(21)
    verdicts = set()
    for p in (0.95, 0.8, 0.6):
        test = SequentialTest(0.8, 0.95, 300)
        record = []
        while not test.done:
            record.append(bool(rng.random() < p))
            test.update(record[-1])
        original = test.result()
        verdicts.add(original.verdict)
        again = recompute(record, method="beta-binomial-mixture", threshold=0.8, confidence=0.95, n_max=300)
        assert again == original
        assert reproduces(original, record)
        assert reproduces(CertificationResult.model_validate_json(original.model_dump_json()), record)
        flipped = record[:-1] + [not record[-1]]
        assert not reproduces(original, flipped)
        extra = "at most n_max=300" if original.verdict == "inconclusive" else f"goes on after case {len(record)}"
        with pytest.raises(ValueError, match=extra):
            recompute(record + [True], method="beta-binomial-mixture", threshold=0.8, n_max=300)
        assert not reproduces(original, record + [True])
    assert verdicts == {"certified", "inconclusive", "refuted"}


def test_recompute_a_run_cut_short_or_run_to_n_max():
    record = [i % 5 != 0 for i in range(37)]
    cut = recompute(record, method="beta-binomial-mixture", threshold=0.8, n_max=50)
    assert (cut.verdict, cut.n, cut.n_max) == ("inconclusive", 37, 50)
    with pytest.raises(ValueError, match="at most n_max=30"):
        recompute(record, method="beta-binomial-mixture", threshold=0.8, n_max=30)
    with pytest.raises(ValueError, match="needs the run's n_max"):
        recompute(record, method="beta-binomial-mixture", threshold=0.8)


def test_recompute_fixed_n():
    record = [True] * 47 + [False] * 3
    result = recompute(record, method="clopper-pearson", threshold=0.8)
    assert result == certify_fixed(47, 50, 0.8)
    assert reproduces(result, list(reversed(record)))  # order does not matter for a fixed n
    assert not reproduces(result, record[:-1])
    with pytest.raises(ValueError, match="only to the sequential method"):
        recompute(record, method="clopper-pearson", threshold=0.8, n_max=50)
    with pytest.raises(ValueError, match="pass/fail boolean"):
        recompute([1, 0, 0.5], method="clopper-pearson", threshold=0.8)
    with pytest.raises(ValueError, match="method must be"):
        recompute(record, method="wilson", threshold=0.8)  # type: ignore[arg-type]


def test_result_model_rejects_inconsistent_records():
    with pytest.raises(ValueError, match="cannot exceed n"):
        CertificationResult(method="clopper-pearson", threshold=0.8, confidence=0.95, n=5, passes=6,
                            lower=0.5, upper=0.9, verdict="inconclusive")
    with pytest.raises(ValueError, match="n_max is required"):
        CertificationResult(method="beta-binomial-mixture", threshold=0.8, confidence=0.95, n=5, passes=5,
                            lower=0.5, upper=1.0, verdict="inconclusive")
