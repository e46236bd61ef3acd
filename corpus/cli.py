"""`amygdala corpus ...`: check and summarise the corpus without loading any model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="Check and summarise the emotion corpus (no model needed).", no_args_is_help=True)

CorpusOpt = typer.Option(None, "--corpus", help="Corpus root with manifest.toml, stories/ and paired/ (default: the packaged corpus).")


@app.command()
def check(
    corpus: Optional[Path] = CorpusOpt,
    emotion: list[str] = typer.Option([], "--emotion", "-e", help="Only check these emotion ids (repeatable)."),
    min_stories: int = typer.Option(4, help="Minimum stories per emotion."),
    warnings: bool = typer.Option(True, help="Also print warnings (empty files)."),
) -> None:
    """Exit non-zero and list every violation with its file."""
    from .checks import check_corpus
    from .loader import load_corpus

    c = load_corpus(corpus, strict=False)
    unknown = [e for e in emotion if e not in c.manifest.by_id]
    if unknown:
        typer.echo(f"error: unknown emotion id(s) {unknown}; see corpus/manifest.toml", err=True)
        raise typer.Exit(2)
    violations = check_corpus(c, min_stories=min_stories, emotions=emotion or None)
    errors = [v for v in violations if v.severity == "error"]
    for v in violations:
        if v.severity == "error" or warnings:
            typer.echo(str(v))
    s = c.stats()
    typer.echo(f"{len(errors)} error(s), {len(violations) - len(errors)} warning(s); "
               f"{s['emotions']} emotions, {s['stories']} stories, {s['scenarios']} scenarios", err=True)
    raise typer.Exit(1 if errors else 0)


@app.command()
def stats(
    corpus: Optional[Path] = CorpusOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Counts: emotions, stories, scenarios, words, per-family counts."""
    from .loader import load_corpus

    c = load_corpus(corpus, strict=False)
    s = c.stats()
    s["content_hash"] = c.content_hash()
    if as_json:
        typer.echo(json.dumps(s, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"corpus {c.root} ({s['emotions']} emotions, {s['stories']} stories, {s['scenarios']} scenarios, {s['words']} words)")
    t.add_column("family")
    t.add_column("emotions", justify="right")
    t.add_column("stories", justify="right")
    for fam, v in s["per_family"].items():
        t.add_row(fam, str(v["emotions"]), str(v["stories"]))
    Console().print(t)
