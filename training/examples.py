"""Text to training examples: the one place a (context, preferred, rejected) triple is tokenized.

The frame is fixed so every path trains the same thing: the context with the model's special
tokens (BOS), each continuation without them, ORPO when a rejected continuation is given, SFT
otherwise. The MCP tool, `amygdala train submit` and the dream loop all come through here.
"""

from __future__ import annotations

from typing import Any

from .schemas import JobRejected, TrainExample


def tokenize_example(tokenizer: Any, context: str, preferred: str, rejected: str | None = None) -> TrainExample:
    """A TrainExample for `context` -> `preferred` (over `rejected`, when given); raises JobRejected on empty text."""
    for name, text in (("context", context), ("preferred", preferred)):
        if not isinstance(text, str) or not text.strip():
            raise JobRejected(f"{name} is empty: a training example needs the situation and the preferred response")
    ctx_ids = list(tokenizer(context, add_special_tokens=True)["input_ids"])
    pref = list(tokenizer(preferred, add_special_tokens=False)["input_ids"])
    rej = list(tokenizer(rejected, add_special_tokens=False)["input_ids"]) if rejected and rejected.strip() else None
    if not pref:
        raise JobRejected("preferred tokenizes to nothing; give the response text to learn")
    return TrainExample(context_ids=ctx_ids, continuation_ids=pref, rejected_ids=rej, loss="orpo" if rej else "sft")
