"""Training losses on per-token log-probabilities of continuations.

Both losses take the log-probability of each continuation token (shape (n,)), never logits, so they
are independent of how the forward pass was done (context-frozen or full) and are easy to test on
fixed numbers.

ORPO (Hong et al. 2024): NLL(chosen) - lambda * log sigmoid(log_odds(chosen) - log_odds(rejected)),
with log_odds(p) = log p - log(1 - p) evaluated on the *mean* per-token log-probability of each
continuation (as TRL does: its `odds_ratio_loss` receives averaged log-probs). The odds term
rewards the preferred continuation only relative to the rejected one, while the NLL term keeps the
preferred text likely in absolute terms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DEFAULT_ORPO_LAMBDA = 0.1
# Mean log-probs are clamped just below 0: at exactly 0 (p = 1) the odds are infinite and the
# gradient of log(1 - p) is undefined. exp(-1e-6) differs from 1 by 1e-6, far from anything a
# real continuation reaches, so the clamp never changes a realistic value.
_MAX_MEAN_LOGP = -1e-6


def sft_loss(logps: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the continuation tokens (the context is not scored)."""
    if logps.numel() == 0:
        raise ValueError("SFT loss of an empty continuation: pass at least one continuation token")
    return -logps.mean()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012).

    Near 0, exp(x) rounds to 1 and log1p(-exp(x)) loses every digit, so log(-expm1(x)) is used there;
    far below 0, expm1 loses digits instead and log1p(-exp(x)) is exact.
    """
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) from log p: log p - log(1 - p)."""
    x = mean_logp.clamp(max=_MAX_MEAN_LOGP)
    return x - log1mexp(x)


@dataclass
class OrpoParts:
    """The loss and its parts, for reporting (floats, detached)."""

    loss: float
    nll: float
    odds_ratio_term: float  # -lambda * log sigmoid(...)
    log_odds_ratio: float
    chosen_mean_logp: float
    rejected_mean_logp: float


def orpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
              lam: float = DEFAULT_ORPO_LAMBDA) -> tuple[torch.Tensor, OrpoParts]:
    """ORPO on one (chosen, rejected) pair of per-token log-prob vectors."""
    if chosen_logps.numel() == 0 or rejected_logps.numel() == 0:
        raise ValueError("ORPO needs non-empty chosen and rejected continuations")
    chosen = chosen_logps.mean()
    rejected = rejected_logps.mean()
    nll = -chosen
    ratio = log_odds(chosen) - log_odds(rejected)
    odds_term = -lam * F.logsigmoid(ratio)
    loss = nll + odds_term
    d = [float(t.detach()) for t in (loss, nll, odds_term, ratio, chosen, rejected)]
    parts = OrpoParts(loss=d[0], nll=d[1], odds_ratio_term=d[2], log_odds_ratio=d[3], chosen_mean_logp=d[4],
                      rejected_mean_logp=d[5])
    return loss, parts
