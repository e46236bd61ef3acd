"""SFT and ORPO on fixed numbers; ORPO agrees with TRL's odds-ratio formula and stays finite where it does not."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from amygdala.training.losses import log1mexp, log_odds, orpo_loss, sft_loss


def trl_orpo(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, nll: torch.Tensor, beta: float) -> torch.Tensor:
    """TRL's ORPOTrainer.odds_ratio_loss (trl/trainer/orpo_trainer.py), on mean per-token log-probs, plus its NLL."""
    log_odds_ = (chosen_mean - rejected_mean) - (
        torch.log1p(-torch.exp(chosen_mean)) - torch.log1p(-torch.exp(rejected_mean)))
    ratio = F.logsigmoid(log_odds_)
    losses = beta * ratio
    return nll - losses.mean()


def test_sft_is_mean_nll_of_continuation() -> None:
    logps = torch.tensor([-0.5, -2.0, -0.25])
    assert sft_loss(logps).item() == pytest.approx((0.5 + 2.0 + 0.25) / 3)
    with pytest.raises(ValueError):
        sft_loss(torch.empty(0))


CASES = [
    ([-0.5, -1.2, -0.3], [-2.0, -0.7], 0.1),
    ([-3.0, -4.5], [-0.2, -0.1, -0.4, -0.3], 0.1),
    ([-0.01, -0.02], [-5.0], 0.5),
    ([-8.0, -9.0, -7.5], [-8.5], 1.0),
]


@pytest.mark.parametrize("chosen,rejected,lam", CASES)
def test_orpo_matches_trl(chosen: list[float], rejected: list[float], lam: float) -> None:
    c, r = torch.tensor(chosen, dtype=torch.float64), torch.tensor(rejected, dtype=torch.float64)
    ours, parts = orpo_loss(c, r, lam)
    ref = trl_orpo(c.mean(), r.mean(), -c.mean(), lam)
    assert abs(ours.item() - ref.item()) < 1e-6
    assert parts.nll == pytest.approx(-sum(chosen) / len(chosen))
    # the odds term by hand: log(p/(1-p)) on the mean log-probs
    pc, pr = math.exp(sum(chosen) / len(chosen)), math.exp(sum(rejected) / len(rejected))
    ratio = math.log(pc / (1 - pc)) - math.log(pr / (1 - pr))
    assert parts.log_odds_ratio == pytest.approx(ratio, rel=1e-9)


def test_orpo_gradient_prefers_chosen() -> None:
    c = torch.tensor([-1.0, -1.5], requires_grad=True)
    r = torch.tensor([-1.2, -0.8], requires_grad=True)
    loss, _ = orpo_loss(c, r, 0.1)
    loss.backward()
    assert (c.grad < 0).all() and (r.grad > 0).all()  # descending raises chosen, lowers rejected


def test_orpo_is_stable_near_certainty() -> None:
    # mean log-prob -1e-9 in float32: exp() rounds to 1 and the naive log1p(-exp(x)) is -inf
    def grads(loss_fn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = torch.tensor([-1e-9, -1e-9], requires_grad=True)
        r = torch.tensor([-3.0], requires_grad=True)
        loss = loss_fn(c, r)
        loss.backward()
        return loss.detach(), c.grad, r.grad

    naive = grads(lambda c, r: trl_orpo(c.mean(), r.mean(), -c.mean(), 0.1))
    assert not all(torch.isfinite(t).all() for t in naive)
    ours = grads(lambda c, r: orpo_loss(c, r, 0.1)[0])
    assert all(torch.isfinite(t).all() for t in ours)


def test_log1mexp_accurate_at_both_ends() -> None:
    xs = [-1e-7, -1e-3, -0.5, -0.7, -5.0, -40.0]
    # float64 references, each formula where it is exact in double precision
    exact = torch.tensor([math.log(-math.expm1(x)) if x > -0.5 else math.log1p(-math.exp(x)) for x in xs], dtype=torch.float64)
    ours = log1mexp(torch.tensor(xs, dtype=torch.float32)).double()
    assert torch.allclose(ours, exact, rtol=2e-6, atol=0), (ours, exact)
    naive = torch.log1p(-torch.exp(torch.tensor(xs, dtype=torch.float32))).double()
    assert not torch.allclose(naive, exact, rtol=2e-6, atol=0)  # the case the stable form exists for
    assert torch.isfinite(log_odds(torch.tensor(0.0)))  # clamped below certainty
