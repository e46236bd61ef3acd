"""Residual-stream activations for many texts, as fast as the CPU allows.

Three decisions make this fast: only the transformer body runs (the LM head of a 262k-vocabulary
model costs ~3x the body), the forward stops after the deepest requested layer, and texts are
batched by similar length so little compute is spent on padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from .hooks import StopForward, capture_residuals
from .model import LoadedModel

PaddingSide = Literal["right", "left"]


@dataclass(frozen=True)
class Pooling:
    """How a sequence of residuals becomes one vector.

    `last`: the last non-pad token. `mean`: the mean over tokens from position `start` on
    (counted from the first real token, BOS included). A text of n tokens with n <= 2 * start
    starts at n // 2 instead, i.e. the mean of its second half: short texts (an agent's one-
    line reply) then pool over several tokens rather than one, and skip BOS, whose residual is an
    outlier. Training texts (stories of ~150 tokens) are unaffected.
    """

    kind: Literal["last", "mean"] = "last"
    start: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("last", "mean"):
            raise ValueError(f"pooling kind must be 'last' or 'mean', got {self.kind!r}")
        if self.start < 0:
            raise ValueError("pooling start must be >= 0")

    @classmethod
    def parse(cls, spec: str) -> "Pooling":
        """'last', 'mean' or 'mean:K'."""
        if spec == "last":
            return cls("last")
        if spec == "mean":
            return cls("mean", 0)
        if spec.startswith("mean:") and spec[5:].isdigit():
            return cls("mean", int(spec[5:]))
        raise ValueError(f"pooling {spec!r} not understood; use 'last', 'mean' or 'mean:K' (mean from token K)")

    def __str__(self) -> str:
        return "last" if self.kind == "last" else f"mean:{self.start}"


def pool(residual: torch.Tensor, attention_mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """(batch, seq, hidden) -> (batch, hidden), correct for left and right padding."""
    mask = attention_mask.to(torch.bool)
    rank = torch.cumsum(mask.long(), dim=1) - 1  # position among real tokens
    length = mask.sum(dim=1, keepdim=True)
    if pooling.kind == "last":
        sel = mask & (rank == length - 1)
    else:
        start = torch.minimum(torch.full_like(length, pooling.start), length // 2)
        sel = mask & (rank >= start)
    w = sel.to(residual.dtype).unsqueeze(-1)
    return (residual * w).sum(dim=1) / w.sum(dim=1)


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, side: PaddingSide = "right",
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids); positions count real tokens, so left padding is exact."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[row, sl] = torch.tensor(list(s), dtype=torch.long)
        mask[row, sl] = 1
    pos = (torch.cumsum(mask, dim=1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


def length_batches(lengths: Sequence[int], max_batch: int, max_tokens: int) -> list[list[int]]:
    """Indices grouped by similar length under a padded-token budget (batch * longest <= max_tokens)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        longest = max(lengths[i], max((lengths[j] for j in cur), default=0))
        if cur and (len(cur) + 1 > max_batch or (len(cur) + 1) * longest > max_tokens):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def forward_body(lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                 layers: list[int], stop_early: bool = True) -> dict[int, torch.Tensor]:
    """Run the body on one padded batch, returning each chosen layer's (batch, seq, hidden) residual."""
    with lm.lock, torch.inference_mode(), capture_residuals(lm.layers, layers, stop_after_deepest=stop_early) as store:
        try:
            lm.body(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
        except StopForward:
            pass
    missing = [i for i in layers if i not in store]
    if missing:
        raise RuntimeError(f"layers {missing} produced no output; is {lm.layers_path} the decoder stack?")
    return dict(store)


def pooled_activations(lm: LoadedModel, token_ids: Sequence[Sequence[int]], layers: list[int], pooling: Pooling,
                       max_batch: int = 32, max_batch_tokens: int = 4096, padding_side: PaddingSide = "right",
                       progress: bool | str = False) -> dict[int, torch.Tensor]:
    """Pooled residuals {layer: (n_texts, hidden)} in float32 on CPU, in input order."""
    res = multi_pooled_activations(lm, token_ids, layers, [pooling], max_batch, max_batch_tokens, padding_side, progress)
    return res.pooled[pooling]


@dataclass
class ActivationResult:
    """Several poolings of the same forward passes, plus the typical per-token residual norm.

    The norm (mean L2 norm of token residuals, BOS excluded because its residual is an outlier in
    most models) is the unit steering strengths are expressed in.
    """

    pooled: dict[Pooling, dict[int, torch.Tensor]]
    token_norm: dict[int, float]
    n_tokens: int


def multi_pooled_activations(lm: LoadedModel, token_ids: Sequence[Sequence[int]], layers: list[int],
                             poolings: Sequence[Pooling], max_batch: int = 32, max_batch_tokens: int = 4096,
                             padding_side: PaddingSide = "right", progress: bool | str = False) -> ActivationResult:
    """One body pass per batch, pooled every requested way: comparing poolings costs no extra forwards."""
    layers = lm.check_layers(layers)
    poolings = list(dict.fromkeys(poolings))
    if any(len(s) == 0 for s in token_ids):
        raise ValueError("a text encoded to zero tokens; every text needs at least one token")
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    out = {p: {i: torch.empty(len(token_ids), lm.hidden_size) for i in layers} for p in poolings}
    norm_sum = {i: 0.0 for i in layers}
    norm_count = 0
    batches = length_batches([len(s) for s in token_ids], max_batch, max_batch_tokens) if token_ids else []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(s) for s in token_ids), unit="tok", desc=progress if isinstance(progress, str) else "activations",
                   dynamic_ncols=True)
    try:
        for batch in batches:
            ids, mask, pos = pad_batch([token_ids[i] for i in batch], pad_id, padding_side, lm.device)
            res = forward_body(lm, ids, mask, pos, layers)
            body_mask = (mask.bool() & (pos > 0)).unsqueeze(-1)  # real tokens except the first (BOS)
            norm_count += int(body_mask.sum())
            for layer, r in res.items():
                r = r.float()
                for p in poolings:
                    out[p][layer][batch] = pool(r, mask, p).cpu()
                norm_sum[layer] += float((r.norm(dim=-1, keepdim=True) * body_mask).sum())
            if bar is not None:
                bar.update(int(mask.sum()))
    finally:
        if bar is not None:
            bar.close()
    token_norm = {i: norm_sum[i] / max(norm_count, 1) for i in layers}
    return ActivationResult(pooled=out, token_norm=token_norm, n_tokens=sum(len(s) for s in token_ids))


def token_activations(lm: LoadedModel, token_ids: Sequence[int], layers: list[int]) -> dict[int, torch.Tensor]:
    """Per-token residuals {layer: (seq, hidden)} of one text, float32 on CPU."""
    layers = lm.check_layers(layers)
    ids, mask, pos = pad_batch([token_ids], 0, "right", lm.device)
    return {i: r[0].float().cpu() for i, r in forward_body(lm, ids, mask, pos, layers).items()}
