"""What a dream cycle practises: which training cases of which invariants, drawn how.

The pool of an invariant is its *training-side* cases only: written cases not held out, template
fills (from the templates' variables and from the graph's memories) and model-written variations
of training cases. Held-out cases never enter a pool (`build_pool` refuses them), so nothing a
cycle samples can reach the trainer from the held-out side.

Weighting, from the history the graph keeps (each finished cycle records its cases' verdicts):
- a case whose on-policy samples failed last time it was seen weighs `failed_weight` (it is
  where learning is needed), plus a little per earlier failure;
- a case never seen weighs `new_weight`;
- a case that passed last time is *replay*: `replay_fraction` of each invariant's draw is taken
  from them and interleaved with the rest, so behaviour the model already has is rehearsed, not
  forgotten while it learns the failing cases (interleaved replay);
- invariants that recent pending corrections are about get a larger share (`correction_boost`
  per correction, at most double), since a correction is the freshest evidence of a failure.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from amygdala.engine.model import LoadedModel
from amygdala.memory_graph import DreamCycle, MemoryGraph
from amygdala.memory_graph.sampling import ReplayConfig, sample_for_replay

from .cases import Case, expand_templates, split, variation
from .invariants import InvariantSpec

_SINGLE_TURN = re.compile(r"^User: (?P<user>[^\n]+)\nAssistant:$")
VARIATION_PROMPT = ("Here is a request, and the same request said again in different words.\n"
                    "Request: {user}\nSame request, different words:")


@dataclass
class CaseHistory:
    """What earlier cycles saw of one case."""

    seen: int = 0
    failures: int = 0  # cycles in which at least one of its samples failed
    last_failed: bool = False


@dataclass(frozen=True)
class Pick:
    case: Case
    weight: float
    why: str  # "failed before" | "new" | "replay"


@dataclass
class Curriculum:
    picks: list[Pick]
    pool_sizes: dict[str, int] = field(default_factory=dict)
    memories: int = 0
    variations: int = 0

    @property
    def cases(self) -> list[Case]:
        return [p.case for p in self.picks]


def case_history(cycles: Iterable[DreamCycle]) -> dict[str, CaseHistory]:
    """Per case id, from the `cases` records of finished cycles, oldest first."""
    out: dict[str, CaseHistory] = {}
    done = sorted((c for c in cycles if c.finished is not None), key=lambda c: c.time)
    for cyc in done:
        for rec in cyc.cases:
            if not isinstance(rec, dict) or not isinstance(rec.get("id"), str):
                continue
            samples, failed = int(rec.get("samples") or 0), int(rec.get("failed") or 0)
            if samples == 0:
                continue
            h = out.setdefault(rec["id"], CaseHistory())
            h.seen += 1
            h.failures += failed > 0
            h.last_failed = failed > 0
    return out


def memory_texts(graph: MemoryGraph, k: int, seed: int) -> list[str]:
    """Up to k memory texts, salient and recent ones first, old ones interleaved (the graph's replay sampler)."""
    if k <= 0:
        return []
    items = sample_for_replay(graph, k, seed=seed, config=ReplayConfig(kinds=("memory",)))
    texts = []
    for item in items:
        node = graph.get(item.node_id)
        text = getattr(node, "text", None)
        if isinstance(text, str) and text.strip():
            texts.append(text)
    return texts


def build_pool(spec: InvariantSpec, rng: random.Random, *, templates: int, memories: Sequence[str] = (),
               variations: Sequence[Case] = ()) -> list[Case]:
    """The invariant's training-side cases: written, template and memory fills, variations (never held out)."""
    train, _held = split(spec)
    pool = list(train)
    pool += [c for c in expand_templates(spec, rng, templates, memories) if not c.held_out]
    pool += [c for c in variations if not c.held_out and c.invariant == spec.name]
    seen: set[str] = set()
    out = []
    for c in pool:
        if c.held_out:  # defence in depth: the filters above already drop them
            raise AssertionError(f"held-out case {c.id} reached the training pool of {spec.name!r}")
        if c.id not in seen:
            seen.add(c.id)
            out.append(c)
    return out


def _weighted_draw(items: list[tuple[Case, float]], k: int, rng: random.Random) -> list[tuple[Case, float]]:
    """k weighted draws without replacement (Efraimidis-Spirakis keys), in draw order."""
    keyed = []
    for case, w in items:
        u = 1.0 - rng.random()
        keyed.append((math.log(u) / w if w > 0 else -math.inf, case.id, case, w))
    keyed.sort(key=lambda t: (t[0], t[1]), reverse=True)
    return [(c, w) for _, _, c, w in keyed[:k]]


def _interleave(fresh: list[Pick], replay: list[Pick]) -> list[Pick]:
    total = len(fresh) + len(replay)
    out: list[Pick] = []
    f = r = 0
    for step in range(total):
        if r < len(replay) and (f >= len(fresh) or (r + 0.5) * total <= (step + 1) * len(replay)):
            out.append(replay[r])
            r += 1
        else:
            out.append(fresh[f])
            f += 1
    return out


def sample_cases(pools: Mapping[str, list[Case]], history: Mapping[str, CaseHistory], rng: random.Random, *,
                 per_invariant: int, replay_fraction: float = 0.25, failed_weight: float = 3.0,
                 new_weight: float = 1.5, replay_weight: float = 1.0,
                 boosts: Mapping[str, float] | None = None) -> list[Pick]:
    """Each invariant's share of cases: failing ones weighted up, replay interleaved (see the module docstring)."""
    if per_invariant < 1:
        raise ValueError(f"per_invariant={per_invariant}: sample at least one case per invariant")
    if not 0 <= replay_fraction <= 1:
        raise ValueError(f"replay_fraction={replay_fraction}: a fraction in [0, 1]")
    per_inv: list[list[Pick]] = []
    for name in sorted(pools):
        pool = pools[name]
        n = min(len(pool), round(per_invariant * min(2.0, (boosts or {}).get(name, 1.0))))
        if n == 0:
            continue
        passed = [(c, replay_weight) for c in pool if c.id in history and not history[c.id].last_failed]
        others = []
        for c in pool:
            h = history.get(c.id)
            if h is None:
                others.append((c, new_weight))
            elif h.last_failed:
                others.append((c, failed_weight + 0.5 * max(0, h.failures - 1)))
        k_replay = min(len(passed), round(n * replay_fraction))
        k_fresh = min(len(others), n - k_replay)
        k_replay = min(len(passed), n - k_fresh)  # too few fresh cases: rehearse more
        fresh = [Pick(c, w, "new" if c.id not in history else "failed before")
                 for c, w in _weighted_draw(others, k_fresh, rng)]
        replay = [Pick(c, w, "replay") for c, w in _weighted_draw(passed, k_replay, rng)]
        per_inv.append(_interleave(fresh, replay))
    # Round-robin over invariants, so a time-capped cycle still touches every one of them.
    out: list[Pick] = []
    for i in range(max((len(p) for p in per_inv), default=0)):
        out += [p[i] for p in per_inv if i < len(p)]
    return out


def correction_boosts(invariant_names_by_id: Mapping[str, str], corrections: Iterable[object],
                      per_correction: float = 0.25) -> dict[str, float]:
    """1 + per_correction per pending correction about an invariant (the sampler caps it at 2)."""
    out: dict[str, float] = {}
    for corr in corrections:
        inv = invariant_names_by_id.get(getattr(corr, "invariant_id", None) or "")
        if inv is not None:
            out[inv] = out.get(inv, 1.0) + per_correction
    return out


def write_variations(lm: LoadedModel, spec: InvariantSpec, parents: Sequence[Case], n: int, *, seed: int,
                     temperature: float = 0.7, max_new_tokens: int = 40) -> list[Case]:
    """Up to n model-written rewordings of single-turn training cases ("User: ...\\nAssistant:").

    The model is asked to say the user's request in other words; a rewording is kept only if it is
    one plausible line (8 to 300 characters, no dialogue markers, not the original), and its case
    keeps the parent's preferred and rejected replies. Only training-side parents are used, and a
    rewording whose context is on the held-out side anyway is dropped.
    """
    from .respond import _decode_batch  # the batched sampler; private to the dream package

    usable = [c for c in parents if not c.held_out and _SINGLE_TURN.match(c.context)]
    if n <= 0 or not usable:
        return []
    rng = random.Random(seed)
    chosen = rng.sample(usable, min(n, len(usable)))
    tok = lm.tokenizer
    prompts = []
    for c in chosen:
        user = _SINGLE_TURN.match(c.context)["user"]  # type: ignore[index]
        prompts.append(list(tok(VARIATION_PROMPT.format(user=user), add_special_tokens=True)["input_ids"]))  # type: ignore[operator]
    seeds = [seed * 1_000_003 + i for i in range(len(chosen))]
    texts = _decode_batch(lm, prompts, seeds, temperature, 1.0, max_new_tokens) if prompts else []
    held_contexts = {c.context for c in split(spec)[1]}
    out = []
    for parent, (text, _, _) in zip(chosen, texts):
        new = text.split("\n", 1)[0].strip()
        old = _SINGLE_TURN.match(parent.context)["user"]  # type: ignore[index]
        if not 8 <= len(new) <= 300 or "User:" in new or "Assistant:" in new or new.lower() == old.lower():
            continue
        if not new.isprintable():
            continue
        context = f"User: {new}\nAssistant:"
        if context in held_contexts:  # a paraphrase that hit a held-out case's exact wording
            continue
        case = variation(parent, context, parent.preferred, parent.rejected)
        if not case.held_out:
            out.append(case)
    return out
