"""The emotion readout as a `Probe`, and readout scores computed from per-token projections.

Why projections: a readout score is affine in the pooled residual, so the mean of per-token
projections equals the projection of the mean residual. A vLLM worker therefore sends back
(tokens, concepts) floats per layer, never (tokens, hidden) residuals, and every pooling the
readout knows (the text's mean from token K, the last token, the running decode window) is done
here afterwards, identically for every backend:

    weight_l = V_l / scale_l        bias_l = (center_l / scale_l) @ V_l.T
    s = x @ weight_l.T - bias_l  ==  ((x - center_l) / scale_l) @ V_l.T      (engine.readout)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..backend import BackendError, Probe
from ..readout import window_start

if TYPE_CHECKING:
    from ..readout import LayerReadout, ReadoutManager


def readout_probe(readout: ReadoutManager, layers: Sequence[int] | None = None) -> Probe:
    """The readout's layers as one Probe (its projections are the `s` of engine.readout)."""
    use = readout.check_layers(list(layers) if layers is not None else None)
    weight, bias = {}, {}
    for i in use:
        lr = readout.layers[i]
        w = lr.vectors / lr.scale.unsqueeze(0)
        weight[i] = w.contiguous()
        bias[i] = (lr.center / lr.scale) @ lr.vectors.T
    return Probe(weight=weight, bias=bias)


def normalise(lr: LayerReadout, s: torch.Tensor, pooled_tokens: torch.Tensor | int | None) -> torch.Tensor:
    """Raw projections -> z-scores, length-calibrated when the readout has the statistics."""
    if pooled_tokens is None or lr.calib_tokens is None:
        return (s - lr.score_mean) / lr.score_std
    mean, std = lr.stats_at(pooled_tokens, s.shape[:-1])
    return (s - mean) / std


@dataclass
class ReadoutScores:
    """Scores of one generation: the prompt as `read` scores it, then one row per decoded token."""

    prompt: torch.Tensor  # (C,) mean over layers
    prompt_per_layer: dict[int, torch.Tensor]  # layer -> (C,)
    tokens: torch.Tensor  # (n_decoded, C), as DecodeReader scores them


def prompt_scores(readout: ReadoutManager, projections: dict[int, torch.Tensor], n_prompt: int,
                  layers: Sequence[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The prompt's score exactly as ReadoutManager.read pools it (whole text, from token K or last)."""
    if n_prompt < 1:
        raise BackendError("the prompt has no tokens to score")
    p = readout.pooling
    per_layer = {}
    for i in layers:
        s = projections[i][:n_prompt].float()
        if p.kind == "last":
            pooled, m = s[-1], 1
        else:
            start = min(p.start, n_prompt // 2)
            pooled, m = s[start:].mean(0), n_prompt - start
        per_layer[i] = normalise(readout.layers[i], pooled, m)
    return torch.stack([per_layer[i] for i in layers]).mean(0), per_layer


def decode_scores(readout: ReadoutManager, projections: dict[int, torch.Tensor], n_prompt: int,
                  layers: Sequence[int]) -> torch.Tensor:
    """(n_fed - n_prompt, C): at each fed generated token, the running window's score (DecodeReader)."""
    p = readout.pooling
    window = readout.manifest.window
    rows = []
    for i in layers:
        s = projections[i].float()
        total = s.shape[0]
        if total <= n_prompt:
            rows.append(torch.empty(0, s.shape[1]))
            continue
        n = torch.arange(n_prompt + 1, total + 1)  # tokens seen after each generated token
        if p.kind == "last":
            pooled, m = s[n_prompt:], torch.ones_like(n)
        else:
            first = window_start(n, p.start, window)
            csum = torch.cat([torch.zeros(1, s.shape[1]), torch.cumsum(s, 0)])
            m = n - first
            pooled = (csum[n] - csum[first]) / m.unsqueeze(1).float()
        rows.append(normalise(readout.layers[i], pooled, m))
    return torch.stack(rows).mean(0)


def readout_scores(readout: ReadoutManager, projections: dict[int, torch.Tensor], n_prompt: int,
                   layers: Sequence[int] | None = None) -> ReadoutScores:
    """Both scores of one generation from its projections (a `readout_probe` of the same layers)."""
    use = readout.check_layers(list(layers) if layers is not None else None)
    missing = [i for i in use if i not in projections]
    if missing:
        raise BackendError(f"no projections for readout layers {missing}; generate with readout_probe(readout, {use})")
    prompt, per_layer = prompt_scores(readout, projections, n_prompt, use)
    return ReadoutScores(prompt=prompt, prompt_per_layer=per_layer, tokens=decode_scores(readout, projections, n_prompt, use))
