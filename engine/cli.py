"""`amygdala model ...` and `amygdala generate`, plus the shared options every command takes."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .config import Config

HomeOpt = Annotated[Optional[Path], typer.Option("--home", help="State directory (default $AMYGDALA_HOME or ~/.local/share/amygdala).")]
ModelOpt = Annotated[Optional[str], typer.Option("--model", help="Local HuggingFace causal-LM directory; default: the embedded Gemma 3 270M.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="torch device (default cpu).")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", help="torch intra-op threads.")]
MaxTokensOpt = Annotated[Optional[int], typer.Option("--max-tokens", help="Longest accepted text in tokens (default 2048).")]


def make_config(home: Optional[Path] = None, model: Optional[str] = None, device: Optional[str] = None,
                threads: Optional[int] = None, max_tokens: Optional[int] = None) -> Config:
    return Config.load(home=home, model=model, device=device, threads=threads, max_tokens=max_tokens)


def parse_layers(spec: Optional[str]) -> Optional[list[int]]:
    """'6-10', '3,5,7', '4-6,12' or None (all)."""
    if spec is None or spec.strip() in ("", "all"):
        return None
    out: list[int] = []
    try:
        for part in spec.split(","):
            part = part.strip()
            if "-" in part:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise typer.BadParameter(f"layers {spec!r} not understood; use e.g. '6-10', '3,5,7' or 'all'") from None
    return out


MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed


def check_seed(value: Optional[int]) -> Optional[int]:
    """Typer callback: a seed outside 0..2^63-1 is refused with the whole range, before anything loads."""
    if value is not None and not 0 <= value <= MAX_SEED:
        raise typer.BadParameter(f"{value} is out of range: a seed must be between 0 and 2^63-1 ({MAX_SEED})")
    return value


def echo_err(msg: str) -> None:
    typer.echo(msg, err=True)


def load_or_exit(config: Config, announce: bool = False):
    """Load the model, turning a ModelError into a one-line message and exit code 2.

    announce: say so on stderr first (slow commands: the load takes seconds and prints nothing).
    """
    from .model import ModelError, load_model

    if announce:
        echo_err(f"amygdala: loading {'the embedded Gemma 3 270M' if config.is_embedded else config.model} ...")
    try:
        return load_model(config, echo=echo_err)
    except ModelError as exc:
        echo_err(f"error: {exc}")
        raise typer.Exit(2) from None


model_app = typer.Typer(help="Inspect the served model.", no_args_is_help=True)


@model_app.command("info")
def info(home: HomeOpt = None, model: ModelOpt = None, as_json: bool = typer.Option(False, "--json")) -> None:
    """Name, layers (with relative depth), hidden size, cache path."""
    cfg = make_config(home, model)
    lm = load_or_exit(cfg)
    data = lm.info()
    data["cache_path"] = str(lm.path)
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    for k, v in data.items():
        typer.echo(f"{k:>12}: {v}")
    typer.echo(f"{'depths':>12}: " + ", ".join(lm.describe_layer(i) for i in range(lm.n_layers)))


def generate_cmd(
    prompt: str = typer.Argument(..., help="Prompt text."),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", min=1, max=4096),
    temperature: float = typer.Option(0.0, min=0.0, max=2.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0),
    seed: Optional[int] = typer.Option(None, callback=check_seed, help="Sampling seed (0 to 2^63-1)."),
    as_json: bool = typer.Option(False, "--json"),
    home: HomeOpt = None, model: ModelOpt = None, threads: ThreadsOpt = None, max_tokens: MaxTokensOpt = None,
) -> None:
    """Generate a continuation (greedy by default, seedable when sampling)."""
    from tqdm import tqdm

    from .generation import generate
    from .tokens import TextError, check_text, encode

    try:
        check_text(prompt, "prompt")  # before the model loads
    except TextError as exc:
        echo_err(f"error: {exc}")
        raise typer.Exit(2) from None
    cfg = make_config(home, model, threads=threads, max_tokens=max_tokens)
    lm = load_or_exit(cfg, announce=True)
    try:
        ids = encode(lm.tokenizer, prompt, cfg.max_tokens, cfg.truncation, what="prompt")
    except TextError as exc:
        echo_err(f"error: {exc}")
        raise typer.Exit(2) from None
    with tqdm(total=max_new_tokens, desc="generate", unit="tok", dynamic_ncols=True) as bar:
        res = generate(lm, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                       on_token=lambda _: bar.update(1))
    if as_json:
        typer.echo(json.dumps({"prompt": prompt, "text": res.text, "tokens": len(res.token_ids), "finish_reason": res.finish_reason}))
    else:
        sys.stdout.write(prompt + res.text + "\n")
