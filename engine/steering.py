"""Steering: add concept directions to the residual stream for one call only.

Unit of alpha: a push of alpha = 1 at layer l adds a vector whose norm equals that layer's typical
token residual norm (mean L2 norm over corpus tokens, BOS excluded, stored in the readout as
`layer_<l>.residual_norm`). So alpha = 0.1 is "10% of a typical residual", the same push at every
layer and on every model, whatever its residual scale. Useful values on the embedded model are a
few hundredths (Gemma 3's residual norm is dominated by a few massive dimensions, so 0.03 of
it is already a strong push; see `amygdala steer sweep`).

Isolation: the hooks exist only inside `steer(...)` / `generate_steered(...)`, which hold the
model's lock, so a concurrent readout waits rather than seeing another call's steering, and the
model's weights are never touched (steering is an activation edit, not a weight edit).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from .generation import DecodeState, GenerationResult, generate
from .hooks import ResidualFn, layer_hooks

if TYPE_CHECKING:
    from .model import LoadedModel
    from .readout import ReadoutManager

Positions = Literal["prompt", "generated", "both"]
POSITIONS: tuple[str, ...] = ("prompt", "generated", "both")


class SteeringError(ValueError):
    """Bad steering request; the message lists the valid choices."""


@dataclass
class SteeringPlan:
    """Per-layer vectors to add (already scaled), and where to add them."""

    pushes: dict[int, torch.Tensor] = field(default_factory=dict)
    positions: Positions = "both"

    def add(self, layer: int, vector: torch.Tensor) -> None:
        v = vector.detach().float()
        self.pushes[layer] = self.pushes[layer] + v if layer in self.pushes else v

    def is_empty(self) -> bool:
        return not self.pushes or all(float(v.abs().max()) == 0.0 for v in self.pushes.values())

    def layer_fns(self, state: DecodeState) -> dict[int, ResidualFn]:
        def make(vec: torch.Tensor) -> ResidualFn:
            def fn(_: int, residual: torch.Tensor) -> torch.Tensor | None:
                active = self.positions == "both" or (
                    (state.phase == "prompt") == (self.positions == "prompt"))
                if not active:
                    return None
                return residual + vec.to(device=residual.device, dtype=residual.dtype)

            return fn

        return {i: make(v) for i, v in self.pushes.items()}


def parse_concept_alphas(specs: list[str]) -> dict[str, float]:
    """['joyful=0.3', 'calm=-0.2'] -> {'joyful': 0.3, 'calm': -0.2}."""
    out: dict[str, float] = {}
    for s in specs:
        name, sep, value = s.partition("=")
        if not sep or not name.strip():
            raise SteeringError(f"concept spec {s!r} must look like NAME=ALPHA, e.g. joyful=0.03")
        try:
            out[name.strip()] = out.get(name.strip(), 0.0) + float(value)
        except ValueError:
            raise SteeringError(f"alpha in {s!r} is not a number") from None
    return out


def build_plan(readout: "ReadoutManager", concepts: dict[str, float], layers: list[int] | None,
               positions: str = "both", vectors: list[tuple[Path | str, float]] | None = None) -> SteeringPlan:
    """Resolve concept names and vector files into per-layer pushes, validating everything first."""
    if positions not in POSITIONS:
        raise SteeringError(f"positions must be one of {', '.join(POSITIONS)}; got {positions!r}")
    if not concepts and not vectors:
        raise SteeringError("nothing to steer with: pass at least one concept (NAME=ALPHA) or a vector file")
    layers = readout.check_layers(layers) if layers is not None else readout.default_layers
    plan = SteeringPlan(positions=positions)  # type: ignore[arg-type]
    for name, alpha in concepts.items():
        if not isinstance(alpha, (int, float)) or not torch.isfinite(torch.tensor(float(alpha))):
            raise SteeringError(f"alpha for {name!r} must be a finite number")
        try:
            k = readout.concept_index(name)
        except KeyError as exc:
            raise SteeringError(exc.args[0]) from None
        for i in layers:
            lr = readout.layers[i]
            plan.add(i, float(alpha) * float(lr.residual_norm) * lr.directions[k])
    for path, alpha in vectors or []:
        from .control_vectors import read_vector_file

        try:
            cv = read_vector_file(path)
            cv.validate(hidden_size=readout.manifest.hidden_size,
                        n_layers=readout.lm.n_layers if readout.lm is not None else None)
        except ValueError as exc:
            raise SteeringError(str(exc)) from None
        use = [i for i in layers if i in cv.directions]
        if not use:
            raise SteeringError(f"vector file {path} has layers {sorted(cv.directions)}, none of the requested layers {layers}")
        for i in use:
            v = cv.directions[i]
            norm = float(readout.layers[i].residual_norm) if i in readout.layers else 1.0
            plan.add(i, float(alpha) * norm * v / v.norm().clamp_min(1e-12))
    return plan


@contextmanager
def steer(lm: "LoadedModel", plan: SteeringPlan, state: DecodeState | None = None) -> Iterator[DecodeState]:
    """Hooks for `plan` during the block (holding the model lock); gone afterwards, even on error."""
    state = state or DecodeState()
    with lm.lock, layer_hooks(lm.layers, plan.layer_fns(state)):
        yield state


def generate_steered(lm: "LoadedModel", prompt_ids: list[int], plan: SteeringPlan | None, **kwargs) -> GenerationResult:
    """engine.generation.generate with the plan's hooks for this call only."""
    state = DecodeState()
    fns = plan.layer_fns(state) if plan is not None and not plan.is_empty() else {}
    return generate(lm, prompt_ids, layer_fns=fns, state=state, **kwargs)
