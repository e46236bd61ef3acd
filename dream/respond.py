"""On-policy responses: the model's own replies to a cycle's cases, sampled at the controller's temperature.

Why on-policy: the triplets a cycle trains on pair a reference reply with what the model itself
says (its failing samples), so training moves the model away from its actual behaviour rather
than from a hand-written strawman. Why several samples per case: one greedy reply shows the mode;
a few samples at temperature T show how often the rule breaks, which is the failure rate the
temperature controller steers.

Speed on a CPU is the constraint (a cycle must fit in minutes on 2 cores), so:
- rows (case, sample index) are decoded in batches, left-padded, with one KV cache per batch and
  logits for the last position only (the 262k-token head is the most expensive layer);
- rows are sorted by prompt length so a batch wastes little on padding;
- a row stops at its first newline (the reply of a "User: ... / Assistant:" frame is one line;
  a base model goes on to write the next "User:" turn) or at `max_new_tokens`; the batch stops
  when all its rows have;
- a deadline and a cancel event are checked between batches; cases left unsampled are reported.

Reproducible: each row draws from its own torch.Generator seeded from (seed, case id, sample
index), so a case's samples do not depend on which other cases share its batch (up to the tiny
float differences padding makes in the logits).
"""

from __future__ import annotations

import hashlib
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from amygdala.engine.generation import eos_ids, sample_next
from amygdala.engine.kv_cache import cache_kwarg, new_cache
from amygdala.engine.model import LoadedModel

from .cases import Case

ProgressFn = Callable[[int, int], None]  # (cases done, cases total)


@dataclass(frozen=True)
class Sample:
    """One on-policy reply to a case."""

    case: Case
    index: int  # which of the case's samples (0..k-1)
    text: str  # the reply, cut at its first newline, with the leading space the frame expects
    tokens: int
    mean_logprob: float  # mean log-prob of the sampled tokens under the tempered distribution's source logits


@dataclass
class Responses:
    """Samples per case (in the order the cases were given) and what was left out."""

    by_case: list[list[Sample]]
    blank: int = 0  # samples that were empty after cutting (counted, not judged)
    unsampled: int = 0  # cases not reached before the deadline or cancel
    seconds: float = 0.0

    @property
    def samples(self) -> list[Sample]:
        return [s for per in self.by_case for s in per]


def row_seed(seed: int, case_id: str, index: int) -> int:
    digest = hashlib.sha256(f"{seed}\0{case_id}\0{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def _newline_checker(tokenizer: object) -> Callable[[int], bool]:
    cache: dict[int, bool] = {}

    def has_newline(tok: int) -> bool:
        if tok not in cache:
            cache[tok] = "\n" in tokenizer.decode([tok])  # type: ignore[attr-defined]
        return cache[tok]

    return has_newline


def _clean(text: str) -> str:
    """The reply up to its first newline; a reply that does not start with whitespace gets one space."""
    line = text.split("\n", 1)[0].rstrip()
    if line and not line[:1].isspace():
        line = " " + line
    return line


def sample_responses(lm: LoadedModel, cases: Sequence[Case], *, temperature: float, samples_per_case: int = 4,
                     max_new_tokens: int = 32, seed: int = 0, batch_size: int = 16, top_p: float = 1.0,
                     deadline: float | None = None, cancel: threading.Event | None = None,
                     on_progress: ProgressFn | None = None, progress_bar: bool = True) -> Responses:
    """`samples_per_case` sampled replies to every case (see the module docstring); `deadline` is time.monotonic()."""
    if samples_per_case < 1:
        raise ValueError(f"samples_per_case={samples_per_case}: draw at least one sample per case")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: a reply needs at least one token")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be at least 1")
    t0 = time.monotonic()
    tok = lm.tokenizer
    prompts = [list(tok(c.context, add_special_tokens=True)["input_ids"]) for c in cases]  # type: ignore[operator]
    rows = [(ci, k) for ci in range(len(cases)) for k in range(samples_per_case)]
    # Whole cases stay together (a case is done when all its samples are), shortest prompts first.
    rows.sort(key=lambda r: (len(prompts[r[0]]), r[0], r[1]))
    out = Responses(by_case=[[] for _ in cases])
    remaining = {ci: samples_per_case for ci in range(len(cases))}
    done_cases = 0
    bar = None
    if progress_bar and len(rows) > batch_size:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(cases), desc="dream: sample", unit="case", file=sys.stderr, dynamic_ncols=True)
    try:
        for start in range(0, len(rows), batch_size):
            if (cancel is not None and cancel.is_set()) or (deadline is not None and time.monotonic() > deadline):
                break
            batch = rows[start: start + batch_size]
            texts = _decode_batch(lm, [prompts[ci] for ci, _ in batch],
                                  [row_seed(seed, cases[ci].id, k) for ci, k in batch],
                                  temperature, top_p, max_new_tokens)
            for (ci, k), (text, n_tok, mean_lp) in zip(batch, texts):
                reply = _clean(text)
                if reply.strip():
                    out.by_case[ci].append(Sample(cases[ci], k, reply, n_tok, mean_lp))
                else:
                    out.blank += 1
                remaining[ci] -= 1
                if remaining[ci] == 0:
                    done_cases += 1
                    if bar is not None:
                        bar.update(1)
            if on_progress is not None:
                on_progress(done_cases, len(cases))
    finally:
        if bar is not None:
            bar.close()
    for per in out.by_case:
        per.sort(key=lambda s: s.index)
    out.unsampled = sum(1 for ci in range(len(cases)) if remaining[ci] == samples_per_case)
    out.seconds = time.monotonic() - t0
    return out


def _decode_batch(lm: LoadedModel, prompts: list[list[int]], seeds: list[int], temperature: float, top_p: float,
                  max_new_tokens: int) -> list[tuple[str, int, float]]:
    """Sample one continuation per prompt, left-padded in one batch; (text, tokens, mean log-prob) per row."""
    model, device = lm.model, lm.device
    b = len(prompts)
    # Samples of one case share their prompt: prefill each distinct prompt once, then copy its cache rows.
    uniq: dict[tuple[int, ...], int] = {}
    row_of = [uniq.setdefault(tuple(p), len(uniq)) for p in prompts]
    distinct = [list(p) for p in uniq]
    width = max(len(p) for p in distinct)
    pad = getattr(lm.tokenizer, "pad_token_id", None)
    pad = 0 if pad is None else int(pad)
    ids = torch.full((len(distinct), width), pad, dtype=torch.long)
    mask = torch.zeros((len(distinct), width), dtype=torch.long)
    for i, p in enumerate(distinct):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    stops = eos_ids(lm)
    has_newline = _newline_checker(lm.tokenizer)
    kw = cache_kwarg(model)
    out_tokens: list[list[int]] = [[] for _ in range(b)]
    logps: list[list[float]] = [[] for _ in range(b)]
    done = [False] * b
    with lm.lock, torch.inference_mode():
        cache = new_cache(model)
        res = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                    use_cache=True, logits_to_keep=1, **{kw: cache})
        index = torch.tensor(row_of, dtype=torch.long)
        if len(distinct) < b:
            cache.batch_select_indices(index.to(device))  # type: ignore[attr-defined]
        logits = res.logits[:, -1].float().cpu()[index]
        mask, positions = mask[index], positions[index]
        next_pos = positions[:, -1] + 1
        active = list(range(b))  # rows still decoding; finished rows leave the batch (and the cache)
        for step in range(max_new_tokens):
            chosen = []
            for j, i in enumerate(active):
                t = sample_next(logits[j], temperature, top_p, 0, gens[i])
                chosen.append(t)
                logps[i].append(float(torch.log_softmax(logits[j], -1)[t]))
                if t in stops or has_newline(t):
                    done[i] = True
                if t not in stops:
                    out_tokens[i].append(t)
            if step + 1 == max_new_tokens:
                break
            keep = [j for j, i in enumerate(active) if not done[i]]
            if not keep:
                break
            if len(keep) < len(active):
                sel = torch.tensor(keep, dtype=torch.long)
                cache.batch_select_indices(sel.to(device))  # type: ignore[attr-defined]
                mask, next_pos = mask[sel], next_pos[sel]
                chosen = [chosen[j] for j in keep]
                active = [active[j] for j in keep]
            mask = torch.cat([mask, torch.ones((len(active), 1), dtype=torch.long)], dim=1)
            x = torch.tensor(chosen, dtype=torch.long).unsqueeze(1)
            res = model(input_ids=x.to(device), attention_mask=mask.to(device), position_ids=next_pos.unsqueeze(1).to(device),
                        use_cache=True, logits_to_keep=1, **{kw: cache})
            logits = res.logits[:, -1].float().cpu()
            next_pos = next_pos + 1
    results = []
    for i in range(b):
        text = lm.tokenizer.decode(out_tokens[i], skip_special_tokens=True)  # type: ignore[attr-defined]
        mean_lp = sum(logps[i]) / len(logps[i]) if logps[i] else 0.0
        results.append((text, len(out_tokens[i]), mean_lp))
    return results
