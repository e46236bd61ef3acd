"""Where amygdala keeps its state when nothing says otherwise (stdlib only; engine.config builds on it)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_HOME = "~/.local/share/amygdala"
HOME_ENV = "AMYGDALA_HOME"


def home_from_env() -> Path:
    """$AMYGDALA_HOME, or ~/.local/share/amygdala."""
    return Path(os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser()
