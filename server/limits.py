"""Request limits: every size an agent can send is bounded, and the error names the bound."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from amygdala.training.schemas import MAX_BODY_BYTES


class ServerLimits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_text_tokens: int = Field(2048, ge=16, description="Longest text read_emotions accepts, in tokens.")
    max_text_chars: int = Field(40_000, ge=64, description="Longest text in characters (checked before tokenizing).")
    max_prompt_tokens: int = Field(1024, ge=16, description="Longest steering prompt, in tokens.")
    max_new_tokens: int = Field(256, ge=1, description="Longest generation a steering test may ask for.")
    max_concepts: int = Field(8, ge=1, description="Concepts steered at once.")
    max_top_k: int = Field(50, ge=1)
    max_correction_chars: int = Field(20_000, ge=64, description="Longest context/preferred/rejected text.")
    max_body_bytes: int = Field(MAX_BODY_BYTES, ge=1024, description="Largest HTTP request body.")
