"""The sampling-temperature controller of the dream loop: keeps on-policy failures near a target rate.

Why a controller: a dream cycle learns only from the on-policy samples that fail an invariant (each
failure becomes an ORPO triplet). If nearly every sample passes there is nothing to train on; if
nearly every sample fails, the triplets say little more than "be different" and one night pushes
the model far from its own distribution. Learning happens in between, so the controller holds the
failure rate of the cycle's samples at a target (default 0.3: p(1-p), the "learnability" weight of
curriculum work, is still 84% of its maximum, and most samples still pass). The model changes every
night (training makes it fail less at a given temperature; a rollback or a new invariant makes it
fail more), so no fixed temperature stays in that zone: this is a closed loop, one round per cycle.

Direction (the sign), decided here. Temperature T divides the logits: at low T the model says what
it most believes (its modal behaviour), at high T it wanders into the tails of its distribution,
where a rule it mostly holds breaks more often. So for a fixed model the failure rate rises with T,
and the loop does

    failure rate above target -> lower T;  below target -> raise T.

That is negative feedback (the step opposes the error through an increasing f(T)), so the loop
settles where f(T) = target. The opposite sign is positive feedback: more failures -> higher T ->
still more failures, so T runs away from the target instead of settling (the tests run the same
controller with the sign flipped as a negative control: it never settles).
This is how the original design's "many failures -> explore broadly, few failures -> probe the
edges" reads here. Few failures: the model holds the rule on what it usually says, so raise T and
probe the edges of its distribution, where it still breaks. Many failures: its *typical* replies
already break the rule, so tail samples are not needed; lower T and spend the cycle on those typical
replies, across the breadth of cases and invariants (breadth comes from the case sampler, not from
temperature). Reading "explore broadly" as "raise T" would be the positive feedback loop above.

How. The controller integrates in log T (T acts multiplicatively on the logits, so a step of 0.1
in log T is equally strong at T = 0.3 and at T = 1.5), aiming each round at the temperature that a
small model of the failure curve says gives the target:

    logit f(T) = level + slope * log T            (level drifts by `trend` per round)

The three numbers are tracked by a Kalman filter over the rounds (all linear: the logit of the
observed rate is the measurement, log T is known). Then

    aim   = (logit(target) - level) / slope
    log T += clip(gain * (aim - log T), -max_step, +max_step),   then T is clamped to the bounds.

Why this and not a plain integrator (log T += gain * (target - rate)), measured on the simulator of
tests/test_dream_temperature.py (40 seeds x 8 simulated models) before choosing: the plain
integrator's effective gain is gain * slope * f(1-f), and the slope (how strongly a model's failure
rate reacts to T) is unknown and differs between models and invariants. A gain high enough to follow
a steadily improving model chases sampling noise on a steep one, and a gain low enough for the steep
one lags the improving one by about its rate of improvement divided by the gain: the best gains
(0.5, 1.0) left 20 and 19 of the 320 runs off target after round 15 (gain 0.5: 19 of 40 fast
learners; gain 1.0: 11 of 40 steep models), gain 2.0 left 89. The filter left none of those 320
(and 2 of 320 on seeds not used to choose the defaults, each one round 0.1-0.12 off). It estimates
the slope from the rounds themselves (prior 2 +- 1: going from T = 0.3 to 1.5 moves a failure rate
of 0.3 to about 0.9), learns a steady improvement as a trend and aims ahead of it, and its gain is
large while it knows little (the first rounds move fast) and small once it has seen many rounds
(noise is averaged over rounds instead of chased).
- Counts, not ratios: a round's measurement is the logit of (failures + 0.5) / (samples + 1) with
  variance `overdispersion` / ((samples + 1) f (1 - f)), the binomial variance inflated because a
  case's several samples are correlated. A round of 4 samples therefore moves T far less than a
  round of 100, and a round of 0 samples is no measurement and changes nothing.
- Smooth: the per-round step cap (default 0.25 in log T, a factor of 1.28, while the default
  bounds span 1.61) means T can never jump from one bound to the other (no bang-bang), and one
  noisy round moves it by at most one cap.
- Bounded without wind-up: T is clamped, and the filter describes the failure curve, not an
  accumulated error, so a model that fails far too little everywhere parks T at the upper bound and
  the first round with too many failures moves it down at once.
- Sudden changes (a rollback, a new invariant): an innovation beyond `jump_z` standard deviations
  widens the level's uncertainty to match it, so the filter re-learns the level at once instead of
  slowly bending its trend (which overshoots); after a 1.5-logit jump the simulated models were back
  in the band after a median of 2-4 rounds, at most 10. The trend is damped (`trend_damping` per
  round) for the same reason: a trend that is no longer there fades instead of pushing forever.
- Noise floor: one round of n samples measures the rate with standard error sqrt(f(1-f)/n) (0.065
  at n = 50, 0.046 at 100), more when a case's samples agree with each other. Holding the true rate
  within +-0.1 of the target round after round needs about 40 or more samples a round: on the
  simulator 40-120 samples a round kept all 320 runs in the band after round 15, 24-60 missed 24 of
  320 (mostly the fast learner) and 12-32 missed 65; temperatures stayed in bounds and never
  oscillated in any of them. With 4 samples per case that is 10 or more cases per cycle.

State (`TemperatureState`, pydantic) holds everything needed to resume: the temperature, the target
and bounds it ran with, the rounds so far, the last measured failure rate, the last rounds'
(temperature, failure rate, samples), and the filter's belief (mean and covariance). The loop
stores it in the memory graph between nightly cycles and passes it back in.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import DreamError

DEFAULT_TARGET = 0.3
DEFAULT_BOUNDS = (0.3, 1.5)
DEFAULT_HISTORY = 50
SLOPE_FLOOR = 0.25  # the aim divides by the slope: below this one noisy estimate would send T to a bound
SLOPE_CEILING = 20.0
LEVEL_PRIOR_SD = 2.0  # first round: the failure logit at T = 1 is barely known (+-2 covers 0.12..0.88 around 0.5)
TREND_PRIOR_SD = 0.1  # logits per round: a model improving by 0.1 logit a night is already a fast learner
SLOPE_DRIFT_SD = 0.01  # the slope may change slowly as the model and the invariant mix change


class TemperatureSettings(BaseModel):
    """How the controller steers; every field is checked and an error says how to fix it."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    target: float = Field(DEFAULT_TARGET, description="Failure rate to hold the on-policy samples at, in (0, 1).")
    bounds: tuple[float, float] = Field(DEFAULT_BOUNDS, description="(lowest, highest) sampling temperature, both > 0.")
    initial: float = Field(0.8, description="Temperature of the first round, within the bounds.")
    gain: float = Field(1.0, description="Fraction of the way to the aimed temperature taken per round, in (0, 1.5].")
    max_step: float = Field(0.25, description="Largest change of log T in one round, > 0 (0.25: a factor of 1.28).")
    slope_prior: float = Field(2.0, description="Expected change of the failure logit per unit of log T, > 0.")
    slope_prior_sd: float = Field(1.0, description="Uncertainty of slope_prior, > 0.")
    overdispersion: float = Field(2.0, description="Variance of a round's rate over the binomial one, >= 1 "
                                                   "(samples of one case are correlated).")
    level_drift: float = Field(0.02, description="Per-round random change of the failure logit, >= 0.")
    trend_drift: float = Field(0.003, description="Per-round random change of the trend (logits per round), >= 0.")
    trend_damping: float = Field(0.95, description="Fraction of the trend kept each round, in [0, 1].")
    jump_z: float = Field(3.0, description="Innovation, in standard deviations, treated as a sudden change, > 1.")
    history: int = Field(DEFAULT_HISTORY, description="Rounds kept in the state's history, >= 1.")

    @model_validator(mode="after")
    def _check(self) -> TemperatureSettings:
        lo, hi = self.bounds
        if lo <= 0 or hi <= 0:
            raise ValueError(f"bounds {self.bounds}: temperatures must be positive (T divides the logits); "
                             f"use e.g. {DEFAULT_BOUNDS}")
        if lo >= hi:
            raise ValueError(f"bounds {self.bounds}: the lower bound must be below the upper one; "
                             f"give (lowest, highest), e.g. {DEFAULT_BOUNDS}")
        if not 0 < self.target < 1:
            raise ValueError(f"target {self.target}: a failure rate strictly between 0 and 1 is needed "
                             f"(no temperature holds 0 or 1); use e.g. {DEFAULT_TARGET}")
        if not lo <= self.initial <= hi:
            raise ValueError(f"initial {self.initial}: must lie within bounds {self.bounds}; "
                             f"pick a temperature between them")
        if not 0 < self.gain <= 1.5:
            raise ValueError(f"gain {self.gain}: must be in (0, 1.5] (1 aims straight at the estimated "
                             f"temperature, less damps, more overshoots); use e.g. 1.0")
        if self.max_step <= 0:
            raise ValueError(f"max_step {self.max_step}: must be > 0 (the largest change of log T per round); "
                             f"use e.g. 0.25")
        if not SLOPE_FLOOR <= self.slope_prior <= SLOPE_CEILING:
            raise ValueError(f"slope_prior {self.slope_prior}: must be in [{SLOPE_FLOOR}, {SLOPE_CEILING}] "
                             f"(failures rise with temperature); use e.g. 2.0")
        if self.slope_prior_sd <= 0:
            raise ValueError(f"slope_prior_sd {self.slope_prior_sd}: must be > 0 (0 would never learn the "
                             f"slope); use e.g. 1.0")
        if self.overdispersion < 1:
            raise ValueError(f"overdispersion {self.overdispersion}: must be >= 1 (1 is binomial; "
                             f"correlated samples only add variance); use e.g. 2.0")
        if self.level_drift < 0 or self.trend_drift < 0:
            raise ValueError(f"level_drift {self.level_drift} / trend_drift {self.trend_drift}: standard "
                             f"deviations must be >= 0; use e.g. 0.02 and 0.003")
        if not 0 <= self.trend_damping <= 1:
            raise ValueError(f"trend_damping {self.trend_damping}: must be in [0, 1] (0 drops the trend, "
                             f"1 keeps it undamped); use e.g. 0.95")
        if self.jump_z <= 1:
            raise ValueError(f"jump_z {self.jump_z}: must be > 1 (lower would call ordinary noise a jump); "
                             f"use e.g. 2.5")
        if self.history < 1:
            raise ValueError(f"history {self.history}: keep at least 1 round; use e.g. {DEFAULT_HISTORY}")
        return self


class TemperatureRound(BaseModel):
    """One past round: the temperature its samples were drawn at, and how they fared."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    temperature: float = Field(gt=0)
    failure_rate: float = Field(ge=0, le=1, description="failures / samples of the round (raw, not smoothed).")
    samples: int = Field(ge=1)


class FailureBelief(BaseModel):
    """The filter's estimate of the failure curve, logit f(T) = level + slope * log T, and its covariance."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    level: float = Field(description="Failure logit at T = 1, for the next round.")
    trend: float = Field(description="Change of the level per round (negative: the model is improving).")
    slope: float = Field(description="Change of the failure logit per unit of log T.")
    covariance: list[list[float]] = Field(description="3x3 covariance of (level, trend, slope).")

    @model_validator(mode="after")
    def _check(self) -> FailureBelief:
        cov = np.asarray(self.covariance, dtype=float)
        if cov.shape != (3, 3):
            raise ValueError(f"covariance: must be 3x3 (level, trend, slope), got shape {cov.shape}; "
                             f"reset the controller state")
        if not np.allclose(cov, cov.T, rtol=1e-9, atol=1e-12) or np.linalg.eigvalsh(cov).min() < -1e-9:
            raise ValueError("covariance: must be symmetric positive semi-definite; the state was edited or "
                             "corrupted: reset the controller state")
        return self


class TemperatureState(BaseModel):
    """What persists between cycles (the loop stores it in the memory graph as JSON)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    temperature: float = Field(description="Temperature for the next round's samples.")
    target: float = DEFAULT_TARGET
    bounds: tuple[float, float] = DEFAULT_BOUNDS
    rounds: int = Field(0, ge=0, description="Rounds with at least one sample so far.")
    last_failure_rate: float | None = Field(None, ge=0, le=1)
    history: list[TemperatureRound] = Field(default_factory=list, description="Last rounds, oldest first.")
    belief: FailureBelief | None = Field(None, description="None: not started, the prior is used.")

    @model_validator(mode="after")
    def _check(self) -> TemperatureState:
        # The settings' rules, so a hand-edited or corrupted state is refused with the reason.
        TemperatureSettings(target=self.target, bounds=self.bounds, initial=self.bounds[0])
        lo, hi = self.bounds
        if not lo <= self.temperature <= hi:
            raise ValueError(f"temperature {self.temperature}: outside bounds {self.bounds}; the controller "
                             f"never leaves them, so the state was edited: reset it")
        return self


class TemperatureController:
    """Closed-loop sampling temperature for on-policy samples: one `update` per dream round.

    Settings win over a stored state's target and bounds (the operator may change them between
    nights); the stored temperature is then clamped into the new bounds, and the belief about the
    failure curve is kept (it does not depend on either). With a state and no settings, the state's
    target and bounds are used, with the other settings at their defaults.
    """

    def __init__(self, settings: TemperatureSettings | None = None, state: TemperatureState | None = None):
        if settings is None:
            settings = (TemperatureSettings() if state is None else
                        TemperatureSettings(target=state.target, bounds=state.bounds, initial=state.temperature))
        self.settings = settings
        lo, hi = settings.bounds
        self._temperature = settings.initial if state is None else min(max(state.temperature, lo), hi)
        self._rounds = 0 if state is None else state.rounds
        self._last: float | None = None if state is None else state.last_failure_rate
        self._history: list[TemperatureRound] = [] if state is None else list(state.history)[-settings.history:]
        if state is not None and state.belief is not None:
            b = state.belief
            self._mean = np.array([b.level, b.trend, b.slope], dtype=float)
            self._cov = np.array(b.covariance, dtype=float)
        else:
            x0 = math.log(self._temperature)
            s = settings
            # Prior: the first temperature is assumed to be on target, with a wide uncertainty.
            self._mean = np.array([_logit(s.target) - s.slope_prior * x0, 0.0, s.slope_prior])
            self._cov = np.diag([LEVEL_PRIOR_SD ** 2 + (s.slope_prior_sd * x0) ** 2, TREND_PRIOR_SD ** 2,
                                 s.slope_prior_sd ** 2])
            self._cov[0, 2] = self._cov[2, 0] = -(s.slope_prior_sd ** 2) * x0  # level = L* - slope * x0

    @property
    def temperature(self) -> float:
        """The temperature to draw this round's on-policy samples at."""
        return self._temperature

    @property
    def state(self) -> TemperatureState:
        """A copy of the controller's state, to persist; `TemperatureController(settings, state)` resumes it."""
        m, c = self._mean, self._cov
        belief = FailureBelief(level=float(m[0]), trend=float(m[1]), slope=float(m[2]),
                               covariance=[[float(v) for v in row] for row in c])
        return TemperatureState(temperature=self._temperature, target=self.settings.target,
                                bounds=self.settings.bounds, rounds=self._rounds, last_failure_rate=self._last,
                                history=list(self._history), belief=belief)

    def predicted_failure_rate(self, temperature: float | None = None) -> float:
        """The filter's estimate of the failure rate at `temperature` (default: the current one) this round."""
        t = self._temperature if temperature is None else temperature
        if not t > 0:
            raise DreamError(f"temperature={t!r}: must be > 0")
        return _sigmoid(self._mean[0] + self._slope() * math.log(t))

    def update(self, failures: int, samples: int) -> float:
        """Record a round sampled at `temperature` (`failures` of `samples` failed); return the next temperature.

        `samples == 0` is no measurement: nothing changes and no round is counted.
        """
        _check_counts(failures, samples)
        failures, samples = int(failures), int(samples)
        if samples == 0:
            return self._temperature
        s = self.settings
        x = math.log(self._temperature)
        rate = failures / samples
        self._history.append(TemperatureRound(temperature=self._temperature, failure_rate=rate, samples=samples))
        del self._history[:-s.history]
        self._rounds += 1
        self._last = rate

        # Measurement: the logit of a smoothed rate, with its (inflated) binomial variance.
        f = (failures + 0.5) / (samples + 1)
        y = _logit(f)
        r_var = s.overdispersion / ((samples + 1) * f * (1 - f))
        h = np.array([1.0, 0.0, x])
        innovation = y - h @ self._mean
        s_var = h @ self._cov @ h + r_var
        if innovation ** 2 > s.jump_z ** 2 * s_var:
            # A sudden change: let the level's variance explain the surprise (its excess over the expected).
            self._cov[0, 0] += innovation ** 2 - s_var
            s_var = h @ self._cov @ h + r_var
        k = self._cov @ h / s_var
        self._mean = self._mean + k * innovation
        ikh = np.eye(3) - np.outer(k, h)
        self._cov = ikh @ self._cov @ ikh.T + np.outer(k, k) * r_var  # Joseph form: stays PSD

        # Predict the next round: the level moves by the (damped) trend.
        phi = s.trend_damping
        fm = np.array([[1.0, phi, 0.0], [0.0, phi, 0.0], [0.0, 0.0, 1.0]])
        self._mean = fm @ self._mean
        self._cov = fm @ self._cov @ fm.T + np.diag([s.level_drift ** 2, s.trend_drift ** 2, SLOPE_DRIFT_SD ** 2])
        self._cov = (self._cov + self._cov.T) / 2

        lo, hi = s.bounds
        aim = (_logit(s.target) - self._mean[0]) / self._slope()
        step = min(max(s.gain * (aim - x), -s.max_step), s.max_step)
        self._temperature = min(max(math.exp(x + step), lo), hi)  # clamp after exp: exp(log hi) may pass hi by an ulp
        return self._temperature

    def _slope(self) -> float:
        return min(max(float(self._mean[2]), SLOPE_FLOOR), SLOPE_CEILING)


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))


def _check_counts(failures: int, samples: int) -> None:
    for name, value in (("failures", failures), ("samples", samples)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise DreamError(f"{name}={value!r}: must be a whole number of samples (int), got "
                             f"{type(value).__name__}; pass the count, not a rate")
        if value < 0:
            raise DreamError(f"{name}={value}: counts cannot be negative; pass how many samples were judged")
    if failures > samples:
        raise DreamError(f"failures={failures} > samples={samples}: failures count the failing ones among the "
                         f"round's samples; pass failures <= samples")
