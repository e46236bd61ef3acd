"""The `amygdala` console script.

Each package contributes its own Typer sub-app; this module only composes them, importing
lazily so `amygdala corpus check` does not pay for importing torch.
"""

from __future__ import annotations

import typer

from corpus.cli import app as corpus_app

app = typer.Typer(
    name="amygdala",
    help="Read emotions from a model's residual stream, test steering, and train corrections.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(corpus_app, name="corpus")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
