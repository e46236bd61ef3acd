"""A small decode loop that lets hooks see every step.

HuggingFace's `generate` hides the per-step forward, but readout wants the residual of every
decoded token and steering needs to know whether a forward covers prompt or generated positions.
So the loop is ours: prompt forward with a KV cache, then one token at a time, logits only for the
last position (the 262k-vocabulary head is the most expensive part of this model on CPU).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from .kv_cache import cache_kwarg, new_cache
from .hooks import ResidualFn, capture_residuals, layer_hooks
from .model import LoadedModel

Phase = Literal["prompt", "generate"]


@dataclass
class DecodeState:
    """What the current forward covers; steering hooks read it to pick positions."""

    phase: Phase = "prompt"
    step: int = 0  # generated tokens so far


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: Literal["length", "eos"]
    logprobs: list[float] = field(default_factory=list)  # log-prob of each chosen token under the run's logits


# on_residuals(phase, residuals {layer: (new_positions, hidden)})
ResidualCallback = Callable[[Phase, dict[int, torch.Tensor]], None]


def eos_ids(lm: LoadedModel) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(lm.model, "generation_config", None), lm.model.config, lm.tokenizer):
        v = getattr(src, "eos_token_id", None)
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    return ids


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
                generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, -1) > top_p
        sorted_logits[drop] = float("-inf")
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    probs = torch.softmax(logits, -1)
    return int(torch.multinomial(probs, 1, generator=generator))


def generate(lm: LoadedModel, prompt_ids: list[int], max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
             layer_fns: dict[int, ResidualFn] | None = None, state: DecodeState | None = None,
             capture_layers: list[int] | None = None, on_residuals: ResidualCallback | None = None,
             read_last: bool = False, stop_at_eos: bool = True,
             on_token: Callable[[int], None] | None = None) -> GenerationResult:
    """Generate from token ids. Greedy when temperature == 0; sampled runs are reproducible per seed.

    layer_fns modify residuals (steering); capture_layers + on_residuals observe them (readout),
    and observation sees the already-modified residual. With read_last, one extra forward feeds
    the final token so its residual is observed too. on_token(id) is called after each sampled
    token (progress bars).
    """
    if not prompt_ids:
        raise ValueError("prompt is empty; pass at least one token")
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    state = state or DecodeState()
    generator = None
    if seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
    stops = eos_ids(lm) if stop_at_eos else set()
    kw = cache_kwarg(lm.model)
    device = lm.device
    out: list[int] = []
    logps: list[float] = []
    finish: Literal["length", "eos"] = "length"
    capture_layers = sorted(set(capture_layers or []))

    def forward(ids: list[int], cache: object, start: int) -> torch.Tensor:
        x = torch.tensor([ids], dtype=torch.long, device=device)
        pos = torch.arange(start, start + len(ids), device=device).unsqueeze(0)
        if capture_layers:
            with capture_residuals(lm.layers, capture_layers) as store:
                res = lm.model(input_ids=x, position_ids=pos, use_cache=True, logits_to_keep=1, **{kw: cache})
            if on_residuals is not None:
                on_residuals(state.phase, {i: store[i][0].float().cpu() for i in capture_layers})
        else:
            res = lm.model(input_ids=x, position_ids=pos, use_cache=True, logits_to_keep=1, **{kw: cache})
        return res.logits[0, -1]

    with lm.lock, torch.inference_mode(), layer_hooks(lm.layers, layer_fns or {}):
        cache = new_cache(lm.model)
        state.phase, state.step = "prompt", 0
        logits = forward(list(prompt_ids), cache, 0)
        n = len(prompt_ids)
        state.phase = "generate"
        for step in range(max_new_tokens):
            tok = sample_next(logits, temperature, top_p, top_k, generator)
            logps.append(float(torch.log_softmax(logits.float(), -1)[tok]))
            out.append(tok)
            state.step = step + 1
            if on_token is not None:
                on_token(tok)
            if tok in stops:
                finish = "eos"
                break
            if step + 1 == max_new_tokens and not read_last:
                break
            logits = forward([tok], cache, n)
            n += 1
    text = lm.tokenizer.decode([t for t in out if t not in stops], skip_special_tokens=True)
    return GenerationResult(prompt_ids=list(prompt_ids), token_ids=out, text=text, finish_reason=finish, logprobs=logps)


def sequence_logprobs(lm: LoadedModel, context_ids: list[int], continuation_ids: list[int]) -> torch.Tensor:
    """Log-probability of each continuation token given context (unsteered), shape (len(continuation),)."""
    if not continuation_ids:
        return torch.empty(0)
    ids = list(context_ids) + list(continuation_ids)
    with lm.lock, torch.inference_mode():
        x = torch.tensor([ids], dtype=torch.long, device=lm.device)
        keep = len(continuation_ids) + 1
        logits = lm.model(input_ids=x, use_cache=False, logits_to_keep=keep).logits[0, :-1].float()
        lp = torch.log_softmax(logits, -1)
        target = torch.tensor(continuation_ids, device=lp.device)
        return lp.gather(1, target.unsqueeze(1)).squeeze(1).cpu()
