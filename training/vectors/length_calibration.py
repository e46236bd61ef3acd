"""Length-calibrated score statistics for mean-pooled readouts.

A readout's z-score divides by the spread of scores over corpus texts, which are pooled over
~140 tokens. An agent's one-line message pools 6; its mean is far noisier, so on full-text
statistics every concept scores high. Here the statistics are re-measured on corpus *prefixes*
pooled over m = 4, 8, ..., 64 tokens (causal attention makes a prefix's residuals equal to the
full text's first tokens, so one forward of each text's first tokens serves every m), and stored
next to the full-text ones; scoring interpolates by the number of tokens actually pooled.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from amygdala.corpus import Text
from amygdala.engine.activations import forward_body, length_batches, pad_batch
from amygdala.engine.model import LoadedModel
from amygdala.engine.readout import ReadoutManager

CALIBRATION_TOKENS = (4, 8, 16, 32, 64)


def prefix_length(pooled: int, start: int) -> int:
    """Smallest text length n whose mean pooling (from min(start, n // 2)) averages `pooled` tokens."""
    n = pooled
    while n - min(start, n // 2) < pooled:
        n += 1
    return n


def calibrate_lengths(lm: LoadedModel, readout: ReadoutManager, texts: Sequence[Text],
                      counts: Sequence[int] = CALIBRATION_TOKENS, max_batch_tokens: int = 4096,
                      progress: bool = True) -> None:
    """Add calib_tokens / calib_mean / calib_std to every layer of a mean-pooled readout, in place."""
    p = readout.pooling
    if p.kind != "mean":
        return  # last-token pooling always reads one token: nothing to calibrate
    if len(texts) > 600:  # statistics of 600+ prefixes are plenty; halves the extra pass
        texts = list(texts)[::2]
    seqs_full = [lm.tokenizer(t.text)["input_ids"] for t in texts]
    full_counts = torch.tensor([len(s) - min(p.start, len(s) // 2) for s in seqs_full], dtype=torch.float32)
    full_m = float(full_counts.median())
    counts = [c for c in counts if c < full_m]
    lengths = {c: prefix_length(c, p.start) for c in counts}
    longest = max(lengths.values()) if lengths else 1
    seqs = [s[:longest] for s in seqs_full]
    layers = readout.manifest.layers
    raw: dict[int, dict[int, list[torch.Tensor]]] = {i: {c: [] for c in counts} for i in layers}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(s) for s in seqs), unit="tok", desc="length calibration", dynamic_ncols=True)
    for batch in length_batches([len(s) for s in seqs], 64, max_batch_tokens):
        ids, mask, pos = pad_batch([seqs[k] for k in batch], lm.tokenizer.pad_token_id or 0, "right", lm.device)
        res = forward_body(lm, ids, mask, pos, layers)
        lens = mask.sum(1)
        for i, r in res.items():
            csum = torch.cumsum(torch.cat([torch.zeros(r.shape[0], 1, r.shape[2]), r.float().cpu()], 1), 1)
            for c, n in lengths.items():
                ok = lens >= n
                if not ok.any():
                    continue
                start = min(p.start, n // 2)
                pooled = (csum[ok, n] - csum[ok, start]) / (n - start)
                raw[i][c].append(readout.layers[i].scores_raw(pooled))
        if bar is not None:
            bar.update(int(mask.sum()))
    if bar is not None:
        bar.close()
    for i in layers:
        lr = readout.layers[i]
        knots, means, stds = [], [], []
        for c in counts:
            if not raw[i][c]:
                continue
            s = torch.cat(raw[i][c])
            if s.shape[0] < 8:
                continue
            knots.append(float(c))
            means.append(s.mean(0))
            stds.append(s.std(0).clamp_min(1e-6))
        knots.append(full_m)
        means.append(lr.score_mean)
        stds.append(lr.score_std)
        lr.calib_tokens = torch.tensor(knots)
        lr.calib_mean = torch.stack(means)
        lr.calib_std = torch.stack(stds)
