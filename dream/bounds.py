"""Confidence bounds on an invariant's pass rate, and the certify / refute / inconclusive verdicts.

A behavioural certificate says "on fresh held-out cases this invariant holds at least `threshold`
of the time, at `confidence`". Each case is judged pass/fail, so the evidence is a run of Bernoulli
outcomes and the claim is a one-sided statement about their mean p. Two ways to decide:

Fixed n (`certify_fixed`): run exactly n cases, then take the exact Clopper-Pearson bounds
(beta quantiles; no normal approximation, which is badly off for pass rates near 1, exactly where
certificates live). Certified when the one-sided lower bound reaches the threshold, refuted when
the one-sided upper bound is below it. Each bound is one-sided at level 1 - alpha, and at most one
of the two verdicts can be wrong for any true p, so each verdict errs with probability <= alpha.

Sequential (`SequentialTest`): judge cases one at a time and stop as soon as the evidence decides.
Recomputing Clopper-Pearson after every case and stopping at the first crossing is *not* valid:
peeking n times inflates the error far above alpha (the tests show it). Instead the test uses
one-sided beta-binomial mixture martingales (Robbins 1970; Howard, Ramdas, McAuliffe & Sekhon 2021,
"Time-uniform, nonparametric, nonasymptotic confidence sequences", section 3). For a candidate
rate m, the "above" martingale is the likelihood ratio of the data under a pass rate q against m,
averaged over q uniform on [threshold, 1] (only the part q >= m when m > threshold):

    M+_t(m) = 1/(1-threshold) * integral_{max(m, threshold)}^1 q^S (1-q)^F dq / (m^S (1-m)^F)

with S passes and F failures after t cases; the "below" martingale M-_t(m) mirrors it with q
uniform on [0, threshold]. Why it stays valid under optional stopping: if the true rate is p <= m,
each factor the likelihood ratio gains on a new case has conditional expectation
p q/m + (1-p)(1-q)/(1-m) <= 1 for every q >= m, whatever happened before, so M+_t(m) is a
nonnegative supermartingale starting at <= 1 (the mixing weight on [m, 1] is at most 1). Ville's
inequality then bounds the chance that it *ever* reaches 1/alpha, over the whole infinite run, by
alpha. That is a statement about all times at once, so it covers every stopping rule, including
"stop at the first crossing", "stop when the budget runs out" or "stop because the operator got
bored". The lower bound is L_t = inf{m : M+_t(m) < 1/alpha}; P(L_t > p for some t) <= alpha.
M+_t(m) strictly decreases in m up to the observed rate S/t and stays <= 1 above it, so L_t is a
single root and "L_t >= threshold" is exactly "M+_t(threshold) >= 1/alpha", which is how the test
decides (closed form, no root finding in the decision). The upper bound U_t and refutation mirror
this. Putting the mixing weight only on the far side of the threshold buys power at the one rate
that matters (the bounds are sharpest near the threshold and loose far from it); the uniform weight
was kept after comparing Beta-shaped alternatives in simulation: none was better across rates.
Compared with a fixed n the sequential test stops much earlier when the rate is clearly above or
below the threshold, and pays for its any-time validity near the threshold (see
benchmarks/certify_bounds.py). With no decision by n_max the verdict is inconclusive.

Everything here is deterministic (no randomness inside), so `recompute` replays a recorded list of
per-case outcomes and reproduces the original verdict, bounds and sequential stopping point.

Why not a library: `expectation` (PyPI) is GPL-3.0 with an AI-training prohibition, needs Python
>= 3.12 and pulls pandas and plotly; `confseq` is MIT but ships only a C++ source distribution
(scikit-build, cmake, pybind11 2.6), lists pytest, pandas and multiprocess as runtime dependencies
and has had no release since January 2023. The mixture here is a few closed-form lines over
scipy's beta functions.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, computed_field, model_validator
from scipy import optimize, special, stats

Verdict = Literal["certified", "refuted", "inconclusive"]
Step = Literal["continue", "certified", "refuted", "inconclusive"]
Method = Literal["clopper-pearson", "beta-binomial-mixture"]
Side = Literal["lower", "upper", "two-sided"]

DEFAULT_CONFIDENCE = 0.95
DEFAULT_N_MAX = 400  # near the threshold the sequential test needs a few hundred cases (see the benchmark)
MAX_N_MAX = 1_000_000  # far beyond any run of judged cases (each one is a generation plus a judgement)

FIXED: Method = "clopper-pearson"
SEQUENTIAL: Method = "beta-binomial-mixture"


# ----------------------------------------------------------------------------------------- inputs

def _count(value: object, name: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer count, got the bool {value!r}; pass a number of cases")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name} must be an integer count, got {value!r}; round or count the cases first") from None


def _check_counts(passes: object, n: object) -> tuple[int, int]:
    k, n_ = _count(passes, "passes"), _count(n, "n")
    if n_ < 0:
        raise ValueError(f"n must be >= 0 (the number of judged cases), got {n_}")
    if not 0 <= k <= n_:
        raise ValueError(f"passes must be between 0 and n={n_}, got {k}; count only judged cases, each at most once")
    return k, n_


def _real(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    x = float(value)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    return x


def _check_confidence(confidence: object) -> float:
    c = _real(confidence, "confidence")
    if not 0.0 < c < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {c}; e.g. 0.95 for 95%")
    if c < 0.5:
        raise ValueError(f"confidence must be at least 0.5, got {c}: below that the lower bound can exceed the "
                         "upper bound and a certificate says less than a coin flip; use e.g. 0.95")
    return c


def _check_threshold(threshold: object) -> float:
    t = _real(threshold, "threshold")
    if not 0.0 < t <= 1.0:
        raise ValueError(f"threshold must lie in (0, 1] (a pass rate), got {t}; e.g. 0.8 for 'passes 80% of cases'")
    return t


def _check_n_max(n_max: object) -> int:
    n = _count(n_max, "n_max")
    if not 1 <= n <= MAX_N_MAX:
        raise ValueError(f"n_max must be between 1 and {MAX_N_MAX}, got {n}; it is the most cases the run may judge")
    return n


def _check_outcomes(outcomes: Sequence[object]) -> list[bool]:
    out = []
    for i, x in enumerate(outcomes):
        if isinstance(x, (bool, np.bool_)):
            out.append(bool(x))
        elif isinstance(x, (int, np.integer)) and x in (0, 1):
            out.append(bool(x))
        else:
            raise ValueError(f"outcome {i} is {x!r}; each recorded case must be a pass/fail boolean "
                             "(apply the judge's pass rule before certifying)")
    return out


# ------------------------------------------------------------------------------ Clopper-Pearson

def _cp_lower(k: int, n: int, alpha: float) -> float:
    # The rate at which k or more passes out of n has probability alpha; 0 when nothing passed.
    return 0.0 if k == 0 else float(special.betaincinv(k, n - k + 1, alpha))


def _cp_upper(k: int, n: int, alpha: float) -> float:
    # Mirror of the lower bound (upper(k, n) == 1 - lower(n - k, n) exactly), 1 when everything passed.
    return 1.0 - _cp_lower(n - k, n, alpha)


def clopper_pearson(passes: int, n: int, confidence: float = DEFAULT_CONFIDENCE,
                    side: Side = "lower") -> float | tuple[float, float]:
    """Exact binomial confidence bound on a pass rate from `passes` out of `n`.

    One-sided bounds ("lower", "upper") hold at level `confidence` each (alpha = 1 - confidence in
    one tail), which is what a certificate needs; "two-sided" splits alpha over both tails and
    returns (lower, upper). With no cases the bounds are the trivial 0 and 1.
    """
    k, n = _check_counts(passes, n)
    alpha = 1.0 - _check_confidence(confidence)
    if side == "lower":
        return _cp_lower(k, n, alpha)
    if side == "upper":
        return _cp_upper(k, n, alpha)
    if side == "two-sided":
        return _cp_lower(k, n, alpha / 2), _cp_upper(k, n, alpha / 2)
    raise ValueError(f"side must be 'lower', 'upper' or 'two-sided', got {side!r}")


def min_cases_to_certify(threshold: float, confidence: float = DEFAULT_CONFIDENCE, failures: int = 0) -> int:
    """Fewest fixed-n cases that certify with `failures` of them failing: the floor on any fixed-n plan."""
    t, c = _check_threshold(threshold), _check_confidence(confidence)
    f = _count(failures, "failures")
    if f < 0:
        raise ValueError(f"failures must be >= 0, got {f}")
    if t == 1.0:
        raise ValueError("a threshold of 1 can never be certified from finitely many cases (every lower bound "
                         "is below 1); use a threshold below 1, e.g. 0.99")
    alpha = 1.0 - c

    def ok(n: int) -> bool:
        return _cp_lower(n - f, n, alpha) >= t

    hi = max(f + 1, 1)
    while not ok(hi):  # the lower bound grows with n for a fixed number of failures
        hi *= 2
    lo = max(f, hi // 2)  # ok(lo) is False (or lo == f, where nothing can certify)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


def fixed_n_power(n: int, rate: float, threshold: float,
                  confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
    """Exact chances (certified, refuted) of a fixed-n run when the true pass rate is `rate`.

    For planning how many cases a fixed run needs, and for comparing it with the sequential test:
    both bounds grow with the number of passes, so each verdict is a tail of Binomial(n, rate).
    """
    _, n = _check_counts(0, n)
    p, t, c = _real(rate, "rate"), _check_threshold(threshold), _check_confidence(confidence)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"rate must be a pass rate in [0, 1], got {p}")
    alpha = 1.0 - c

    def first(pred) -> int:  # smallest k in [0, n + 1] with pred(k), pred monotone in k
        lo, hi = -1, n + 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if pred(mid) else (mid, hi)
        return hi

    k_cert = first(lambda k: _cp_lower(k, n, alpha) >= t)  # n + 1: cannot certify with n cases
    k_ref = first(lambda k: _cp_upper(k, n, alpha) >= t) - 1  # largest k that refutes; -1: none
    p_cert = float(stats.binom.sf(k_cert - 1, n, p)) if k_cert <= n else 0.0
    p_ref = float(stats.binom.cdf(k_ref, n, p)) if k_ref >= 0 else 0.0
    return p_cert, p_ref


# ------------------------------------------------------------------------------------- results

class CertificationResult(BaseModel):
    """One certification decision with everything needed to check it again from the recorded cases."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Method = Field(description="'clopper-pearson' (fixed n) or 'beta-binomial-mixture' (sequential).")
    threshold: float = Field(gt=0, le=1, description="Pass rate the invariant must reach.")
    confidence: float = Field(ge=0.5, lt=1, description="Level of each one-sided bound.")
    n: int = Field(ge=0, description="Cases judged (for the sequential test: where it stopped).")
    passes: int = Field(ge=0)
    lower: float = Field(ge=0, le=1, description="One-sided lower confidence bound on the pass rate.")
    upper: float = Field(ge=0, le=1, description="One-sided upper confidence bound on the pass rate.")
    verdict: Verdict
    n_max: int | None = Field(None, ge=1, description="Sequential only: the most cases the run was allowed.")

    @model_validator(mode="before")
    @classmethod
    def _drop_summary(cls, data: object) -> object:
        # A stored result carries its summary (a computed field); it is derived, so it is rebuilt, not read.
        if isinstance(data, dict) and "summary" in data:
            data = {k: v for k, v in data.items() if k != "summary"}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> CertificationResult:
        if self.passes > self.n:
            raise ValueError(f"passes ({self.passes}) cannot exceed n ({self.n})")
        if (self.method == SEQUENTIAL) != (self.n_max is not None):
            raise ValueError("n_max is required for the sequential method and meaningless for fixed n")
        if self.n_max is not None and self.n > self.n_max:
            raise ValueError(f"n ({self.n}) cannot exceed n_max ({self.n_max})")
        return self

    @computed_field  # type: ignore[prop-decorator]
    @property
    def summary(self) -> str:
        level = f"{round(self.confidence * 100, 6):g}%"
        how = ("fixed n, exact Clopper-Pearson" if self.method == FIXED
               else f"sequential beta-binomial mixture, stopped at case {self.n} of at most {self.n_max}")
        head = f"{self.verdict}: {self.passes}/{self.n} passed; "
        if self.verdict == "certified":
            body = f"pass rate >= {self.lower:.3f} at {level} confidence, reaching the threshold {self.threshold:g}"
        elif self.verdict == "refuted":
            body = f"pass rate <= {self.upper:.3f} at {level} confidence, below the threshold {self.threshold:g}"
        else:
            body = (f"pass rate between {self.lower:.3f} and {self.upper:.3f} (each bound {level}), "
                    f"which does not decide the threshold {self.threshold:g}")
        return f"{head}{body} ({how})"


def _fixed_verdict(lower: float, upper: float, threshold: float) -> Verdict:
    if lower >= threshold:
        return "certified"
    if upper < threshold:
        return "refuted"
    return "inconclusive"


def certify_fixed(passes: int, n: int, threshold: float,
                  confidence: float = DEFAULT_CONFIDENCE) -> CertificationResult:
    """Fixed-n verdict: certified if the one-sided lower bound >= threshold, refuted if the upper < threshold."""
    k, n = _check_counts(passes, n)
    t, c = _check_threshold(threshold), _check_confidence(confidence)
    lower, upper = _cp_lower(k, n, 1.0 - c), _cp_upper(k, n, 1.0 - c)
    return CertificationResult(method=FIXED, threshold=t, confidence=c, n=n, passes=k, lower=lower,
                               upper=upper, verdict=_fixed_verdict(lower, upper, t))


# --------------------------------------------------------------------------- mixture martingales

def _log_above(s, f, m, threshold: float):
    """log M+_t(m): evidence that the pass rate exceeds m (mixing q uniform on [threshold, 1]).

    Works elementwise on numpy arrays, so the simulation and the one-case-at-a-time test share it.
    """
    s, f, m = np.asarray(s, dtype=float), np.asarray(f, dtype=float), np.asarray(m, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        if threshold == 1.0:
            # All weight on q = 1: the ratio is m^-S while nothing failed, 0 after the first failure.
            return np.where(f == 0, -special.xlogy(s, m), -np.inf)
        c = np.maximum(m, threshold)
        # integral_c^1 q^S (1-q)^F dq = B(S+1, F+1) * P(Beta(S+1, F+1) >= c), and P(...) = I_{1-c}(F+1, S+1)
        log_tail = np.log(special.betainc(f + 1, s + 1, 1.0 - c))
        return (special.betaln(s + 1, f + 1) + log_tail - math.log1p(-threshold)
                - special.xlogy(s, m) - special.xlog1py(f, -m))


def _log_below(s, f, m, threshold: float):
    """log M-_t(m): evidence that the pass rate is below m (mixing q uniform on [0, threshold])."""
    s, f, m = np.asarray(s, dtype=float), np.asarray(f, dtype=float), np.asarray(m, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        c = np.minimum(m, threshold)
        log_head = np.log(special.betainc(s + 1, f + 1, c))
        return (special.betaln(s + 1, f + 1) + log_head - math.log(threshold)
                - special.xlogy(s, m) - special.xlog1py(f, -m))


def _log_barrier(confidence: float) -> float:
    return -math.log1p(-confidence)  # log(1/alpha)


def _step_verdict(s: int, f: int, threshold: float, barrier: float) -> Step:
    if float(_log_above(s, f, threshold, threshold)) >= barrier:
        return "certified"
    if float(_log_below(s, f, threshold, threshold)) >= barrier:
        return "refuted"
    return "continue"


_TINY = 1e-300


def _mixture_lower(s: int, f: int, threshold: float, barrier: float) -> float:
    if s == 0:
        return 0.0
    rate = s / (s + f)

    def g(m: float) -> float:
        return float(_log_above(s, f, m, threshold)) - barrier

    if g(_TINY) <= 0.0:  # only when the tail underflows far from any decision: 0 is still a valid bound
        return 0.0
    if g(rate) >= 0.0:  # cannot happen mathematically (M+ <= 1 at the observed rate); guard rounding
        return rate
    return float(optimize.brentq(g, _TINY, rate, xtol=1e-14, maxiter=500))


def _mixture_upper(s: int, f: int, threshold: float, barrier: float) -> float:
    if f == 0:
        return 1.0
    rate = s / (s + f)
    top = math.nextafter(1.0, 0.0)

    def g(m: float) -> float:
        return float(_log_below(s, f, m, threshold)) - barrier

    if g(top) <= 0.0:
        return 1.0
    if g(rate) >= 0.0:
        return rate
    return float(optimize.brentq(g, rate, top, xtol=1e-14, maxiter=500))


def _mixture_bounds(s: int, f: int, threshold: float, barrier: float, step: Step) -> tuple[float, float]:
    lower, upper = _mixture_lower(s, f, threshold, barrier), _mixture_upper(s, f, threshold, barrier)
    # The decision comes from the closed form at the threshold; the roots agree with it up to the
    # root finder's 1e-14, and are nudged by at most that so "lower >= threshold" reads the same.
    below = math.nextafter(threshold, 0.0)
    lower = max(lower, threshold) if step == "certified" else min(lower, below)
    upper = min(upper, below) if step == "refuted" else max(upper, threshold)
    return lower, upper


class SequentialTest:
    """Anytime-valid certification: feed judged cases one by one, stop at the first decision.

    `update` returns "continue" until the lower bound reaches the threshold ("certified"), the
    upper bound falls below it ("refuted") or n_max cases pass without either ("inconclusive").
    The bounds are valid at whatever point the run stops, so stopping early for any reason (budget,
    a crash, the operator) still leaves an honest `result()`.
    """

    def __init__(self, threshold: float, confidence: float = DEFAULT_CONFIDENCE, n_max: int = DEFAULT_N_MAX) -> None:
        self.threshold = _check_threshold(threshold)
        self.confidence = _check_confidence(confidence)
        self.n_max = _check_n_max(n_max)
        self._barrier = _log_barrier(self.confidence)
        self.passes = 0
        self.n = 0
        self._state: Step = "continue"
        self._bounds: tuple[int, tuple[float, float]] | None = None

    @property
    def state(self) -> Step:
        return self._state

    @property
    def done(self) -> bool:
        return self._state != "continue"

    def update(self, passed: bool) -> Step:
        if self.done:
            raise ValueError(f"the test already stopped at case {self.n} ({self._state}); "
                             "start a new SequentialTest for a new run")
        (x,) = _check_outcomes([passed])
        self.n += 1
        self.passes += x
        step = _step_verdict(self.passes, self.n - self.passes, self.threshold, self._barrier)
        if step == "continue" and self.n >= self.n_max:
            step = "inconclusive"
        self._state = step
        return step

    def _current_bounds(self) -> tuple[float, float]:
        if self._bounds is None or self._bounds[0] != self.n:
            step = self._state if self._state in ("certified", "refuted") else "continue"
            self._bounds = (self.n, _mixture_bounds(self.passes, self.n - self.passes, self.threshold,
                                                    self._barrier, step))
        return self._bounds[1]

    @property
    def lower(self) -> float:
        """Anytime-valid one-sided lower bound on the pass rate after the cases seen so far."""
        return self._current_bounds()[0]

    @property
    def upper(self) -> float:
        """Anytime-valid one-sided upper bound on the pass rate after the cases seen so far."""
        return self._current_bounds()[1]

    def result(self) -> CertificationResult:
        verdict: Verdict = self._state if self._state != "continue" else "inconclusive"
        lower, upper = self._current_bounds()
        return CertificationResult(method=SEQUENTIAL, threshold=self.threshold, confidence=self.confidence,
                                   n=self.n, passes=self.passes, lower=lower, upper=upper, verdict=verdict,
                                   n_max=self.n_max)


@dataclass(frozen=True)
class SequentialBatch:
    """Outcome of many sequential runs at once: verdict and stopping point per run."""

    verdicts: np.ndarray  # str: "certified" / "refuted" / "inconclusive"
    stopped_at: np.ndarray  # int: cases judged when the run stopped (n_max when inconclusive)


def sequential_batch(outcomes: np.ndarray, threshold: float,
                     confidence: float = DEFAULT_CONFIDENCE) -> SequentialBatch:
    """Run the sequential test over each row of a (runs, n_max) boolean array, vectorised.

    Same closed form and barrier as `SequentialTest`, for simulation and planning; certificates are
    recomputed with `recompute`, which replays cases one at a time exactly as the run did.
    """
    x = np.asarray(outcomes)
    if x.ndim != 2 or x.shape[1] < 1 or x.dtype != np.bool_:
        raise ValueError(f"outcomes must be a 2-D boolean array (runs, n_max) with n_max >= 1, "
                         f"got shape {x.shape} dtype {x.dtype}")
    t_, c_ = _check_threshold(threshold), _check_confidence(confidence)
    _check_n_max(x.shape[1])
    barrier = _log_barrier(c_)
    s = np.cumsum(x, axis=1)
    f = np.arange(1, x.shape[1] + 1) - s
    cert = _log_above(s, f, t_, t_) >= barrier
    refute = _log_below(s, f, t_, t_) >= barrier
    decided = cert | refute
    any_ = decided.any(axis=1)
    first = np.where(any_, decided.argmax(axis=1), x.shape[1] - 1)
    rows = np.arange(x.shape[0])
    verdicts = np.where(~any_, "inconclusive", np.where(cert[rows, first], "certified", "refuted"))
    return SequentialBatch(verdicts=verdicts, stopped_at=first + 1)


# ---------------------------------------------------------------------------------- verification

def recompute(outcomes: Sequence[bool], *, method: Method, threshold: float,
              confidence: float = DEFAULT_CONFIDENCE, n_max: int | None = None) -> CertificationResult:
    """The verdict that recorded per-case outcomes give, for checking a certificate.

    Fixed n counts the passes. Sequential replays the cases in order through a fresh
    `SequentialTest`; a record that goes on after the point where the test must have stopped, or
    holds more than n_max cases, was not produced by this test and is rejected.
    """
    xs = _check_outcomes(outcomes)
    if method == FIXED:
        if n_max is not None:
            raise ValueError("n_max applies only to the sequential method; leave it out for clopper-pearson")
        return certify_fixed(sum(xs), len(xs), threshold, confidence)
    if method != SEQUENTIAL:
        raise ValueError(f"method must be {FIXED!r} or {SEQUENTIAL!r}, got {method!r}")
    if n_max is None:
        raise ValueError("the sequential method needs the run's n_max to check where it stopped")
    test = SequentialTest(threshold, confidence, n_max)
    for i, x in enumerate(xs):
        if test.done:
            if test.state == "inconclusive":
                raise ValueError(f"the record holds {len(xs)} cases but the run allowed at most n_max={test.n_max}")
            raise ValueError(f"the record goes on after case {i}, where the sequential test stopped "
                             f"({test.state}); {len(xs) - i} extra case(s): it is not this test's run")
        test.update(x)
    return test.result()


def reproduces(original: CertificationResult, outcomes: Sequence[bool]) -> bool:
    """True when the recorded outcomes give the original decision: same cases, passes, stop and verdict.

    Bounds are compared to 1e-9, which absorbs differences between builds of scipy's special
    functions without letting a different count or stopping point through.
    """
    try:
        again = recompute(outcomes, method=original.method, threshold=original.threshold,
                          confidence=original.confidence, n_max=original.n_max)
    except ValueError:
        return False
    return (again.n == original.n and again.passes == original.passes and again.verdict == original.verdict
            and abs(again.lower - original.lower) <= 1e-9 and abs(again.upper - original.upper) <= 1e-9)
