"""The `amygdala` console script.

Each package contributes its own Typer sub-app; this module only composes them. Sub-apps import
their heavy dependencies (torch, transformers) inside commands, so `amygdala corpus check` or
`amygdala --help` stay fast.
"""

from __future__ import annotations

import logging
import os

import typer

from dataclasses import dataclass

from amygdala.corpus.cli import app as corpus_app
from amygdala.dream.certs_cli import certificates_app, certify_cmd
from amygdala.dream.cli import invariants_app
from amygdala.dream.dream_cli import dream_cmd
from amygdala.engine.cli import generate_cmd, model_app
from amygdala.engine.steer_cli import steer_app
from amygdala.memory_graph.cli import app as memory_app
from amygdala.training.checkpoint.cli import sync_app
from amygdala.training.cli import train_app
from amygdala.training.vectors.cli import readout_cmd, vectors_app

from .serve_cli import serve

app = typer.Typer(
    name="amygdala",
    help="Read emotions from a model's residual stream, test steering, and train corrections.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@dataclass(frozen=True)
class CliContext:
    """What the composition root hands to sub-apps that must not import upwards (engine's steer CLI)."""

    readout_for: object
    certificate_html: object = None  # the review page renderer (server/review_pages.py) for `certificates report`


def _ensure_readout(*args: object, **kwargs: object) -> object:
    from amygdala.training.vectors.build import ensure_readout  # imported when used: keeps `--help` fast

    return ensure_readout(*args, **kwargs)


@app.callback()
def _root(ctx: typer.Context) -> None:
    ctx.obj = CliContext(readout_for=_ensure_readout, certificate_html=_certificate_html)


def _certificate_html(*args: object, **kwargs: object) -> str:
    from .review_pages import certificate_html  # jinja2 and the templates load only when a report is written

    return certificate_html(*args, **kwargs)  # type: ignore[arg-type]


app.add_typer(corpus_app, name="corpus")
app.add_typer(model_app, name="model")
app.add_typer(memory_app, name="memory")
app.command("generate")(generate_cmd)
app.add_typer(vectors_app, name="vectors")
app.command("readout")(readout_cmd)
app.add_typer(steer_app, name="steer")
app.command("serve")(serve)
app.add_typer(sync_app, name="sync")
app.add_typer(train_app, name="train")
app.add_typer(invariants_app, name="invariants")
app.command("certify")(certify_cmd)
app.add_typer(certificates_app, name="certificates")
app.command("dream")(dream_cmd)


def main() -> None:
    logging.basicConfig(level=os.environ.get("AMYGDALA_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
