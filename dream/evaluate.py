"""Held-out evaluation of every invariant, and perplexity on neutral text: the keep-or-roll-back evidence.

Every active invariant is evaluated, not only those a cycle trained: training "listen" must not
quietly destroy "push-back" (the pair is the guard against sycophancy). Per invariant:

- the held-out pass rate under the invariant's own judge (`judge_model`: forced choice for the
  preference judge, a greedy reply judged otherwise), on the written held-out cases plus a fixed,
  seeded set of held-out template fills;
- the mean preference margin: mean token log-prob of the preferred reference minus that of the
  rejected one, in nats per token, for every judge kind. It is the continuous measure that moves
  before the binary pass rate flips.

General ability is watched through the perplexity on the corpus's neutral paragraphs (encyclopaedic
text with no emotional content, `amygdala.corpus`): a cycle that teaches a rule by wrecking the
language model shows up there.

An evaluation is keyed by the weights hash, the invariants' spec hashes and the evaluation settings;
the loop reuses the previous cycle's final evaluation as this cycle's baseline when the key matches
(the weights have not changed since), which saves one of the two evaluations per cycle.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import sys
import threading
import time
from collections.abc import Callable, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from amygdala.engine.model import LoadedModel

from .cases import Case, expand_templates, split
from .invariants import InvariantSpec, spec_sha256
from .judges import JudgeContext, build_judge

HELD_OUT_TEMPLATE_SEED = 20260101  # fixed: the same held-out template fills in every cycle


class EvalSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    held_out_templates: int = Field(4, ge=0, description="Held-out template fills per invariant, beside its written held-out cases.")
    perplexity_texts: int = Field(16, ge=0, description="Neutral paragraphs for the perplexity (0: skip it).")
    perplexity_max_tokens: int = Field(128, ge=8, description="Tokens read per paragraph.")
    judge_max_new_tokens: int = Field(32, ge=1, description="Greedy reply length for generating judges.")
    seed: int = 0


class InvariantEval(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    judge: str
    cases: int
    passed: int
    pass_rate: float
    mean_margin: float = Field(description="Mean over held-out cases of mean log-prob(preferred) - mean log-prob(rejected), nats/token.")
    failed_cases: list[str] = Field(default_factory=list)
    case_margins: dict[str, float] = Field(default_factory=dict)


class Evaluation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str
    weights_hash: str
    invariants: dict[str, InvariantEval]
    perplexity: float | None = None
    perplexity_tokens: int = 0
    seconds: float = 0.0
    reused_from: str | None = Field(None, description="The cycle whose final evaluation this is (a reused baseline).")


def held_out_cases(spec: InvariantSpec, n_templates: int) -> list[Case]:
    """The invariant's held-out written cases plus `n_templates` held-out template fills (fixed seed)."""
    _, held = split(spec)
    extra = [c for c in expand_templates(spec, random.Random(HELD_OUT_TEMPLATE_SEED), 3 * n_templates) if c.held_out]
    seen = {c.id for c in held}
    out = list(held)
    for c in extra[:n_templates]:
        if c.id not in seen:
            seen.add(c.id)
            out.append(c)
    return out


def held_out_contexts(specs: Sequence[InvariantSpec], n_templates: int) -> set[str]:
    """Every context on the held-out side, over all invariants (what the trainer must never see)."""
    out: set[str] = set()
    for spec in specs:
        out.update(c.context for c in held_out_cases(spec, n_templates))
        out.update(c.context for c in split(spec)[1])
    return out


def eval_key(weights_hash: str, specs: Sequence[InvariantSpec], settings: EvalSettings, extra: str = "") -> str:
    text = json.dumps({"weights": weights_hash, "specs": sorted(spec_sha256(s) for s in specs),
                       "settings": settings.model_dump(mode="json"), "extra": extra}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def preference_margins(lm: LoadedModel, cases: Sequence[Case]) -> list[float]:
    """Per case: mean token log-prob of preferred minus rejected given the context (context-frozen, no graph)."""
    from amygdala.training.trainer import continuation_logprobs

    tok = lm.tokenizer
    out = []
    for c in cases:
        ctx = list(tok(c.context, add_special_tokens=True)["input_ids"])  # type: ignore[operator]
        pref = list(tok(c.preferred, add_special_tokens=False)["input_ids"])  # type: ignore[operator]
        rej = list(tok(c.rejected, add_special_tokens=False)["input_ids"])  # type: ignore[operator]
        with lm.lock, torch.inference_mode():
            lp_p, lp_r = continuation_logprobs(lm.model, ctx, [pref, rej])
        out.append(float(lp_p.double().mean() - lp_r.double().mean()))
    return out


def perplexity(lm: LoadedModel, texts: Sequence[str], max_tokens: int = 192, chunk: int = 32) -> tuple[float, int]:
    """exp(mean token NLL) over the texts (each cut to max_tokens), the LM head applied in chunks of positions.

    Chunking matters: full logits of 192 positions over a 262k vocabulary are 200 MB.
    """
    model = lm.model
    softcap = getattr(model.config, "final_logit_softcapping", None)
    head = model.get_output_embeddings()
    total_nll, total = 0.0, 0
    with lm.lock, torch.inference_mode():
        for text in texts:
            ids = list(lm.tokenizer(text, add_special_tokens=True)["input_ids"])[:max_tokens]  # type: ignore[operator]
            if len(ids) < 2:
                continue
            x = torch.tensor([ids], device=lm.device)
            hidden = lm.body(input_ids=x, use_cache=False).last_hidden_state[0, :-1]
            targets = x[0, 1:]
            for s in range(0, hidden.shape[0], chunk):
                logits = head(hidden[s: s + chunk]).float()
                if softcap:
                    logits = torch.tanh(logits / softcap) * softcap
                nll = torch.logsumexp(logits, -1) - logits.gather(-1, targets[s: s + chunk].unsqueeze(-1)).squeeze(-1)
                total_nll += float(nll.double().sum())
            total += len(ids) - 1
    if total == 0:
        return math.nan, 0
    return math.exp(total_nll / total), total


def evaluate(lm: LoadedModel, specs: Sequence[InvariantSpec], neutral: Sequence[str], settings: EvalSettings, *,
             readout: object | None = None, cancel: threading.Event | None = None,
             on_progress: Callable[[int, int], None] | None = None, extra_key: str = "",
             progress_bar: bool = True, weights_hash: str | None = None) -> Evaluation:
    """Held-out pass rate and mean margin of every invariant, and neutral perplexity, on the weights as they are.

    `weights_hash`: the caller's hash of the current weights (hashing 1 GB takes seconds); default: computed.
    """
    t0 = time.monotonic()
    weights = weights_hash or lm.weights_hash(refresh=True)
    out: dict[str, InvariantEval] = {}
    total = len(specs) + (1 if settings.perplexity_texts else 0)
    bar = None
    if progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="dream: evaluate", unit="part", file=sys.stderr, dynamic_ncols=True, leave=False)
    try:
        for i, spec in enumerate(specs):
            if cancel is not None and cancel.is_set():
                raise EvaluationCancelled("evaluation cancelled")
            cases = held_out_cases(spec, settings.held_out_templates)
            judge = build_judge(spec, JudgeContext(lm=lm, readout=readout,  # type: ignore[arg-type]
                                                   max_new_tokens=settings.judge_max_new_tokens, seed=settings.seed))
            verdicts = judge.judge_model(cases)
            # The preference judge's score is this margin already (forced choice); other judges need it computed.
            margins = ([float(v.score) for v in verdicts] if spec.judge.kind == "preference"
                       else preference_margins(lm, cases))
            passed = sum(v.passed for v in verdicts)
            out[spec.name] = InvariantEval(
                name=spec.name, judge=spec.judge.kind, cases=len(cases), passed=passed,
                pass_rate=passed / len(cases) if cases else 0.0,
                mean_margin=sum(margins) / len(margins) if margins else 0.0,
                failed_cases=[c.id for c, v in zip(cases, verdicts) if not v.passed],
                case_margins={c.id: round(m, 5) for c, m in zip(cases, margins)})
            if bar is not None:
                bar.update(1)
            if on_progress is not None:
                on_progress(i + 1, total)
        ppl, n_tok = (math.nan, 0)
        if settings.perplexity_texts:
            ppl, n_tok = perplexity(lm, list(neutral)[: settings.perplexity_texts], settings.perplexity_max_tokens)
            if bar is not None:
                bar.update(1)
            if on_progress is not None:
                on_progress(total, total)
    finally:
        if bar is not None:
            bar.close()
    return Evaluation(key=eval_key(weights, specs, settings, extra_key), weights_hash=weights, invariants=out,
                      perplexity=None if math.isnan(ppl) else ppl, perplexity_tokens=n_tok,
                      seconds=time.monotonic() - t0)


class EvaluationCancelled(Exception):
    """The cycle was cancelled during an evaluation."""


def regressions(before: Evaluation, after: Evaluation, *, tolerance: float, max_perplexity_rise: float) -> list[str]:
    """Why the trained weights must be rolled back (empty: keep them).

    An invariant regresses when its held-out pass rate falls by more than `tolerance` (absolute,
    e.g. 0.05 = 5 points); general text regresses when perplexity rises by more than
    `max_perplexity_rise` (absolute, in perplexity units).
    """
    out = []
    for name, b in before.invariants.items():
        a = after.invariants.get(name)
        if a is None:
            continue
        if a.pass_rate < b.pass_rate - tolerance - 1e-12:
            out.append(f"invariant {name!r}: held-out pass rate fell from {b.pass_rate:.3f} to {a.pass_rate:.3f} "
                       f"(more than the tolerance {tolerance:g})")
    if (before.perplexity is not None and after.perplexity is not None
            and after.perplexity > before.perplexity + max_perplexity_rise):
        out.append(f"neutral-text perplexity rose from {before.perplexity:.3f} to {after.perplexity:.3f} "
                   f"(more than {max_perplexity_rise:g})")
    return out


def neutral_texts(root: object | None = None) -> list[str]:
    """The corpus's neutral paragraphs (amygdala.corpus), in file order."""
    from amygdala.corpus import load_corpus

    return [t.text for t in load_corpus(root).neutral]  # type: ignore[arg-type]
