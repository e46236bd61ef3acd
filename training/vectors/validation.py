"""Layer-wise validation of readout vectors, and the choice of defaults it drives.

Train on the corpus training split, score the held-out stories, and report per layer: top-1 and
top-5 concept accuracy and family accuracy (each with its chance level); family cohesion (mean
cosine within a family minus mean cosine to other families); and how well the first principal
component of the vectors tracks the manifest's valence. The pooling / standardisation / PCA
setting and the default read layers are chosen here, by held-out accuracy, never guessed.

Caveat stated in the report: the same held-out split both selects the setting (among a small grid)
and measures it, so reported accuracy is mildly optimistic.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from amygdala.corpus import Corpus
from amygdala.engine.activations import Pooling
from amygdala.engine.readout import ReadoutManager

from .caa import CorpusActivations, FitOptions, fit_readout, small_linalg

log = logging.getLogger(__name__)

DEFAULT_GRID: tuple[FitOptions, ...] = tuple(
    FitOptions(p, std, pca, white)
    for p in (Pooling("last"), Pooling("mean", 0), Pooling("mean", 10))
    for std, white in ((False, 0.0), (True, 0.0), (True, 0.5), (True, 0.3))
    for pca in (0.0, 0.5)
)


@dataclass
class LayerMetrics:
    layer: int
    top1: float
    top5: float
    family: float
    cohesion: dict[str, float] = field(default_factory=dict)  # readout vectors (whitened when enabled)
    cohesion_caa: dict[str, float] = field(default_factory=dict)  # raw difference-of-means directions
    valence_r: float = 0.0

    @property
    def headline(self) -> float:
        return (self.top5 + self.family) / 2


@dataclass
class ConfigResult:
    options: str
    per_layer: list[LayerMetrics]
    combined: LayerMetrics | None = None

    def best(self) -> LayerMetrics:
        return max(self.per_layer, key=lambda m: m.headline)


@dataclass
class ValidationReport:
    n_train_texts: int
    n_held_out: int
    n_concepts: int
    chance: dict[str, float]
    configs: list[ConfigResult]
    chosen: str
    default_layers: list[int]
    caveat: str = ("the held-out split both selects the setting among the grid and measures it; "
                   "accuracies are mildly optimistic")

    def chosen_result(self) -> ConfigResult:
        return next(c for c in self.configs if c.options == self.chosen)

    def summary(self) -> dict:
        c = self.chosen_result()
        b = c.best()
        out = {"chosen": self.chosen, "default_layers": self.default_layers, "n_concepts": self.n_concepts,
               "n_held_out": self.n_held_out, "chance": self.chance,
               "best_layer": {"layer": b.layer, "top1": b.top1, "top5": b.top5, "family": b.family}}
        if c.combined is not None:
            out["default_layers_combined"] = {"top1": c.combined.top1, "top5": c.combined.top5, "family": c.combined.family}
        return out

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def held_out_mask(ca: CorpusActivations, held_uids: set[str]) -> torch.Tensor:
    return torch.tensor([t.uid in held_uids for t in ca.texts])


def accuracy(scores: torch.Tensor, truth: torch.Tensor, families: list[str]) -> tuple[float, float, float]:
    """(top1, top5, family) for (N, C) scores and true concept indices."""
    if scores.shape[0] == 0:
        return 0.0, 0.0, 0.0
    top5 = torch.topk(scores, min(5, scores.shape[1]), dim=1).indices
    top1 = top5[:, 0]
    fam_hit = [families[int(p)] == families[int(t)] for p, t in zip(top1, truth)]
    return (float((top1 == truth).float().mean()), float((top5 == truth.unsqueeze(1)).any(1).float().mean()),
            sum(fam_hit) / len(fam_hit))


def cohesion(vectors: torch.Tensor, families: list[str]) -> dict[str, float]:
    """Per family: mean cosine within the family minus mean cosine to concepts of other families."""
    v = vectors / vectors.norm(dim=1, keepdim=True)
    sim = v @ v.T
    fam = list(families)
    out: dict[str, float] = {}
    for f in sorted(set(fam)):
        inside = torch.tensor([x == f for x in fam])
        if inside.sum() < 2:
            continue
        within = sim[inside][:, inside]
        n = int(inside.sum())
        w = (within.sum() - within.diagonal().sum()) / (n * (n - 1))
        between = sim[inside][:, ~inside].mean()
        out[f] = float(w - between)
    return out


def valence_correlation(vectors: torch.Tensor, valence: list[float]) -> float:
    """|Pearson r| between the vectors' first principal component and valence (sign is arbitrary)."""
    x = vectors - vectors.mean(0)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    pc1 = x @ vh[0]
    val = torch.tensor(valence)
    r = torch.corrcoef(torch.stack([pc1, val]))[0, 1]
    return abs(float(r)) if torch.isfinite(r) else 0.0


def evaluate(readout: ReadoutManager, ca: CorpusActivations, held: torch.Tensor, corpus: Corpus,
             layers: Sequence[int] | None = None) -> tuple[list[LayerMetrics], torch.Tensor]:
    concepts = readout.concepts
    cidx = {c: i for i, c in enumerate(concepts)}
    rows = [i for i in held.nonzero().squeeze(1).tolist() if ca.label_of[i] in cidx]
    truth = torch.tensor([cidx[ca.label_of[i]] for i in rows], dtype=torch.long)
    families = readout.manifest.families
    valence = [corpus.manifest.by_id[c].valence for c in concepts]
    pooling = readout.pooling
    out = []
    with small_linalg():
        for layer in layers or readout.manifest.layers:
            out.append(_layer_metrics(readout, ca, rows, truth, families, valence, pooling, layer))
    return out, truth


def _layer_metrics(readout, ca, rows, truth, families, valence, pooling, layer) -> LayerMetrics:
    lr = readout.layers[layer]
    z = lr.scores(ca.acts.pooled[pooling][layer][rows])
    t1, t5, fa = accuracy(z, truth, families)
    return LayerMetrics(layer, t1, t5, fa, cohesion(lr.vectors, families), cohesion(lr.directions, families),
                        valence_correlation(lr.vectors, valence))


def choose_default_layers(per_layer: list[LayerMetrics], band: float = 0.9, max_layers: int = 3) -> list[int]:
    """Best layer plus its best-scoring neighbours within `band` of its headline metric."""
    best = max(per_layer, key=lambda m: m.headline)
    good = sorted((m for m in per_layer if m.headline >= band * best.headline and abs(m.layer - best.layer) <= 2),
                  key=lambda m: -m.headline)
    return sorted(m.layer for m in good[:max_layers])


def combined_metrics(readout: ReadoutManager, ca: CorpusActivations, held: torch.Tensor, layers: list[int]) -> LayerMetrics:
    cidx = {c: i for i, c in enumerate(readout.concepts)}
    rows = [i for i in held.nonzero().squeeze(1).tolist() if ca.label_of[i] in cidx]
    truth = torch.tensor([cidx[ca.label_of[i]] for i in rows], dtype=torch.long)
    pooled = {i: ca.acts.pooled[readout.pooling][i][rows] for i in layers}
    z = torch.stack([readout.layers[i].scores(pooled[i]) for i in layers]).mean(0)
    t1, t5, fa = accuracy(z, truth, readout.manifest.families)
    return LayerMetrics(-1, t1, t5, fa)


def validate(ca: CorpusActivations, corpus: Corpus, lm_ref, hidden_size: int,
             grid: Sequence[FitOptions] = DEFAULT_GRID, held_out_per_emotion: int = 1) -> ValidationReport:
    """Fit every grid setting on the training split, score held-out stories, choose the best."""
    _, held_texts = corpus.split(held_out_per_emotion)
    held = held_out_mask(ca, {t.uid for t in held_texts})
    train_mask = ~held
    concepts = [e for e in corpus.manifest.ids if any(l == e for l, h in zip(ca.label_of, train_mask) if h)]
    results: list[ConfigResult] = []
    readouts: dict[str, ReadoutManager] = {}
    for opts in grid:
        r = fit_readout(lm_ref, hidden_size, ca, corpus, opts, concepts=concepts, text_mask=train_mask)
        per_layer, truth = evaluate(r, ca, held, corpus)
        results.append(ConfigResult(opts.label(), per_layer))
        readouts[opts.label()] = r
        b = results[-1].best()
        log.info("%-22s best %s: top1 %.3f top5 %.3f family %.3f", opts.label(), b.layer, b.top1, b.top5, b.family)
    chosen = max(results, key=lambda c: c.best().headline)
    default_layers = choose_default_layers(chosen.per_layer)
    chosen.combined = combined_metrics(readouts[chosen.options], ca, held, default_layers)
    best = chosen.best()
    if chosen.combined.headline < best.headline:  # averaging layers must earn its place
        default_layers = [best.layer]
        chosen.combined = combined_metrics(readouts[chosen.options], ca, held, default_layers)
    fams = readouts[chosen.options].manifest.families
    n_c = len(concepts)
    fam_size = {f: fams.count(f) for f in set(fams)}
    held_rows = [ca.label_of[i] for i in held.nonzero().squeeze(1).tolist() if ca.label_of[i] in set(concepts)]
    fam_chance = sum(fam_size[corpus.manifest.family_of(e)] / n_c for e in held_rows) / max(len(held_rows), 1)
    return ValidationReport(
        n_train_texts=int(train_mask.sum()), n_held_out=len(held_rows), n_concepts=n_c,
        chance={"top1": 1 / n_c, "top5": min(5, n_c) / n_c, "family": fam_chance},
        configs=results, chosen=chosen.options, default_layers=default_layers)


def options_from_label(label: str, grid: Sequence[FitOptions] = DEFAULT_GRID) -> FitOptions:
    for o in grid:
        if o.label() == label:
            return o
    raise ValueError(f"unknown setting {label!r}")


def write_plots(report: ValidationReport, readout: ReadoutManager, out_dir: Path) -> list[Path]:
    """accuracy_by_layer.png, cohesion_heatmap.png, concept_map.png, settings.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, make in (("accuracy_by_layer.png", lambda: accuracy_figure(report)),
                       ("cohesion_heatmap.png", lambda: cohesion_figure(report)),
                       ("concept_map.png", lambda: concept_map_figure(report, readout)),
                       ("settings.png", lambda: settings_figure(report))):
        fig = make()
        paths.append(out_dir / name)
        fig.savefig(paths[-1], dpi=110)  # no bbox="tight": concept-map labels were placed for this exact layout
        plt.close(fig)
    return paths


def accuracy_figure(report: ValidationReport):
    """Held-out accuracy per layer against chance; one tick per layer (integers), title on two lines."""
    import matplotlib.pyplot as plt

    chosen = report.chosen_result()
    layers = [m.layer for m in chosen.per_layer]
    fig, ax = plt.subplots(figsize=(9, 5.2))
    for key, color in (("top1", "tab:blue"), ("top5", "tab:orange"), ("family", "tab:green")):
        ax.plot(layers, [getattr(m, key) for m in chosen.per_layer], marker="o", color=color, label=f"held-out {key}")
        ax.axhline(report.chance[key], color=color, linestyle=":", linewidth=1, label=f"chance {key}")
    for d in report.default_layers:
        ax.axvline(d, color="grey", alpha=0.3, linewidth=6)
    ax.set_xticks(layers, [str(i) for i in layers])
    ax.set_xlim(min(layers) - 0.5, max(layers) + 0.5)
    ax.set_xlabel("layer")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Readout accuracy by layer ({report.chosen})\n{report.n_concepts} concepts, {report.n_held_out} "
                 "held-out stories; grey = default layers", fontsize=11)
    ax.legend(fontsize=8, ncol=2)
    ax.set_ylim(0, 1)
    fig.tight_layout()
    return fig


def cohesion_figure(report: ValidationReport):
    import matplotlib.pyplot as plt

    chosen = report.chosen_result()
    layers = [m.layer for m in chosen.per_layer]
    fams = sorted({f for m in chosen.per_layer for f in m.cohesion})
    fig, axes = plt.subplots(1, 2, figsize=(15, 6))
    for ax, key, title in ((axes[0], "cohesion", "readout vectors"), (axes[1], "cohesion_caa", "CAA directions (raw mean difference)")):
        grid = torch.tensor([[getattr(m, key).get(f, float("nan")) for f in fams] for m in chosen.per_layer])
        lim = float(grid.nan_to_num(0).abs().max()) or 1.0
        im = ax.imshow(grid.T.numpy(), aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_yticks(range(len(fams)), fams, fontsize=8)
        ax.set_xticks(range(len(layers)), layers)
        ax.set_xlabel("layer")
        ax.set_title(f"family cohesion, {title}", fontsize=10)
        fig.colorbar(im, ax=ax)
    fig.suptitle("mean cosine within family minus mean cosine to other families (red = clustered, blue = anti-clustered)")
    fig.tight_layout()
    return fig


def concept_map_figure(report: ValidationReport, readout: ReadoutManager, max_labels: int = 70):
    """Concept vectors on their first two principal components; labels never overlap.

    The centre of the map is dense (most concepts are near the mean vector), so labelling every
    third concept, as before, piled labels on top of each other there. Labels are now placed
    greedily from the outside in (farthest from the centre first) and a label whose box would
    touch a placed one, the legend or the frame is left out: the extremes, which carry the map's
    meaning, are always named; the crowd in the middle is shown by colour (family) only.
    """
    import matplotlib.pyplot as plt

    layer = report.default_layers[0]
    v = readout.layers[layer].vectors
    x = v - v.mean(0)
    with small_linalg():
        _, _, vh = torch.linalg.svd(x, full_matrices=False)
    xy = (x @ vh[:2].T).numpy()
    famlist = readout.manifest.families
    uniq = sorted(set(famlist))
    cmap = plt.get_cmap("tab20", len(uniq))
    fig, ax = plt.subplots(figsize=(11, 9))
    for k, f in enumerate(uniq):
        idx = [i for i, g in enumerate(famlist) if g == f]
        ax.scatter(xy[idx, 0], xy[idx, 1], s=18, color=cmap(k), label=f)
    legend = ax.legend(fontsize=7, markerscale=1.5, loc="best")
    ax.set_title(f"Concept vectors at layer {layer}, first two principal components\n"
                 "labelled: the concepts farthest from the centre whose labels fit without overlap", fontsize=11)
    fig.tight_layout()
    placed = place_labels(ax, xy, readout.concepts, avoid=[legend], max_labels=max_labels)
    ax.set_title(f"Concept vectors at layer {layer}, first two principal components\n"
                 f"{placed} of {len(readout.concepts)} labelled: those farthest from the centre that fit without overlap",
                 fontsize=11)
    return fig


def place_labels(ax, xy, names: Sequence[str], avoid: Sequence = (), max_labels: int = 70, fontsize: float = 6.5) -> int:
    """Annotate points farthest from the median first, skipping any label that would overlap; returns how many."""
    import numpy as np

    fig = ax.figure
    ax.set_xlim(*ax.get_xlim())  # freeze the view: labels are placed in display space
    ax.set_ylim(*ax.get_ylim())
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    taken = [a.get_window_extent(renderer) for a in avoid]
    centre = np.median(xy, axis=0)
    scale = xy.std(axis=0) + 1e-12
    order = np.argsort(-np.linalg.norm((xy - centre) / scale, axis=1))
    # the four corners around the point, tried in turn: a point at the frame's edge still gets its label
    offsets = (((3, 2), "left", "bottom"), ((-3, 2), "right", "bottom"), ((3, -2), "left", "top"), ((-3, -2), "right", "top"))
    n = 0
    for i in order:
        if n >= max_labels:
            break
        for off, ha, va in offsets:
            t = ax.annotate(names[i], xy[i], xytext=off, textcoords="offset points", ha=ha, va=va, fontsize=fontsize,
                            alpha=0.85)
            box = t.get_window_extent(renderer)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if inside and not any(box.overlaps(b) for b in taken):
                taken.append(box.expanded(1.04, 1.15))
                n += 1
                break
            t.remove()
    return n


def settings_figure(report: ValidationReport):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    names = [c.options for c in report.configs]
    best = [c.best() for c in report.configs]
    xs = torch.arange(len(names)).numpy()
    ax.bar(xs - 0.2, [b.top5 for b in best], 0.4, label="best-layer top-5")
    ax.bar(xs + 0.2, [b.family for b in best], 0.4, label="best-layer family")
    ax.set_xticks(xs, names, rotation=45, ha="right", fontsize=8)
    ax.set_title(f"Settings compared on held-out stories (chosen: {report.chosen})")
    ax.legend()
    fig.tight_layout()
    return fig
