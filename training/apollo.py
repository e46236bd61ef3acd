"""APOLLO (arXiv 2412.05270) for weight matrices and AdamW for everything else, in one optimizer.

Why our own implementation rather than `apollo_torch.APOLLOAdamW`: its per-parameter state holds a
projector *object*, which can only be persisted with pickle, and training state must survive
between jobs as safetensors + JSON. Here the state is tensors and integers only: the random
projection is never stored, it is regenerated from its seed. The arithmetic follows apollo-torch
1.0.3 operation for operation (tests/test_training_apollo.py checks our updates against it on the
same seeds and gradients), so published APOLLO results carry over.

The algorithm, per matrix parameter W (m x n) with gradient G:
- every `update_proj_gap` steps a Gaussian projection P with entries N(0, 1/rank) is drawn from a
  seed (the seed then advances deterministically); G is projected to rank r: G P^T (m >= n) or P^T G;
- Adam moments live in that low-rank space, so the state is r * max(m, n) per moment, not m * n;
- the update is the *raw* gradient G scaled channel-wise (rank > 1: one factor per row or column)
  or tensor-wise (rank 1, APOLLO-Mini) by ||low-rank Adam update|| / ||low-rank gradient||;
- a norm-growth limiter (Fira) caps the update norm's growth at 1.01x per step; the update is
  multiplied by sqrt(scale) (APOLLO-Mini uses scale 128 to make up for the rank-1 estimate).

Parameters APOLLO does not suit, vectors (norm scales, biases) and, when trained at all, the
embedding matrix, go in groups with `rank=None`, which this optimizer runs as plain AdamW
(apollo-torch's code path: bias-corrected Adam, decoupled weight decay). The embedding is kept out
of APOLLO because its gradient is row-sparse on the input side (only the tokens seen) and a random
projection smears it over the whole vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.optim import Optimizer

DEFAULT_RANK = 64
DEFAULT_UPDATE_PROJ_GAP = 200
APOLLO_SCALE = 1.0  # the authors' setting for channel-wise APOLLO
APOLLO_MINI_SCALE = 128.0  # the authors' setting for rank-1, tensor-wise APOLLO-Mini
NORM_GROWTH_LIMIT = 1.01
SEED_ADVANCE = 0xF  # random integers drawn to derive the next projection seed (apollo-torch's value)

OptimizerKind = Literal["apollo", "apollo-mini", "adamw"]
ScaleType = Literal["channel", "tensor"]

# Per-parameter state entries that are tensors (persisted as safetensors) or integers (JSON).
STATE_TENSORS = ("exp_avg", "exp_avg_sq", "scaled_grad_norm")
STATE_INTS = ("step", "seed", "proj_seed")


def next_seed(seed: int, advance: int = SEED_ADVANCE) -> int:
    """The seed of the next projection, derived from the current one (apollo-torch's rule)."""
    gen = torch.Generator().manual_seed(seed)
    return int(torch.randint(0, torch.iinfo(torch.int64).max, (advance,), generator=gen).tolist()[-1])


def random_projection(shape: torch.Size | tuple[int, ...], rank: int, seed: int, device: torch.device,
                      dtype: torch.dtype) -> torch.Tensor:
    """The Gaussian projection for a matrix of `shape`: (m, rank) when m < n, else (rank, n), entries N(0, 1/rank)."""
    m, n = shape
    proj_shape = (m, rank) if m < n else (rank, n)
    work = dtype if dtype == torch.float32 else torch.float32
    gen = torch.Generator(device=device).manual_seed(seed)
    proj = torch.randn(proj_shape, generator=gen, device=device, dtype=work) / math.sqrt(rank)
    return proj if work == dtype else proj.to(dtype)


def project(grad: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """Gradient in the low-rank space: G P^T for tall (m >= n) matrices, P^T G for wide ones."""
    m, n = grad.shape
    return grad @ proj.t() if m >= n else proj.t() @ grad


class Apollo(Optimizer):
    """APOLLO for groups with an integer `rank`, AdamW for groups with `rank=None`.

    Group keys: lr, betas, eps, weight_decay, correct_bias, rank, scale, scale_type
    ("channel" | "tensor"), update_proj_gap. Each APOLLO parameter's first projection seed is its
    1-based position among all parameters of all groups, as in apollo-torch, so a fixed parameter
    order gives the same projections in every process.
    """

    def __init__(self, params: Iterable[nn.Parameter] | Iterable[dict[str, Any]], lr: float = 1e-5,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 correct_bias: bool = True, rank: int | None = None, scale: float = APOLLO_SCALE,
                 scale_type: ScaleType = "channel", update_proj_gap: int = DEFAULT_UPDATE_PROJ_GAP):
        if lr < 0:
            raise ValueError(f"learning rate {lr} is negative; pass a value > 0 such as 1e-5")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas {betas} must both be in [0, 1)")
        if eps < 0:
            raise ValueError(f"eps {eps} must be >= 0")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "correct_bias": correct_bias,
                    "rank": rank, "scale": scale, "scale_type": scale_type, "update_proj_gap": update_proj_gap}
        super().__init__(params, defaults)
        self._projections: dict[nn.Parameter, torch.Tensor] = {}  # cache only: always rebuilt from proj_seed
        index = 0
        for group in self.param_groups:
            _check_group(group)
            for p in group["params"]:
                index += 1
                if group["rank"] is not None:
                    if p.dim() != 2:
                        raise ValueError(f"APOLLO group holds a parameter of shape {tuple(p.shape)}; only matrices "
                                         "can be projected: put vectors in a group with rank=None (AdamW)")
                    self.state[p]["seed"] = index

    # -- the step ------------------------------------------------------------------------------
    def _projection(self, p: nn.Parameter, state: dict, group: dict) -> torch.Tensor:
        step = state.get("step", 0)
        proj = self._projections.get(p)
        if proj is None and state.get("proj_seed") is not None and step % group["update_proj_gap"] != 0:
            proj = random_projection(p.shape, group["rank"], state["proj_seed"], p.device, p.dtype)  # after a load
        if proj is None or step % group["update_proj_gap"] == 0:
            seed = state["seed"]
            proj = random_projection(p.shape, group["rank"], seed, p.device, p.dtype)
            state["proj_seed"] = seed
            state["seed"] = next_seed(seed)
        self._projections[p] = proj
        return proj

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 (torch's signature)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            apollo = group["rank"] is not None
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("APOLLO/AdamW do not support sparse gradients")
                state = self.state[p]
                state.setdefault("step", 0)
                if apollo:
                    norm_dim = 0 if grad.shape[0] < grad.shape[1] else 1
                    low = project(grad, self._projection(p, state, group))
                else:
                    low = grad
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(low)
                    state["exp_avg_sq"] = torch.zeros_like(low)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1

                exp_avg.mul_(beta1).add_(low, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(low, low, value=1.0 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                step_size = group["lr"]
                if group["correct_bias"]:
                    bias_correction1 = 1.0 - beta1 ** state["step"]
                    bias_correction2 = 1.0 - beta2 ** state["step"]
                    step_size = step_size * math.sqrt(bias_correction2) / bias_correction1
                update = exp_avg / denom

                if apollo:
                    if group["scale_type"] == "channel":
                        factor = torch.norm(update, dim=norm_dim) / (torch.norm(low, dim=norm_dim) + 1e-8)
                        if norm_dim == 1:
                            factor = factor.unsqueeze(1)
                    else:
                        factor = torch.norm(update) / (torch.norm(low) + 1e-8)
                    scaled = grad * factor
                    # Norm-growth limiter: the update's norm may grow at most 1.01x per step.
                    if "scaled_grad_norm" in state:
                        norm = torch.norm(scaled)
                        limiter = max(norm / (state["scaled_grad_norm"] + 1e-8), NORM_GROWTH_LIMIT) / NORM_GROWTH_LIMIT
                        if isinstance(limiter, torch.Tensor):  # a float here is exactly 1.0: dividing is a no-op
                            scaled.div_(limiter)
                        state["scaled_grad_norm"] = norm / limiter
                    else:
                        state["scaled_grad_norm"] = torch.norm(scaled)
                    update = scaled
                    if group["scale"] != 1.0:  # multiplying by sqrt(1) would be a pass over the matrix for nothing
                        update.mul_(math.sqrt(group["scale"]))

                p.add_(update, alpha=-step_size)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss

    # -- persistence: tensors and integers only, keyed by parameter name --------------------------
    def export_state(self, names: Mapping[nn.Parameter, str]) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, int | None]]]:
        """(tensors keyed "name/entry", integers keyed by name): a copy, safe to keep while training goes on."""
        tensors: dict[str, torch.Tensor] = {}
        ints: dict[str, dict[str, int | None]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                name = names[p]
                state = self.state.get(p, {})
                for key in STATE_TENSORS:
                    if key in state:
                        tensors[f"{name}/{key}"] = state[key].detach().clone().contiguous()
                ints[name] = {key: (int(state[key]) if state.get(key) is not None else None) for key in STATE_INTS}
        return tensors, ints

    def import_state(self, names: Mapping[nn.Parameter, str], tensors: Mapping[str, torch.Tensor],
                     ints: Mapping[str, Mapping[str, int | None]]) -> None:
        """Replace the state with an exported one; projections are regenerated from their seeds on the next step."""
        by_name = {names[p]: (p, group) for group in self.param_groups for p in group["params"]}
        missing = sorted(set(by_name) - set(ints))
        extra = sorted(set(ints) - set(by_name))
        if missing or extra:
            raise ValueError(f"optimizer state does not match the parameters: missing {missing[:5]}, unexpected {extra[:5]}")
        new_state: dict[nn.Parameter, dict] = {}
        for name, (p, group) in by_name.items():
            state: dict[str, Any] = {k: v for k, v in ints[name].items() if v is not None}
            for key in STATE_TENSORS:
                t = tensors.get(f"{name}/{key}")
                if t is None:
                    continue
                expected = _state_shape(p, group, key)
                if tuple(t.shape) != expected:
                    raise ValueError(f"optimizer state {name}/{key} has shape {tuple(t.shape)}, expected {expected}: "
                                     "it was saved for a different model or rank")
                state[key] = t.detach().clone().to(device=p.device, dtype=p.dtype)
            if group["rank"] is not None and "seed" not in state:
                raise ValueError(f"optimizer state for {name} has no projection seed")
            new_state[p] = state
        self.state.clear()
        self.state.update(new_state)
        self._projections.clear()


def _check_group(group: dict) -> None:
    rank = group["rank"]
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank {rank!r} must be a positive integer (or None for AdamW)")
    if group["scale_type"] not in ("channel", "tensor"):
        raise ValueError(f"scale_type {group['scale_type']!r} must be 'channel' or 'tensor'")
    if group["update_proj_gap"] < 1:
        raise ValueError(f"update_proj_gap {group['update_proj_gap']} must be >= 1")
    if group["scale"] <= 0:
        raise ValueError(f"scale {group['scale']} must be > 0")


def _state_shape(p: nn.Parameter, group: dict, key: str) -> tuple[int, ...]:
    if key == "scaled_grad_norm":
        return ()
    if group["rank"] is None:
        return tuple(p.shape)
    m, n = p.shape
    return (group["rank"], n) if m < n else (m, group["rank"])


@dataclass(frozen=True)
class OptimizerSpec:
    """Which optimizer and its hyperparameters; `scale=None` takes the variant's published default."""

    kind: OptimizerKind = "apollo"
    rank: int = DEFAULT_RANK
    scale: float | None = None
    update_proj_gap: int = DEFAULT_UPDATE_PROJ_GAP
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    weight_decay: float = 0.0


def is_apollo_suited(p: nn.Parameter, embedding_ids: set[int]) -> bool:
    """Matrices go to APOLLO; vectors and embedding/output-head matrices go to AdamW."""
    return p.dim() == 2 and id(p) not in embedding_ids


def build_optimizer(named: list[tuple[str, nn.Parameter]], spec: OptimizerSpec,
                    embedding_ids: set[int] | None = None) -> Apollo:
    """One optimizer over `named` (in that order, which fixes the projection seeds)."""
    embedding_ids = embedding_ids or set()
    common = {"lr": spec.lr, "betas": spec.betas, "eps": spec.eps, "weight_decay": spec.weight_decay}
    if spec.kind == "adamw":
        return Apollo([{"params": [p for _, p in named], "rank": None}], **common)
    if spec.kind == "apollo":
        low = {"rank": spec.rank, "scale": spec.scale or APOLLO_SCALE, "scale_type": "channel"}
    elif spec.kind == "apollo-mini":
        low = {"rank": 1, "scale": spec.scale or APOLLO_MINI_SCALE, "scale_type": "tensor"}
    else:
        raise ValueError(f"optimizer {spec.kind!r}: choose 'apollo', 'apollo-mini' or 'adamw'")
    matrices = [p for _, p in named if is_apollo_suited(p, embedding_ids)]
    others = [p for _, p in named if not is_apollo_suited(p, embedding_ids)]
    groups = []
    # APOLLO group first, then AdamW: with `named` in model order this fixes every projection seed.
    if matrices:
        groups.append({"params": matrices, **low, "update_proj_gap": spec.update_proj_gap})
    if others:
        groups.append({"params": others, "rank": None})
    return Apollo(groups, **common)


def state_bytes(opt: Optimizer) -> dict[str, int]:
    """Bytes of optimizer state: `persisted` (moments, norms) and `projections` (regenerated, memory only)."""
    persisted = 0
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                persisted += v.numel() * v.element_size()
    projections = sum(t.numel() * t.element_size() for t in getattr(opt, "_projections", {}).values())
    return {"persisted": persisted, "projections": projections, "total": persisted + projections}
