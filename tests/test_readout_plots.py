"""Validation plots: produced, integer layer ticks, title inside the figure, concept labels that never overlap."""

from __future__ import annotations

import itertools

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest

from amygdala.corpus import load_corpus
from amygdala.engine.activations import Pooling
from amygdala.training.vectors.build import build_readout
from amygdala.training.vectors.caa import FitOptions
from amygdala.training.vectors.validation import (
    accuracy_figure,
    concept_map_figure,
    place_labels,
    write_plots,
)
from tests.corpus_fixture import make_corpus


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_lm):
    root = tmp_path_factory.mktemp("plots")
    return build_readout(tiny_lm, load_corpus(make_corpus(root / "c")), root / "r",
                         grid=(FitOptions(Pooling("mean", 2), True, 0.0, 0.5), FitOptions(Pooling("last"), False, 0.0)),
                         plots=False, echo=lambda m: None, progress=False)


def _boxes(fig, texts):
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    return [t.get_window_extent(r) for t in texts]


def test_all_pngs_are_written(built, tmp_path):
    paths = write_plots(built.report, built.readout, tmp_path / "out")
    assert [p.name for p in paths] == ["accuracy_by_layer.png", "cohesion_heatmap.png", "concept_map.png", "settings.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_accuracy_plot_has_integer_layer_ticks_and_an_unclipped_title(built):
    fig = accuracy_figure(built.report)
    ax = fig.axes[0]
    ticks = list(ax.get_xticks())
    layers = [m.layer for m in built.report.chosen_result().per_layer]
    assert ticks == layers and all(float(t).is_integer() for t in ticks)
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(i) for i in layers]
    [title] = _boxes(fig, [ax.title])
    assert fig.bbox.x0 <= title.x0 and title.x1 <= fig.bbox.x1 and title.y1 <= fig.bbox.y1
    plt.close(fig)


def test_concept_map_labels_do_not_overlap(built):
    fig = concept_map_figure(built.report, built.readout)
    ax = fig.axes[0]
    labels = [t for t in ax.texts if t.get_text() in built.readout.concepts]
    assert labels, "no concept labelled"
    boxes = _boxes(fig, labels)
    assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))
    plt.close(fig)


def test_place_labels_skips_the_crowded_centre_and_keeps_the_extremes():
    rng = np.random.default_rng(0)
    xy = np.concatenate([rng.normal(0, 0.05, (250, 2)), [[3, 0], [-3, 0.2], [0, 3], [0.1, -3]]])
    names = [f"concept_{i:03d}" for i in range(len(xy))]
    fig, ax = plt.subplots(figsize=(8, 6))
    ax.scatter(xy[:, 0], xy[:, 1])
    legend = ax.legend(["points"])
    n = place_labels(ax, xy, names, avoid=[legend], max_labels=60)
    texts = [t for t in ax.texts]
    assert n == len(texts) and 4 <= n < 60  # the crowd cannot all be labelled legibly
    assert {t.get_text() for t in texts} >= {names[-4], names[-3], names[-2], names[-1]}  # the extremes are named
    boxes = _boxes(fig, texts)
    assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))
    leg = _boxes(fig, [legend])[0]
    assert not any(b.overlaps(leg) for b in boxes)
    plt.close(fig)
