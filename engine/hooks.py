"""Forward hooks on decoder layers, always removed afterwards.

A decoder layer's output *is* the residual stream after that layer (HuggingFace's
`hidden_states[i + 1]`, except the last entry, which most models return after the final norm).
Hooks live only inside a `with` block: a hook left behind after an exception would silently
steer or record every later call, which is the worst kind of bug in an interpretability tool.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

# fn(layer_index, residual) -> new residual or None (None leaves the output untouched)
ResidualFn = Callable[[int, torch.Tensor], torch.Tensor | None]


class StopForward(Exception):
    """Raised by a hook to end a forward pass early, once the deepest needed layer has run."""


def residual_of(output: object) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    hs = getattr(output, "hidden_states", None) or getattr(output, "last_hidden_state", None)
    if isinstance(hs, torch.Tensor):
        return hs
    raise TypeError(f"cannot find the hidden state in a decoder layer output of type {type(output).__name__}")


def with_residual(output: object, residual: torch.Tensor) -> object:
    if isinstance(output, torch.Tensor):
        return residual
    if isinstance(output, tuple):
        return (residual, *output[1:])
    if isinstance(output, list):
        return [residual, *output[1:]]
    raise TypeError(f"cannot replace the hidden state in a decoder layer output of type {type(output).__name__}")


@contextmanager
def layer_hooks(layers: nn.ModuleList, fns: dict[int, ResidualFn]) -> Iterator[None]:
    """Run `fns[i]` on layer i's output residual for every forward inside the block."""
    handles = []
    try:
        for index, fn in sorted(fns.items()):
            def hook(module: nn.Module, args: object, output: object, index: int = index, fn: ResidualFn = fn) -> object:
                new = fn(index, residual_of(output))
                return None if new is None else with_residual(output, new)

            hook._amygdala = True  # type: ignore[attr-defined]
            handles.append(layers[index].register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture_residuals(layers: nn.ModuleList, indices: list[int], stop_after_deepest: bool = False,
                      detach: bool = True) -> Iterator[dict[int, torch.Tensor]]:
    """Record each chosen layer's output residual (batch, seq, hidden) into the yielded dict.

    With stop_after_deepest, the deepest layer's hook raises StopForward so the layers above it,
    the final norm and the LM head never run; the caller catches StopForward.
    """
    store: dict[int, torch.Tensor] = {}
    deepest = max(indices)

    def record(index: int, residual: torch.Tensor) -> None:
        store[index] = residual.detach() if detach else residual
        if stop_after_deepest and index == deepest:
            raise StopForward
        return None

    with layer_hooks(layers, {i: record for i in indices}):
        yield store


def hooks_installed(layers: nn.ModuleList) -> int:
    """Number of amygdala forward hooks on the decoder layers (tests assert it returns to zero).

    transformers installs persistent hooks of its own (for output_hidden_states); ours are tagged.
    """
    return sum(1 for layer in layers for h in layer._forward_hooks.values() if getattr(h, "_amygdala", False))
