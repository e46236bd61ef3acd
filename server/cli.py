"""The `amygdala` console script.

Each package contributes its own Typer sub-app; this module only composes them. Sub-apps import
their heavy dependencies (torch, transformers) inside commands, so `amygdala corpus check` or
`amygdala --help` stay fast.
"""

from __future__ import annotations

import logging
import os

import typer

from corpus.cli import app as corpus_app
from engine.cli import generate_cmd, model_app
from memory_graph.cli import app as memory_app
from training.cli import readout_cmd, vectors_app
from training.steer_cli import steer_app
from training.sync_cli import sync_cmd
from training.train_cli import train_app

from .serve_cli import serve

app = typer.Typer(
    name="amygdala",
    help="Read emotions from a model's residual stream, test steering, and train corrections.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(corpus_app, name="corpus")
app.add_typer(model_app, name="model")
app.add_typer(memory_app, name="memory")
app.command("generate")(generate_cmd)
app.add_typer(vectors_app, name="vectors")
app.command("readout")(readout_cmd)
app.add_typer(steer_app, name="steer")
app.command("serve")(serve)
app.command("sync")(sync_cmd)
app.add_typer(train_app, name="train")


def main() -> None:
    logging.basicConfig(level=os.environ.get("AMYGDALA_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
