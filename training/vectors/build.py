"""The whole readout build: corpus check, one activation pass, validation, final fit, files.

One activation pass serves everything: every pooling in the validation grid is computed from the
same forwards, the validation fits use the training split of those activations, and the final
readout is fit on the full corpus with the setting and default layers validation chose.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from amygdala.corpus import Corpus
from amygdala.engine.model import LoadedModel
from amygdala.engine.readout import ReadoutManager

from amygdala.engine.drift import attach_probe, probe_ids

from .length_calibration import calibrate_lengths
from .validation import DEFAULT_GRID, ValidationReport, options_from_label, validate, write_plots
from .caa import CorpusActivations, FitOptions, check_corpus_size, collect, fit_readout, model_ref

log = logging.getLogger(__name__)


@dataclass
class BuildResult:
    readout: ReadoutManager
    report: ValidationReport | None
    activations: CorpusActivations
    out_dir: Path
    plots: list[Path]
    seconds: float


def build_readout(lm: LoadedModel, corpus: Corpus, out_dir: Path, layers: list[int] | None = None,
                  grid: tuple[FitOptions, ...] = DEFAULT_GRID, fixed: FitOptions | None = None,
                  default_layers: list[int] | None = None, min_positives: int = 2, plots: bool = True,
                  echo: Callable[[str], None] = print, cache_dir: Path | None = None, progress: bool = True) -> BuildResult:
    """Validate settings on held-out stories, then fit on the full corpus and write the readout."""
    t0 = time.perf_counter()
    check_corpus_size(corpus, min_positives)
    layers = lm.check_layers(layers)
    echo(f"layers: {', '.join(lm.describe_layer(i) for i in layers)}")
    candidates = (fixed,) if fixed else grid
    poolings = sorted({o.pooling for o in candidates}, key=str)
    ca = collect(lm, corpus, layers, poolings, cache_dir=cache_dir)
    echo(f"activations: {len(ca.texts)} unique texts{' (cached)' if ca.forwards == 0 else ''}, {ca.acts.n_tokens} tokens in {ca.seconds:.1f} s "
         f"({ca.acts.n_tokens / max(ca.seconds, 1e-9):.0f} tok/s)")
    ref = model_ref(lm)
    report = None
    has_split = any(len(v) > 1 for v in corpus.stories.values())
    if has_split:
        report = validate(ca, corpus, ref, lm.hidden_size, grid=candidates)
        chosen = options_from_label(report.chosen, candidates)
        default_layers = default_layers or report.default_layers
        s = report.summary()
        b = s["best_layer"]
        echo(f"validation: chose {report.chosen}; best {lm.describe_layer(b['layer'])}: top-1 {b['top1']:.3f}, "
             f"top-5 {b['top5']:.3f}, family {b['family']:.3f} (chance {report.chance['top1']:.3f} / "
             f"{report.chance['top5']:.3f} / {report.chance['family']:.3f}); default layers {default_layers}")
    else:
        chosen = fixed or FitOptions()
        echo("validation skipped: no emotion has two stories to split")
    readout = fit_readout(ref, lm.hidden_size, ca, corpus, chosen, default_layers=default_layers)
    if report is not None:
        readout.manifest.validation = report.summary()
    readout.lm = lm
    calibrate_lengths(lm, readout, ca.texts, progress=progress)
    attach_probe(lm, readout, probe_ids(lm.tokenizer, probe_texts(corpus)))
    readout.save(out_dir)
    paths: list[Path] = []
    if report is not None:
        (out_dir / "validation.json").write_text(report.to_json())
        if plots:
            paths = write_plots(report, readout, out_dir)
    return BuildResult(readout, report, ca, out_dir, paths, time.perf_counter() - t0)


def probe_texts(corpus: Corpus) -> list[str]:
    """The drift probe: neutral texts first (no emotion to move), then scenario baselines."""
    return [t.text for t in corpus.neutral] + [sc.baseline.text for _, sc in sorted(corpus.scenarios.items())
                                               if sc.baseline is not None]


def load_report(out_dir: Path) -> dict:
    return json.loads((out_dir / "validation.json").read_text())


def default_readout_dir(config, lm: LoadedModel) -> Path:
    from amygdala.engine.readout import readout_dir

    return readout_dir(config.readouts_dir, lm)


def ensure_readout(lm: LoadedModel, config, readout_path: Path | None = None, corpus_root: Path | None = None,
                   echo: Callable[[str], None] = print, shipped_root: Path | None = None) -> ReadoutManager:
    """The readout for `lm`: loaded if present, else the shipped one when its hashes match, else built once.

    An explicit `readout_path` is never built implicitly: a missing explicit path is an error.
    """
    from amygdala.corpus import load_corpus
    from amygdala.engine.readout import MANIFEST_FILE

    from .shipped import SHIPPED_ROOT, try_shipped

    if readout_path is not None:
        return ReadoutManager.from_file(readout_path, model=lm, max_tokens=config.max_tokens, truncation=config.truncation)
    directory = default_readout_dir(config, lm)
    if not (directory / MANIFEST_FILE).is_file():
        corpus = load_corpus(corpus_root)
        if not try_shipped(lm, corpus.content_hash(), directory, echo=echo, root=shipped_root or SHIPPED_ROOT):
            echo(f"amygdala: no emotion readout for {lm.name} yet; training it from the corpus into {directory} "
                 "(one-time: one pass over ~1,300 texts; 10-25 minutes on 2 busy CPU cores).")
            build_readout(lm, corpus, directory, echo=echo, cache_dir=config.home / "cache")
    return ReadoutManager.from_file(directory, model=lm, max_tokens=config.max_tokens, truncation=config.truncation)
