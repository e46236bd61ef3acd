"""Test a steering vector before training on it: side-by-side comparison and dose-response sweep.

Scores are the readout of the generated continuation re-read *without* steering, so they say what
the text expresses, not what was injected. Coherence is the perplexity of the continuation under
the unsteered model given the prompt: steering that raises the score by producing word salad shows
up as a perplexity blow-up.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel

from .generation import sequence_logprobs
from .steering import build_plan, generate_steered

if TYPE_CHECKING:
    from .model import LoadedModel
    from .readout import ReadoutManager


class SideResult(BaseModel):
    text: str
    scores: dict[str, float | None]
    tokens: int
    perplexity: float | None
    score_note: str | None = None  # why the scores are null, when they are


class SteeringComparison(BaseModel):
    prompt: str
    concepts: dict[str, float]
    layers: list[int]
    positions: str
    seed: int | None
    temperature: float
    baseline: SideResult
    steered: SideResult
    delta: dict[str, float | None]


def reread(readout: "ReadoutManager", text: str, concepts: Sequence[str]) -> dict[str, float | None]:
    """Unsteered readout of `text` for `concepts` (None when the text is empty)."""
    if unreadable(text) is not None:
        return {c: None for c in concepts}
    s = readout.read([text])[0].combined
    return {c: round(float(s[readout.concept_index(c)]), 4) for c in concepts}


def unreadable(text: str, finish_reason: str | None = None, tokens: int | None = None) -> str | None:
    """Why a continuation has no score (None when it can be read): said next to its null scores."""
    from .tokens import only_control

    if not text:
        if finish_reason == "eos" and tokens == 1:
            return "no score: the model ended the continuation at once (end-of-sequence as its first token), so there is no text to read"
        return "no score: the continuation decoded to no text (only special tokens), so there is nothing to read"
    if not text.strip():
        return "no score: the continuation is whitespace only, so there is nothing to read"
    if only_control(text):
        return "no score: the continuation has only control or invisible characters, so there is nothing to read"
    return None


def perplexity(lm: "LoadedModel", prompt_ids: list[int], continuation_ids: list[int]) -> float | None:
    if not continuation_ids:
        return None
    lp = sequence_logprobs(lm, prompt_ids, continuation_ids)
    return float(math.exp(-float(lp.mean())))


def _side(lm, readout, prompt_ids, plan, concepts, **gen) -> SideResult:
    res = generate_steered(lm, prompt_ids, plan, **gen)
    ids = [t for t in res.token_ids]
    return SideResult(text=res.text, scores=reread(readout, res.text, concepts), tokens=len(ids),
                      perplexity=perplexity(lm, prompt_ids, ids),
                      score_note=unreadable(res.text, res.finish_reason, len(ids)))


def compare(lm: "LoadedModel", readout: "ReadoutManager", prompt: str, concepts: dict[str, float],
            layers: list[int] | None = None, positions: str = "both", max_new_tokens: int = 48,
            seed: int | None = 0, temperature: float = 0.7, top_p: float = 0.95,
            vectors: list[tuple[Path | str, float]] | None = None,
            progress: Callable[[float, float, str], None] | None = None) -> SteeringComparison:
    """Baseline and steered generation with the same seed, each re-read without steering."""
    plan = build_plan(readout, concepts, layers, positions, vectors)
    used_layers = sorted(plan.pushes)
    ids = readout.encode(prompt)
    names = list(concepts)
    gen = dict(max_new_tokens=max_new_tokens, seed=seed, temperature=temperature, top_p=top_p)
    if progress:
        progress(0, 2, "generating the unsteered baseline")
    base = _side(lm, readout, ids, None, names, **gen)
    if progress:
        progress(1, 2, "generating the steered continuation")
    steered = _side(lm, readout, ids, plan, names, **gen)
    if progress:
        progress(2, 2, "done")
    delta = {c: (None if base.scores[c] is None or steered.scores[c] is None
                 else round(steered.scores[c] - base.scores[c], 4)) for c in names}
    return SteeringComparison(prompt=prompt, concepts=concepts, layers=used_layers, positions=positions, seed=seed,
                              temperature=temperature, baseline=base, steered=steered, delta=delta)


@dataclass
class SweepPoint:
    prompt_index: int
    alpha: float
    score: float | None
    perplexity: float | None
    text: str


@dataclass
class AlphaSummary:
    alpha: float
    mean_score: float | None
    rise_fraction: float | None  # share of prompts whose score moved in alpha's direction vs alpha 0
    median_perplexity: float | None


@dataclass
class SweepResult:
    concept: str
    layers: list[int]
    alphas: list[float]
    points: list[SweepPoint]
    per_alpha: list[AlphaSummary] = field(default_factory=list)
    slope: float | None = None  # re-read score per unit alpha (least squares over all points)
    wrong_way: float | None = None  # share of (prompt, alpha != 0) moving against alpha's sign
    best_alpha: float | None = None  # highest mean score with median perplexity <= 2x baseline's
    baseline_perplexity: float | None = None

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def sweep(lm: "LoadedModel", readout: "ReadoutManager", concept: str, alphas: Sequence[float], prompts: Sequence[str],
          layers: list[int] | None = None, positions: str = "both", max_new_tokens: int = 32, seed: int = 0,
          temperature: float = 0.0, progress: Callable[[int, int], None] | None = None) -> SweepResult:
    """Dose-response of one concept over many prompts (greedy by default: less noise per point)."""
    alphas = sorted(set(float(a) for a in alphas) | {0.0})
    readout.concept_index(concept)
    plans = {a: build_plan(readout, {concept: a}, layers, positions) for a in alphas}
    used = sorted(plans[alphas[-1]].pushes) if alphas else []
    points: list[SweepPoint] = []
    total, done = len(prompts) * len(alphas), 0
    for pi, prompt in enumerate(prompts):
        ids = readout.encode(prompt)
        for a in alphas:
            res = generate_steered(lm, ids, plans[a] if a != 0 else None, max_new_tokens=max_new_tokens, seed=seed,
                                   temperature=temperature)
            score = reread(readout, res.text, [concept])[concept]
            points.append(SweepPoint(pi, a, score, perplexity(lm, ids, res.token_ids), res.text))
            done += 1
            if progress:
                progress(done, total)
    return summarise(SweepResult(concept, used, alphas, points))


def summarise(r: SweepResult) -> SweepResult:
    base = {p.prompt_index: p for p in r.points if p.alpha == 0.0}
    per_alpha = []
    for a in r.alphas:
        pts = [p for p in r.points if p.alpha == a]
        scores = [p.score for p in pts if p.score is not None]
        ppl = [p.perplexity for p in pts if p.perplexity is not None]
        rises = [((p.score - base[p.prompt_index].score) * (1 if a > 0 else -1)) > 0 for p in pts
                 if a != 0 and p.score is not None and base.get(p.prompt_index) and base[p.prompt_index].score is not None]
        per_alpha.append(AlphaSummary(a, statistics.fmean(scores) if scores else None,
                                      (sum(rises) / len(rises)) if rises else None,
                                      statistics.median(ppl) if ppl else None))
    r.per_alpha = per_alpha
    xy = [(p.alpha, p.score) for p in r.points if p.score is not None]
    if len({x for x, _ in xy}) > 1:
        mx = statistics.fmean(x for x, _ in xy)
        my = statistics.fmean(y for _, y in xy)
        r.slope = sum((x - mx) * (y - my) for x, y in xy) / sum((x - mx) ** 2 for x, _ in xy)
    moved = [not s.rise_fraction for s in per_alpha if s.alpha != 0 and s.rise_fraction is not None]
    signs = []
    for p in r.points:
        b = base.get(p.prompt_index)
        if p.alpha != 0 and p.score is not None and b is not None and b.score is not None:
            signs.append((p.score - b.score) * (1 if p.alpha > 0 else -1) < 0)
    r.wrong_way = (sum(signs) / len(signs)) if signs else (None if not moved else 0.0)
    zero = next((s for s in per_alpha if s.alpha == 0.0), None)
    r.baseline_perplexity = zero.median_perplexity if zero else None
    ok = [s for s in per_alpha if s.alpha > 0 and s.mean_score is not None and s.median_perplexity is not None
          and (r.baseline_perplexity is None or s.median_perplexity <= 2 * r.baseline_perplexity)]
    r.best_alpha = max(ok, key=lambda s: s.mean_score).alpha if ok else None
    return r


def plot_sweep(r: SweepResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    xs = [s.alpha for s in r.per_alpha]
    for pi in sorted({p.prompt_index for p in r.points}):
        pts = sorted((p.alpha, p.score) for p in r.points if p.prompt_index == pi and p.score is not None)
        if pts:
            axes[0].plot(*zip(*pts), color="grey", alpha=0.25, linewidth=0.8)
    axes[0].plot(xs, [s.mean_score for s in r.per_alpha], marker="o", color="tab:red", linewidth=2, label="mean")
    axes[0].set_title(f"re-read '{r.concept}' score (slope {r.slope:+.2f}/alpha)" if r.slope is not None else r.concept)
    axes[0].set_xlabel("alpha (x typical residual norm)")
    axes[0].legend()
    axes[1].bar([str(a) for a in xs], [s.rise_fraction or 0 for s in r.per_alpha], color="tab:green")
    axes[1].axhline(0.8, linestyle=":", color="k")
    axes[1].set_title(f"share of prompts moved in alpha's direction (wrong way {r.wrong_way or 0:.0%})")
    axes[1].set_ylim(0, 1)
    axes[2].plot(xs, [s.median_perplexity for s in r.per_alpha], marker="o")
    if r.baseline_perplexity:
        axes[2].axhline(2 * r.baseline_perplexity, linestyle=":", color="k", label="2x baseline")
        axes[2].legend()
    axes[2].set_yscale("log")
    axes[2].set_title("median perplexity under the unsteered model")
    fig.suptitle(f"steering sweep: {r.concept} at layers {r.layers}; best alpha {r.best_alpha}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# Twenty neutral prompts for dose-response sweeps: everyday openings with no emotional lean, so a
# rise in a concept's re-read score comes from the steering, not from the prompt.
NEUTRAL_PROMPTS: tuple[str, ...] = (
    "The meeting was moved to Thursday afternoon, and",
    "She opened the window and looked at the street below.",
    "The recipe calls for two cups of flour and",
    "He walked to the station as he did every morning.",
    "The report on the quarterly figures begins with",
    "After lunch, the students returned to the classroom and",
    "The train left the platform at exactly seven o'clock.",
    "I read the email twice before answering it.",
    "The river runs through the middle of the town, and",
    "They set up the tent near the edge of the field.",
    "The new version of the software changes how",
    "My neighbour was painting the fence when",
    "The museum opens at ten and closes at six, and",
    "We sat down at the table and the waiter brought",
    "The package arrived on Tuesday, a day earlier than",
    "He picked up the phone and dialled the number.",
    "The library was quiet in the late afternoon.",
    "Tomorrow the weather will be cloudy with",
    "She finished the last page of the book and",
    "The car turned left at the end of the road, and",
)
