"""Slow tests on the real embedded Gemma 3 270M: readout quality and steering on a corpus subset.

The full readout (267 emotions, all layers) takes minutes on 2 cores; these tests train a readout
on four families and five middle layers instead, which is enough to check that the pipeline
works on the real model and that the numbers mean something.
"""

from __future__ import annotations

import pytest
import torch

from amygdala.corpus import Corpus, Scenario, load_corpus
from amygdala.engine.activations import Pooling
from amygdala.engine.readout import ReadoutManager
from amygdala.training.vectors.build import build_readout
from amygdala.training.vectors.caa import FitOptions

pytestmark = pytest.mark.slow
FAMILIES = ("high_arousal_positive", "fear", "sadness", "anger")
PER_FAMILY = 6
LAYERS = [5, 6, 7, 8, 9]


def subset(corpus: Corpus) -> Corpus:
    keep = set()
    for fam in FAMILIES:
        keep.update(e.id for e in corpus.manifest.in_family(fam)[:PER_FAMILY])
    keep |= {"joyful", "terrified", "furious", "melancholy"}
    stories = {e: v for e, v in corpus.stories.items() if e in keep}
    scenarios = {n: Scenario(n, s.baseline, {f: t for f, t in s.framings.items() if f in keep}) for n, s in corpus.scenarios.items()}
    return Corpus(corpus.manifest, corpus.root, stories, scenarios, corpus.neutral)


@pytest.fixture(scope="module")
def subset_readout(embedded_lm, tmp_path_factory):
    out = tmp_path_factory.mktemp("embedded-readout")
    res = build_readout(embedded_lm, subset(load_corpus()), out, layers=LAYERS,
                        grid=(FitOptions(Pooling("mean", 10), True, 0.0, 0.5),), plots=False, echo=lambda m: None)
    return res, ReadoutManager.from_file(out, model=embedded_lm)


def test_held_out_accuracy_well_above_chance(subset_readout):
    res, _ = subset_readout
    s = res.report.summary()
    best = s["best_layer"]
    assert best["top1"] > 3 * s["chance"]["top1"], s
    assert best["family"] > 1.5 * s["chance"]["family"], s


def test_readout_separates_families_on_fresh_text(subset_readout):
    _, r = subset_readout
    texts = {
        "high_arousal_positive": "She read the letter twice and then shrieked, spinning around the kitchen, laughing, "
                                 "grabbing her brother's hands: they had said yes, after all this time, yes!",
        "fear": "Something moved behind the door. He held his breath, heart slamming, and backed toward the stairs "
                "without taking his eyes off the handle as it slowly began to turn.",
    }
    scores = r.read(list(texts.values()))
    fams = r.manifest.families
    for (fam, _), s in zip(texts.items(), scores):
        by_fam = {f: float(s.combined[[i for i, g in enumerate(fams) if g == f]].mean()) for f in set(fams)}
        assert max(by_fam, key=by_fam.get) == fam, by_fam


def test_steering_moves_the_reread_score(embedded_lm, subset_readout):
    from amygdala.engine.steering_eval import NEUTRAL_PROMPTS, sweep

    _, r = subset_readout
    res = sweep(embedded_lm, r, "joyful", [0.04], list(NEUTRAL_PROMPTS[:3]), max_new_tokens=24)
    base = next(s for s in res.per_alpha if s.alpha == 0.0)
    up = next(s for s in res.per_alpha if s.alpha == 0.04)
    assert up.mean_score > base.mean_score, res.per_alpha
    # and the model is untouched afterwards
    ids = r.encode("The library was quiet")
    with torch.no_grad():
        a = embedded_lm.model(torch.tensor([ids])).logits
    with torch.no_grad():
        b = embedded_lm.model(torch.tensor([ids])).logits
    assert torch.equal(a, b)


def test_short_texts_are_not_inflated(subset_readout):
    """Length calibration: a one-line text scores on the same scale as a paragraph."""
    from amygdala.engine.activations import pooled_activations

    _, r = subset_readout
    short = ["I read it twice.", "The door opened.", "We finally won!", "Nothing changed today.", "She smiled at me."]
    ids = [r.encode(t) for t in short]
    pooled = pooled_activations(r.lm, ids, r.default_layers, r.pooling)
    calibrated, naive = [], []
    for k, seq in enumerate(ids):
        m = r.pooled_tokens(len(seq))
        calibrated.append(float(torch.stack([r.layers[i].scores(pooled[i][k], m) for i in r.default_layers]).mean(0).abs().max()))
        naive.append(float(torch.stack([r.layers[i].scores(pooled[i][k]) for i in r.default_layers]).mean(0).abs().max()))
    assert sum(calibrated) / 5 < 0.8 * sum(naive) / 5, (calibrated, naive)
