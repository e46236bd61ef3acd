"""`amygdala vectors ...` and `amygdala readout`: build, validate, export and use emotion readouts."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from amygdala.engine.tokens import TextError, check_text
from amygdala.engine.cli import HomeOpt, MaxTokensOpt, ModelOpt, ThreadsOpt, echo_err, load_or_exit, make_config, parse_layers

vectors_app = typer.Typer(help="Train, validate, list and export emotion readout vectors.", no_args_is_help=True)

CorpusOpt = typer.Option(None, "--corpus", help="Corpus root (default: the packaged corpus).")
ReadoutOpt = typer.Option(None, "--readout", help="Readout directory (default: $AMYGDALA_HOME/readouts/<model>).")


def _fail(msg: str, code: int = 2) -> None:
    echo_err(f"error: {msg}")
    raise typer.Exit(code)


@vectors_app.command("train")
def train(
    corpus: Optional[Path] = CorpusOpt,
    out: Optional[Path] = typer.Option(None, "--out", help="Output directory (default: the model's readout directory)."),
    layers: Optional[str] = typer.Option(None, help="Layers to train, e.g. '4-12' (default: all)."),
    pooling: Optional[str] = typer.Option(None, help="Fix pooling ('last', 'mean', 'mean:K') instead of choosing by validation."),
    standardize: Optional[bool] = typer.Option(None, "--standardize/--no-standardize", help="Fix per-dimension standardisation."),
    pca_share: Optional[float] = typer.Option(None, min=0.0, max=0.99, help="Fix the neutral-PCA share projected out (0 = off)."),
    whiten: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="Fix the whitening shrinkage (0 = off; see training.steering_vectors)."),
    min_positives: int = typer.Option(2, min=1, help="Positives an emotion needs; fail fast below."),
    plots: bool = typer.Option(True, help="Write validation PNGs."),
    ship: bool = typer.Option(False, "--ship", help="Also write it as the package's shipped readout for this model "
                                                    "(default settings only; maintainers, before a release)."),
    ship_dir: Optional[Path] = typer.Option(None, "--ship-dir", help="Where --ship writes (default: the package's "
                                                                     "training/vectors/shipped/)."),
    home: HomeOpt = None, model: ModelOpt = None, threads: ThreadsOpt = None,
) -> None:
    """Contrastive activation addition over the corpus, validated, written as readout.safetensors + readout.json."""
    from amygdala.corpus import CorpusError, load_corpus
    from amygdala.engine.activations import Pooling

    from .build import build_readout, default_readout_dir
    from .caa import CorpusTooSmall, FitOptions, check_corpus_size

    try:
        c = load_corpus(corpus)
        check_corpus_size(c, min_positives)  # before the model loads
    except (CorpusError, CorpusTooSmall, FileNotFoundError) as exc:
        _fail(str(exc))
    fixed = None
    if ship and (layers is not None or any(v is not None for v in (pooling, standardize, pca_share, whiten))):
        _fail("--ship writes the readout a first start would build, with the default settings: drop --layers, "
              "--pooling, --standardize, --pca-share and --whiten")
    if pooling is not None or standardize is not None or pca_share is not None or whiten is not None:
        try:
            fixed = FitOptions(Pooling.parse(pooling or "mean:10"), True if standardize is None else standardize,
                               pca_share or 0.0, 0.5 if whiten is None else whiten)
        except ValueError as exc:
            _fail(str(exc))
    cfg = make_config(home, model, threads=threads)
    lm = load_or_exit(cfg)
    out_dir = out or default_readout_dir(cfg, lm)
    try:
        res = build_readout(lm, c, out_dir, layers=parse_layers(layers), fixed=fixed, plots=plots, echo=echo_err,
                            cache_dir=cfg.home / "cache")
    except (ValueError, CorpusTooSmall) as exc:
        _fail(str(exc))
    shipped = None
    if ship:
        from .shipped import SHIPPED_ROOT
        from .shipped import ship as write_shipped

        sdir, build = write_shipped(res.readout, lm, res.activations, c.content_hash(), res.seconds, root=ship_dir or SHIPPED_ROOT)
        echo_err(f"shipped: {sdir} (float16: {', '.join(build.storage) or 'none'}; float16 vectors move z by at most "
                 f"{build.half_max_abs_dz:.2e}, directions by {build.half_max_direction_error:.2e})")
        shipped = {"dir": str(sdir), **build.model_dump(include={"weights_hash", "corpus_hash", "settings_hash", "storage",
                                                                  "half_max_abs_dz", "half_max_direction_error"})}
    typer.echo(json.dumps({"out": str(out_dir), "concepts": len(res.readout.concepts), "layers": res.readout.manifest.layers,
                           "default_layers": res.readout.default_layers, "pooling": res.readout.manifest.pooling,
                           "standardize": res.readout.manifest.standardize, "pca_share": res.readout.manifest.pca_share,
                           "whiten": res.readout.manifest.whiten,
                           "texts": res.activations.forwards, "tokens": res.activations.acts.n_tokens,
                           "seconds": round(res.seconds, 1), "validation": res.readout.manifest.validation,
                           "plots": [str(p) for p in res.plots], "shipped": shipped}, indent=2))


@vectors_app.command("validate")
def validate_cmd(
    readout: Optional[Path] = ReadoutOpt,
    corpus: Optional[Path] = CorpusOpt,
    out: Optional[Path] = typer.Option(None, "--out", help="Report directory (default: <readout>/validation)."),
    grid: bool = typer.Option(False, "--grid", help="Compare the full grid of settings, not only the readout's own."),
    home: HomeOpt = None, model: ModelOpt = None, threads: ThreadsOpt = None,
) -> None:
    """Held-out accuracy, family cohesion and valence per layer; JSON report and PNG plots."""
    from amygdala.corpus import load_corpus
    from amygdala.engine.activations import Pooling
    from amygdala.engine.readout import ReadoutError, ReadoutManager

    from .build import default_readout_dir
    from .validation import DEFAULT_GRID, validate, write_plots
    from .caa import FitOptions, collect, fit_readout, model_ref

    cfg = make_config(home, model, threads=threads)
    lm = load_or_exit(cfg)
    rdir = readout or default_readout_dir(cfg, lm)
    try:
        existing = ReadoutManager.from_file(rdir, model=lm)
    except ReadoutError as exc:
        _fail(str(exc))
    c = load_corpus(corpus)
    own = FitOptions(Pooling.parse(existing.manifest.pooling), existing.manifest.standardize, existing.manifest.pca_share,
                     existing.manifest.whiten)
    candidates = DEFAULT_GRID if grid else (own,)
    ca = collect(lm, c, existing.manifest.layers, sorted({o.pooling for o in DEFAULT_GRID}, key=str), cache_dir=cfg.home / "cache")
    report = validate(ca, c, model_ref(lm), lm.hidden_size, grid=candidates)
    out_dir = out or rdir / "validation"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "validation.json").write_text(report.to_json())
    chosen = next(o for o in candidates if o.label() == report.chosen)
    plots = write_plots(report, fit_readout(model_ref(lm), lm.hidden_size, ca, c, chosen, default_layers=report.default_layers), out_dir)
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"held-out validation ({report.chosen}; {report.n_concepts} concepts, {report.n_held_out} stories)")
    for col in ("layer", "top-1", "top-5", "family", "valence |r|"):
        t.add_column(col, justify="right")
    for m in report.chosen_result().per_layer:
        t.add_row(lm.describe_layer(m.layer), f"{m.top1:.3f}", f"{m.top5:.3f}", f"{m.family:.3f}", f"{m.valence_r:.2f}")
    t.add_row("chance", f"{report.chance['top1']:.3f}", f"{report.chance['top5']:.3f}", f"{report.chance['family']:.3f}", "")
    Console(stderr=True).print(t)
    typer.echo(json.dumps({"report": str(out_dir / "validation.json"), "plots": [str(p) for p in plots], **report.summary()}, indent=2))


@vectors_app.command("list")
def list_cmd(
    family: Optional[str] = typer.Option(None, help="Only this family."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Concepts in the manifest with family, valence and arousal (no model needed)."""
    from amygdala.corpus import load_manifest

    m = load_manifest()
    rows = [e for e in m.emotions if family is None or e.family == family]
    if family is not None and not rows:
        _fail(f"unknown family {family!r}; families: {', '.join(f.id for f in m.families)}")
    if as_json:
        typer.echo(json.dumps([{"concept": e.id, "name": e.name, "family": e.family, "valence": e.valence,
                                "arousal": e.arousal} for e in rows], indent=2))
        return
    for e in rows:
        typer.echo(f"{e.id:<22} {e.family:<22} v={e.valence:+.2f} a={e.arousal:+.2f}")


@vectors_app.command("export-gguf")
def export_gguf(
    concept: str = typer.Option(..., "--concept", help="Concept to export."),
    out: Path = typer.Option(..., "--out", help="Output .gguf file."),
    layers: Optional[str] = typer.Option(None, help="Layers to include (default: all but 0)."),
    readout: Optional[Path] = ReadoutOpt,
    home: HomeOpt = None, model: ModelOpt = None,
) -> None:
    """Write a concept as a llama.cpp / repeng control vector (direction.<layer>, scaled to residual norm)."""
    from amygdala.engine.control_vectors import ControlVector, write_gguf
    from amygdala.engine.readout import ReadoutError, ReadoutManager

    from .build import default_readout_dir

    cfg = make_config(home, model)
    if readout is None:
        lm = load_or_exit(cfg)
        readout = default_readout_dir(cfg, lm)
    try:
        r = ReadoutManager.from_file(readout)
        k = r.concept_index(concept)
    except (ReadoutError, KeyError) as exc:
        _fail(str(exc.args[0] if isinstance(exc, KeyError) else exc))
    chosen = parse_layers(layers) or [i for i in r.manifest.layers if i > 0]
    bad = [i for i in chosen if i not in r.layers]
    if bad:
        _fail(f"layers {bad} not in the readout (has {r.manifest.layers})")
    cv = ControlVector({i: r.layers[i].directions[k] * r.layers[i].residual_norm for i in chosen},
                       model_hint=r.manifest.model.name)
    try:
        write_gguf(cv, out)
    except ValueError as exc:
        _fail(str(exc))
    typer.echo(json.dumps({"out": str(out), "concept": concept, "layers": sorted(i for i in chosen if i > 0)}))


@vectors_app.command("import-gguf")
def import_gguf(
    path: Path = typer.Argument(..., help="A llama.cpp / repeng control vector (.gguf)."),
    out: Path = typer.Option(..., "--out", help="Output .safetensors vector file (usable with `amygdala steer --vector`)."),
) -> None:
    """Read a GGUF control vector and store it as a safetensors vector file."""
    from amygdala.engine.control_vectors import read_gguf, write_safetensors

    try:
        cv = read_gguf(path)
        write_safetensors(cv, out)
    except ValueError as exc:
        _fail(str(exc))
    typer.echo(json.dumps({"out": str(out), "model_hint": cv.model_hint,
                           "layers": {str(i): round(float(v.norm()), 4) for i, v in sorted(cv.directions.items())}}))


def readout_cmd(
    text: Optional[str] = typer.Argument(None, help="Text to read (omit with --jsonl)."),
    top_k: int = typer.Option(10, "--top-k", min=1, help="How many concepts to list."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per text."),
    jsonl: Optional[Path] = typer.Option(None, "--jsonl", help='Read lines {"id": str, "text": str}; print one JSON object per line, same id.'),
    layers: Optional[str] = typer.Option(None, help="Layers to read (default: the readout's validated default layers)."),
    per_token: bool = typer.Option(False, "--per-token", help="Show a per-token heat view of the top concepts."),
    readout: Optional[Path] = ReadoutOpt,
    home: HomeOpt = None, model: ModelOpt = None, threads: ThreadsOpt = None, max_tokens: MaxTokensOpt = None,
) -> None:
    """Read the emotions a text evokes in the model's residual stream."""
    from amygdala.engine.readout import ReadoutError

    from .build import ensure_readout

    if (text is None) == (jsonl is None):
        _fail("pass either TEXT or --jsonl FILE (one of them)")
    items: list[tuple[str | None, int | None, str | None, str | None]] = []  # (id, line, text, error)
    if jsonl is not None:
        if not jsonl.is_file():
            _fail(f"--jsonl {jsonl}: no such file")
        items = list(_jsonl_items(jsonl))
        if not items:
            _fail(f"--jsonl {jsonl} has no lines to read")
    else:
        try:
            check_text(text)
        except TextError as exc:
            _fail(str(exc))
        items.append((None, None, text, None))
    cfg = make_config(home, model, threads=threads, max_tokens=max_tokens)
    lm = load_or_exit(cfg)
    try:
        r = ensure_readout(lm, cfg, readout, echo=echo_err)
        chosen = r.check_layers(parse_layers(layers))
    except (ReadoutError, ValueError) as exc:
        _fail(str(exc))
    from amygdala.engine.drift import measure_drift

    drift = measure_drift(r)
    if drift is not None and drift.note():
        echo_err(f"note: {drift.note()}")
    failed = 0
    batch = 64
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        encoded: list[list[int] | None] = []
        errors: list[str | None] = []
        for _, _, t, err in chunk:
            ids = None
            if err is None:
                try:
                    ids = r.encode(t or "")
                except TextError as exc:
                    err = str(exc)
            encoded.append(ids)
            errors.append(err)
        good = [ids for ids in encoded if ids is not None]
        scores = iter(r.read_ids(good, layers=chosen) if good else [])
        for (id_, line, t, _), ids, err in zip(chunk, encoded, errors):
            if err is not None:
                failed += 1
                if jsonl is None:
                    _fail(err)
                echo_err(f"error: {jsonl}:{line} (id {id_!r}): {err}")
                sys.stdout.write(json.dumps({"id": id_, "line": line, "error": err}) + "\n")
                sys.stdout.flush()
                continue
            s = next(scores)
            top = [{"concept": c, "score": round(v, 4)} for c, v in r.top(s.combined, top_k)]
            obj = {"top": top, "layers": chosen}
            if jsonl is not None:
                obj = {"id": id_, "line": line, **obj}
            if as_json or jsonl is not None:
                sys.stdout.write(json.dumps(obj) + "\n")
                sys.stdout.flush()
            else:
                _print_table(r, t, top, chosen, lm)
            if per_token:
                _print_heat(r, t or "", [x["concept"] for x in top[:3]], chosen)
    if failed:
        echo_err(f"{failed} of {len(items)} line(s) in {jsonl} could not be read (listed above, with their line "
                 "numbers); the others were read")
        raise typer.Exit(1)


def _jsonl_items(path: Path):
    """(id, line number, text, error) per non-blank line; a bad line carries its error instead of stopping the run."""
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            yield None, n, None, f'not valid JSON ({exc.msg}); expected {{"id": str, "text": str}}'
            continue
        if not isinstance(obj, dict):
            yield None, n, None, f'expected a JSON object {{"id": str, "text": str}}, got {type(obj).__name__}'
            continue
        id_ = obj.get("id")
        id_ = None if id_ is None else str(id_)
        if id_ is None:
            yield None, n, None, 'missing "id"; every line needs {"id": str, "text": str}'
        elif not isinstance(obj.get("text"), str):
            what = "missing" if "text" not in obj else f"not a string ({type(obj['text']).__name__})"
            yield id_, n, None, f'"text" is {what}; every line needs {{"id": str, "text": str}}'
        else:
            try:
                yield id_, n, check_text(obj["text"]), None
            except TextError as exc:
                yield id_, n, None, str(exc)


def _print_table(r, text, top, layers, lm) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"readout over {', '.join(lm.describe_layer(i) for i in layers)} (z-scores vs the corpus)")
    t.add_column("concept")
    t.add_column("family")
    t.add_column("score", justify="right")
    for row in top:
        t.add_row(row["concept"], r.family_of(row["concept"]), f"{row['score']:+.2f}")
    Console().print(t)


def _print_heat(r, text, concepts, layers) -> None:
    from rich.console import Console
    from rich.text import Text

    tokens, scores = r.read_tokens(text, layers=layers)
    con = Console()
    for c in concepts:
        k = r.concept_index(c)
        line = Text(f"{c:>18}: ")
        for tok, z in zip(tokens, scores[:, k].tolist()):
            level = max(0.0, min(1.0, z / 3))
            shade = int(255 * (1 - level))
            line.append(tok.replace("\n", "⏎"), style=f"on rgb(255,{shade},{shade})" if z > 0 else "")
        con.print(line)
