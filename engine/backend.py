"""The backend protocol: what readout, steering, training and the dream loop need from a model.

Two backends implement it: `engine.backends.transformers` (the in-process `LoadedModel`, CPU) and
`engine.backends.vllm` (a vLLM engine whose workers run our plugin, GPU). The protocol is
declarative where the transformers engine takes callbacks: a vLLM worker lives in another process,
so a per-token Python hook cannot run there. What a hook did becomes data the worker understands:

- steering: a `SteeringPlan` (per-layer vectors + which positions), applied by the worker to the
  rows of its request only;
- observation: a `Probe`, a linear map per layer applied to every residual of the request
  (`s = x @ weight.T - bias`; the emotion readout is one, `Probe.raw` keeps the residual itself).
  Projections, not residuals, come back: 267 floats per token per layer instead of 5120.

Everything a caller reads from projections (the score at the last position, the score at each
decoded token) is computed from them by `engine.backends.probe`, the same way for both backends,
which is what makes the golden test (same scores on both) meaningful.

Weights are addressed by HuggingFace names on every backend; vLLM's packed parameters (qkv_proj,
gate_up_proj) are split and joined with `engine.param_names`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from .activations import Pooling
    from .steering import SteeringPlan

BackendKind = Literal["transformers", "vllm"]
FinishReason = Literal["length", "eos"]


class BackendError(ValueError):
    """A request a backend cannot serve; the message says what to change."""


@dataclass(frozen=True)
class ModelInfo:
    """What callers need to know about the served model, whichever backend serves it."""

    backend: BackendKind
    name: str
    architecture: str
    n_layers: int
    hidden_size: int
    vocab_size: int
    dtype: str
    device: str
    tensor_parallel_size: int = 1


@dataclass(frozen=True)
class Sampling:
    """Decoding settings; greedy when temperature == 0 (the only mode two backends agree on exactly)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_at_eos: bool = True
    read_last: bool = False  # also observe the final generated token (one extra forward)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise BackendError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise BackendError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise BackendError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise BackendError(f"top_k must be >= 0 (0 = off), got {self.top_k}")


@dataclass(frozen=True)
class Probe:
    """Per-layer linear maps of the residual stream: `s = x @ weight[l].T - bias[l]`, float32.

    `weight[l] is None` means the identity (the residual itself comes back, bias ignored): that is
    how `capture` is served, and what a test uses to compare raw residuals across backends.
    """

    weight: Mapping[int, torch.Tensor | None]
    bias: Mapping[int, torch.Tensor | None] = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted(self.weight)

    @classmethod
    def raw(cls, layers: Sequence[int]) -> Probe:
        return cls(weight={int(i): None for i in layers})

    def width(self, layer: int, hidden_size: int) -> int:
        w = self.weight[layer]
        return hidden_size if w is None else int(w.shape[0])

    def check(self, n_layers: int, hidden_size: int) -> None:
        if not self.weight:
            raise BackendError("probe has no layers; pass at least one layer index")
        for i, w in self.weight.items():
            if not 0 <= i < n_layers:
                raise BackendError(f"probe layer {i} out of range: the model has {n_layers} decoder layers (0-{n_layers - 1})")
            if w is not None and (w.ndim != 2 or w.shape[1] != hidden_size):
                raise BackendError(f"probe weight for layer {i} has shape {tuple(w.shape)}; expected (C, {hidden_size})")
            b = self.bias.get(i)
            if w is not None and b is not None and tuple(b.shape) != (w.shape[0],):
                raise BackendError(f"probe bias for layer {i} has shape {tuple(b.shape)}; expected ({w.shape[0]},)")

    def apply(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """(..., H) residuals -> (..., C) float32 projections (on x's device)."""
        w = self.weight[layer]
        xf = x.float()
        if w is None:
            return xf
        s = xf @ w.to(device=x.device, dtype=torch.float32).T
        b = self.bias.get(layer)
        return s if b is None else s - b.to(device=x.device, dtype=torch.float32)


@dataclass
class GenerationRequest:
    """One sequence to generate: prompt ids, decoding settings, optional steering and probe."""

    prompt_ids: list[int]
    sampling: Sampling = field(default_factory=Sampling)
    steering: SteeringPlan | None = None
    probe: Probe | None = None


@dataclass
class GenerationOutput:
    """What came back for one request.

    `projections[l]` has one row per token the model *ran*: the prompt tokens, then each generated
    token that was fed back (all but the last, unless read_last); rows are in position order.
    """

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    logprobs: list[float] = field(default_factory=list)
    projections: dict[int, torch.Tensor] | None = None

    @property
    def n_fed(self) -> int:
        """Number of positions the model ran (the rows of each projection)."""
        return next(iter(self.projections.values())).shape[0] if self.projections else 0


@runtime_checkable
class Backend(Protocol):
    """The model-facing operations; every method is safe to call from the engine thread only."""

    kind: BackendKind

    def info(self) -> ModelInfo: ...

    def capture(self, seqs: Sequence[Sequence[int]], layers: Sequence[int]) -> list[dict[int, torch.Tensor]]:
        """Per-token residuals {layer: (T, H)} of each text, float32 on CPU, after each chosen layer."""
        ...

    def capture_pooled(self, seqs: Sequence[Sequence[int]], layers: Sequence[int],
                       pooling: Pooling) -> dict[int, torch.Tensor]:
        """Pooled residuals {layer: (N, H)} of the texts, float32 on CPU, in input order."""
        ...

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationOutput]:
        """Generate every request (batched where the backend can), each with its own steering and probe."""
        ...

    def weight_names(self) -> list[str]:
        """HuggingFace names of the weights `read_weights`/`write_weights` accept."""
        ...

    def read_weights(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Copies (CPU) of the named weights, HuggingFace names and shapes."""
        ...

    def write_weights(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Overwrite the named weights in place (the served model changes; no reload)."""
        ...

    def close(self) -> None: ...


def check_names(requested: Sequence[str], known: Sequence[str]) -> None:
    """Refuse unknown weight names before anything is read or written (bad input stores nothing)."""
    have = set(known)
    bad = [n for n in requested if n not in have]
    if bad:
        sample = ", ".join(sorted(have)[:4])
        raise BackendError(f"unknown weight name(s) {bad[:5]}{' ...' if len(bad) > 5 else ''}: use HuggingFace "
                           f"parameter names as weight_names() lists them (e.g. {sample})")
