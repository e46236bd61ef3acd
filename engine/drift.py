"""How far the served weights have drifted from the ones a readout was fit on.

Training changes the weights the readout reads; the readout's vectors and statistics stay those of
fit time, so after enough training its z-scores are no longer comparable with earlier ones. A
readout built by amygdala stores the pooled residuals of a few neutral "probe" texts at its default
layers (`layer_<l>.probe`, token ids in `drift_probe`). Re-reading those texts with the served
weights is cheap (a few hundred tokens, one batched forward) and measures the drift in the units
that matter: how many standard deviations the probe texts' scores moved, and the relative change
of their residuals.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .activations import multi_pooled_activations

if TYPE_CHECKING:
    from .model import LoadedModel
    from .readout import ReadoutManager

PROBE_TEXTS = 4
PROBE_TOKENS = 48
# Below this max |dz| the probe scores are unchanged up to float noise (thread counts, batching).
UNCHANGED_DZ = 1e-3
REFIT = "refit the readout with `amygdala vectors train` (minutes) to read the trained weights on their own terms"


@dataclass(frozen=True)
class Drift:
    layers: list[int]
    mean_abs_dz: float  # mean over probe texts and concepts of |z now - z at fit time|, default layers averaged
    max_abs_dz: float
    residual_change: float  # ||r_now - r_fit|| / ||r_fit|| of the probe residuals, averaged over layers

    @property
    def drifted(self) -> bool:
        return self.max_abs_dz >= UNCHANGED_DZ

    def note(self) -> str | None:
        """One sentence for tool and CLI output; None when the weights are those of fit time."""
        if not self.drifted:
            return None
        return (f"the served weights have drifted from the ones this readout was fit on: neutral probe texts now score "
                f"{self.mean_abs_dz:.3f} SD away on average (max {self.max_abs_dz:.2f}) at layers {self.layers}, "
                f"residuals moved {self.residual_change:.2%}; {REFIT}")

    def to_dict(self) -> dict:
        return {"layers": self.layers, "mean_abs_dz": round(self.mean_abs_dz, 5), "max_abs_dz": round(self.max_abs_dz, 5),
                "residual_change": round(self.residual_change, 6), "drifted": self.drifted}


def probe_ids(tokenizer: object, texts: Sequence[str], n: int = PROBE_TEXTS, max_tokens: int = PROBE_TOKENS) -> list[list[int]]:
    """Token ids of the first n texts, each cut to max_tokens (short: the check must stay cheap)."""
    out = []
    for t in list(texts)[:n]:
        ids = tokenizer(t)["input_ids"][:max_tokens]  # type: ignore[operator]
        if ids:
            out.append(list(ids))
    return out


def _pooled(lm: LoadedModel, readout: ReadoutManager, ids: list[list[int]], layers: list[int]) -> dict[int, torch.Tensor]:
    res = multi_pooled_activations(lm, ids, layers, [readout.pooling])
    return res.pooled[readout.pooling]


def attach_probe(lm: LoadedModel, readout: ReadoutManager, ids: list[list[int]]) -> None:
    """Record the probe texts' pooled residuals at the readout's default layers (at fit time, in place)."""
    if not ids:
        return
    pooled = _pooled(lm, readout, ids, readout.default_layers)
    readout.manifest.drift_probe = [list(s) for s in ids]
    for i in readout.default_layers:
        readout.layers[i].probe = pooled[i].clone()


def measure_drift(readout: ReadoutManager, lm: LoadedModel | None = None) -> Drift | None:
    """Drift of `lm` (default: the readout's model) from the readout's fit-time weights; None without a probe."""
    lm = lm or readout.lm
    ids = readout.manifest.drift_probe
    layers = [i for i in readout.default_layers if readout.layers[i].probe is not None]
    if lm is None or not ids or not layers:
        return None
    now = _pooled(lm, readout, ids, layers)
    n = torch.tensor([len(s) for s in ids])
    m = readout.pooled_tokens(n)
    dz, rel = [], []
    for i in layers:
        lr = readout.layers[i]
        then = lr.probe
        dz.append((lr.scores(now[i], m) - lr.scores(then, m)).abs())
        rel.append(float(((now[i] - then).norm(dim=1) / then.norm(dim=1).clamp_min(1e-12)).mean()))
    d = torch.stack(dz).mean(0)  # (P, C), averaged over layers like the headline score
    return Drift(layers=layers, mean_abs_dz=float(d.mean()), max_abs_dz=float(d.max()),
                 residual_change=sum(rel) / len(rel))


class DriftMonitor:
    """Measures drift once per weights version (`version()`: e.g. the training client's counter).

    Call `drift()` on the thread that runs model work; the forward runs only when the version
    changed since the last measurement.
    """

    def __init__(self, readout: ReadoutManager, version: Callable[[], Hashable] = lambda: 0):
        self.readout = readout
        self.version = version
        self._cached: tuple[Hashable, Drift | None] | None = None

    def drift(self) -> Drift | None:
        v = self.version()
        if self._cached is None or self._cached[0] != v:
            self._cached = (v, measure_drift(self.readout))
        return self._cached[1]

    def note(self) -> str | None:
        d = self.drift()
        return d.note() if d is not None else None
