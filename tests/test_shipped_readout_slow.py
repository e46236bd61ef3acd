"""The shipped readout of the embedded model is what a build from scratch produces today (slow: ~3 min).

If this fails after a change to the corpus, the fit or the build settings, re-ship with
`amygdala vectors train --ship` (and bump shipped.BUILD_VERSION if the fit changed but no setting did).
"""

from __future__ import annotations

import os

import pytest
import torch

from amygdala.corpus import load_corpus
from amygdala.engine.readout import ReadoutManager, readout_dir_name
from amygdala.training.vectors.build import build_readout, ensure_readout
from amygdala.training.vectors.shipped import SHIPPED_ROOT, settings_hash, shipped_builds

pytestmark = pytest.mark.slow
TOLERANCE = 2e-3  # float16 vectors (<= 1e-3, measured at ship time) plus thread-count float noise


def _shipped(lm):
    d = SHIPPED_ROOT / readout_dir_name(lm.name, lm.path)
    builds = dict(shipped_builds())
    assert d in builds, f"no shipped readout for {lm.name} in {SHIPPED_ROOT}; ship one with `amygdala vectors train --ship`"
    return d, builds[d]


def test_fresh_home_uses_the_shipped_readout_at_once(embedded_config, embedded_lm, tmp_path, monkeypatch):
    import amygdala.training.vectors.build as build_mod

    d, _ = _shipped(embedded_lm)
    cfg = embedded_config.model_copy(update={"home": tmp_path / "home"})  # fresh home, the same loaded model
    monkeypatch.setattr(build_mod, "build_readout", lambda *a, **k: pytest.fail(f"rebuilt instead of using {d}"))
    lines: list[str] = []
    r = ensure_readout(embedded_lm, cfg, echo=lines.append)
    assert any("using the shipped emotion readout" in x for x in lines), lines
    assert len(r.concepts) == 267 and r.manifest.drift_probe


def _same_readout(fresh, stored, texts, fix):
    m_new, m_old = fresh.manifest, stored.manifest
    for key in ("concepts", "families", "layers", "default_layers", "pooling", "standardize", "pca_share", "whiten",
                "window", "corpus_hash", "drift_probe"):
        assert getattr(m_new, key) == getattr(m_old, key), f"{key} differs; {fix}"
    assert m_new.model.weights_hash == m_old.model.weights_hash, fix
    a = fresh.read(texts, layers=m_new.layers)
    b = stored.read(texts, layers=m_old.layers)
    worst = max(float((x.per_layer[i] - y.per_layer[i]).abs().max()) for x, y in zip(a, b) for i in m_new.layers)
    assert worst <= TOLERANCE, f"scores differ from the stored readout by up to {worst:.2e} z; {fix}"
    for i in m_new.layers:
        assert torch.allclose(fresh.layers[i].score_std, stored.layers[i].score_std, rtol=1e-3, atol=1e-5), fix


def _probe_texts(corpus):
    texts = [t.text for t in corpus.neutral[:6]] + [s[0].text for _, s in sorted(corpus.stories.items())[:10]]
    return texts + ["I finally got the tests passing after eleven days.", "ok", "Why does nobody ever answer my emails?"]


def test_shipped_readout_inputs_are_todays(embedded_lm):
    """Same weights, corpus and build settings as at ship time: with the subset rebuild below (same code
    path, same settings), the shipped readout is what a full build from scratch produces today."""
    _, b = _shipped(embedded_lm)
    assert b.weights_hash == embedded_lm.weights_hash(), "weights hash differs: the embedded model changed; re-ship"
    assert b.corpus_hash == load_corpus().content_hash(), "corpus hash differs: the corpus was edited; re-ship"
    assert b.settings_hash == settings_hash(), "settings hash differs: the build settings changed; re-ship"


@pytest.mark.timeout(1800)  # two families: ~2 min on 2 quiet cores
def test_rebuild_of_a_corpus_subset_from_scratch_matches_its_stored_readout(embedded_lm, tmp_path):
    """The whole build path (forward passes, validation grid, fit, length calibration, probe) on two
    families, against the readout the same code wrote at ship time: a change to the fit that did not
    re-ship shows here in ~2 minutes instead of the full build's 10-25 (run that one with
    AMYGDALA_FULL_REBUILD=1). Fix: re-ship, then `python tests/data/make_subset_readout.py`."""
    import importlib.util
    from pathlib import Path

    data = Path(__file__).parent / "data"
    spec = importlib.util.spec_from_file_location("make_subset_readout", data / "make_subset_readout.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    corpus = load_corpus().families_subset(mod.SUBSET_FAMILIES)
    fresh = build_readout(embedded_lm, corpus, tmp_path / "fresh", plots=False, echo=lambda m: None, cache_dir=None).readout
    stored = ReadoutManager.from_file(mod.OUT, model=embedded_lm)
    _same_readout(fresh, stored, _probe_texts(corpus), "re-ship (`amygdala vectors train --ship`), then run "
                  "`python tests/data/make_subset_readout.py`")


@pytest.mark.skipif(not os.environ.get("AMYGDALA_FULL_REBUILD"), reason="the full rebuild takes 10-25 min; set "
                    "AMYGDALA_FULL_REBUILD=1 (run it before shipping; the subset rebuild runs always)")
@pytest.mark.timeout(7200)  # one pass over 216k tokens: 12 min on 2 quiet cores, 30+ on a busy machine
def test_rebuild_from_scratch_matches_the_shipped_readout(embedded_lm, tmp_path):
    d, _ = _shipped(embedded_lm)
    corpus = load_corpus()
    fresh = build_readout(embedded_lm, corpus, tmp_path / "fresh", plots=False, echo=lambda m: None, cache_dir=None).readout
    _same_readout(fresh, ReadoutManager.from_file(d, model=embedded_lm), _probe_texts(corpus), "re-ship")
