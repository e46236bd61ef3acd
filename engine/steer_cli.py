"""`amygdala steer`: test a steering vector against the unsteered run before training on it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

from .cli import HomeOpt, MaxTokensOpt, ModelOpt, ThreadsOpt, check_seed, echo_err, load_or_exit, make_config, parse_layers


class DefaultRunGroup(TyperGroup):
    """`amygdala steer ... PROMPT` runs `steer run`; `amygdala steer sweep ...` runs the sweep."""

    def parse_args(self, ctx, args):  # type: ignore[no-untyped-def]
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


steer_app = typer.Typer(cls=DefaultRunGroup, no_args_is_help=True,
                        help="Compare steered and unsteered generation (`steer PROMPT`) or sweep alphas (`steer sweep`).")


def _readout_for(ctx: typer.Context):
    """The composition root (`amygdala` itself) hands in a provider that builds a missing readout;
    on its own this app only loads an existing one (engine never imports the vector-fitting code)."""
    from .readout import load_readout

    obj = ctx.find_root().obj
    return getattr(obj, "readout_for", None) or load_readout


def _fail(msg: str) -> None:
    echo_err(f"error: {msg}")
    raise typer.Exit(2)


def _vectors(specs: list[str]) -> list[tuple[Path, float]]:
    out = []
    for s in specs:
        path, sep, alpha = s.rpartition("=")
        if not sep:
            path, alpha = s, "1"
        try:
            value = float(alpha)
        except ValueError:
            _fail(f"--vector {s!r} must look like FILE=ALPHA")
        if not math.isfinite(value):
            _fail(f"--vector {s!r}: alpha must be a finite number")
        if not Path(path).is_file():
            _fail(f"--vector {s!r}: no such file {path}")
        out.append((Path(path), value))
    return out


def _precheck(cfg, readout: Optional[Path], concepts: dict[str, float], layers: Optional[list[int]], positions: str,
              need_steering: bool = True) -> None:
    """Every argument check that needs no model, before the multi-second model load.

    Concept names and layers are checked against the readout's readout.json when it exists
    already (an explicit --readout, or the model's default readout directory).
    """
    from .readout import expected_readout_dir, read_manifest
    from .steering import POSITIONS

    if positions not in POSITIONS:
        _fail(f"--positions must be one of {', '.join(POSITIONS)}; got {positions!r}")
    bad = [k for k, v in concepts.items() if not math.isfinite(v)]
    if bad:
        _fail(f"alpha for {bad[0]!r} must be a finite number")
    if need_steering and not concepts:
        _fail("nothing to steer with: pass at least one --concept NAME=ALPHA or --vector FILE=ALPHA")
    directory = readout if readout is not None else expected_readout_dir(cfg)
    manifest = read_manifest(directory) if directory is not None else None
    if readout is not None and manifest is None:
        _fail(f"--readout {readout}: no readable readout.json there; train one with `amygdala vectors train`")
    if manifest is None:
        return  # first run: the readout is built (or reported missing) after the model loads
    unknown = [c for c in concepts if c not in manifest.concepts]
    if unknown:
        close = [c for c in manifest.concepts if unknown[0].lower()[:4] in c][:8]
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        _fail(f"unknown concept {unknown[0]!r}; valid concepts are the {len(manifest.concepts)} names from "
              f"`amygdala vectors list`.{hint}")
    if layers is not None:
        off = [i for i in layers if i not in manifest.layers]
        if off or not layers:
            _fail(f"layer(s) {off} not in this readout; available layers: {manifest.layers} (default {manifest.default_layers})")


class _StageBar:
    """A tqdm bar on stderr driven by steering_eval's (done, total, message) progress callback."""

    def __init__(self, desc: str):
        from tqdm import tqdm

        self.bar = tqdm(total=2, desc=desc, unit="run", dynamic_ncols=True)

    def __call__(self, done: float, total: float, message: str) -> None:
        self.bar.total = total
        self.bar.n = done
        self.bar.set_postfix_str(message)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


@steer_app.command("run")
def run(
    ctx: typer.Context,
    prompt: str = typer.Argument(..., help="Prompt to continue."),
    concept: list[str] = typer.Option([], "--concept", "-c", help="NAME=ALPHA (repeatable). alpha is in units of the layer's typical residual norm."),
    vector: list[str] = typer.Option([], "--vector", help="FILE=ALPHA: a .gguf control vector or .safetensors direction file (repeatable)."),
    layers: Optional[str] = typer.Option(None, help="Layers to steer, e.g. '6-10' (default: the readout's default layers)."),
    positions: str = typer.Option("both", help="prompt | generated | both"),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", min=1, max=1024),
    seed: int = typer.Option(0, callback=check_seed, help="Same seed for both runs (0 to 2^63-1)."),
    temperature: float = typer.Option(0.7, min=0.0, max=2.0),
    as_json: bool = typer.Option(False, "--json"),
    readout: Optional[Path] = typer.Option(None, "--readout"),
    home: HomeOpt = None, model: ModelOpt = None, threads: ThreadsOpt = None, max_tokens: MaxTokensOpt = None,
) -> None:
    """Baseline and steered continuations, each re-read without steering."""
    from .readout import ReadoutError
    from .steering import SteeringError, parse_concept_alphas
    from .steering_eval import compare
    from .tokens import TextError, check_text

    try:
        concepts = parse_concept_alphas(concept)
        check_text(prompt, "prompt")
    except (SteeringError, TextError) as exc:
        _fail(str(exc))
    vectors = _vectors(vector)
    layer_list = parse_layers(layers)
    cfg = make_config(home, model, threads=threads, max_tokens=max_tokens)
    _precheck(cfg, readout, concepts, layer_list, positions, need_steering=not vectors)
    lm = load_or_exit(cfg, announce=True)
    bar = None
    try:
        r = _readout_for(ctx)(lm, cfg, readout, echo=echo_err)
        bar = _StageBar("steer")
        res = compare(lm, r, prompt, concepts, layer_list, positions, max_new_tokens, seed, temperature,
                      vectors=vectors, progress=bar)
    except (ReadoutError, SteeringError, TextError, ValueError) as exc:
        _fail(str(exc))
    finally:
        if bar is not None:
            bar.close()
    if as_json:
        typer.echo(json.dumps({"baseline": res.baseline.model_dump(), "steered": res.steered.model_dump(),
                               "delta": res.delta, "layers": res.layers, "positions": res.positions,
                               "concepts": res.concepts, "seed": res.seed}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"steering at layers {res.layers} ({positions}); seed {seed}", show_lines=True)
    t.add_column("baseline", ratio=1)
    t.add_column("steered: " + ", ".join(f"{k}={v:+g}" for k, v in concepts.items()), ratio=1)
    t.add_row(prompt + res.baseline.text, prompt + res.steered.text)
    for c in concepts:
        b, s = res.baseline.scores[c], res.steered.scores[c]
        t.add_row(f"{c}: {b}", f"{c}: {s}  (delta {res.delta[c]})")
    if res.baseline.score_note or res.steered.score_note:
        t.add_row(res.baseline.score_note or "", res.steered.score_note or "")
    t.add_row(f"perplexity {res.baseline.perplexity:.1f}" if res.baseline.perplexity else "",
              f"perplexity {res.steered.perplexity:.1f}" if res.steered.perplexity else "")
    Console().print(t)


@steer_app.command("sweep")
def sweep_cmd(
    ctx: typer.Context,
    concept: str = typer.Option(..., "--concept", "-c", help="Concept to sweep."),
    alphas: str = typer.Option("-0.04,-0.02,0,0.02,0.04", help="Comma-separated alphas (units of the typical residual norm)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="File with one prompt per line (default: 20 built-in neutral prompts)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of score, direction share and perplexity vs alpha."),
    layers: Optional[str] = typer.Option(None),
    positions: str = typer.Option("both"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1, max=512),
    seed: int = typer.Option(0, callback=check_seed, help="Sampling seed (0 to 2^63-1)."),
    as_json: bool = typer.Option(False, "--json"),
    readout: Optional[Path] = typer.Option(None, "--readout"),
    home: HomeOpt = None, model: ModelOpt = None, threads: ThreadsOpt = None,
) -> None:
    """Dose-response: mean re-read score per alpha, slope, wrong-way share, perplexity; optional PNG."""
    from tqdm import tqdm

    from .readout import ReadoutError
    from .steering import SteeringError
    from .steering_eval import NEUTRAL_PROMPTS, plot_sweep, sweep

    from .tokens import only_control

    try:
        alpha_list = [float(a) for a in alphas.split(",") if a.strip()]
    except ValueError:
        _fail(f"--alphas {alphas!r} must be comma-separated numbers")
    if not alpha_list or not all(math.isfinite(a) for a in alpha_list):
        _fail(f"--alphas {alphas!r} must be one or more finite numbers, e.g. -0.04,0,0.04")
    plist = list(NEUTRAL_PROMPTS)
    if prompts is not None:
        if not prompts.is_file():
            _fail(f"--prompts {prompts}: no such file")
        plist = [p for p in prompts.read_text().splitlines() if p.strip() and not only_control(p)]
        if not plist:
            _fail(f"--prompts {prompts} has no lines with readable text")
    layer_list = parse_layers(layers)
    cfg = make_config(home, model, threads=threads)
    _precheck(cfg, readout, {concept: 1.0}, layer_list, positions)
    lm = load_or_exit(cfg, announce=True)
    bar = None
    try:
        r = _readout_for(ctx)(lm, cfg, readout, echo=echo_err)
        bar = tqdm(total=len(plist) * len(set(alpha_list) | {0.0}), desc=f"sweep {concept}", unit="gen")
        res = sweep(lm, r, concept, alpha_list, plist, layer_list, positions, max_new_tokens, seed,
                    progress=lambda d, t: bar.update(1))
    except (ReadoutError, SteeringError, KeyError, ValueError) as exc:
        _fail(str(exc.args[0] if isinstance(exc, KeyError) else exc))
    finally:
        if bar is not None:
            bar.close()
    if plot is not None:
        plot_sweep(res, plot)
    summary = {"concept": res.concept, "layers": res.layers, "slope": res.slope, "wrong_way": res.wrong_way,
               "best_alpha": res.best_alpha, "baseline_perplexity": res.baseline_perplexity,
               "per_alpha": [vars(s) for s in res.per_alpha], "plot": str(plot) if plot else None}
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"sweep {concept} at layers {res.layers}: slope {res.slope:+.3f}/alpha, wrong way "
                    f"{(res.wrong_way or 0):.0%}, best alpha {res.best_alpha}")
    for col in ("alpha", "mean score", "moved right way", "median ppl"):
        t.add_column(col, justify="right")
    for s in res.per_alpha:
        t.add_row(f"{s.alpha:+g}", f"{s.mean_score:+.3f}" if s.mean_score is not None else "-",
                  f"{s.rise_fraction:.0%}" if s.rise_fraction is not None else "-",
                  f"{s.median_perplexity:.1f}" if s.median_perplexity else "-")
    Console().print(t)
