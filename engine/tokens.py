"""Turning user text into token ids under one explicit over-length policy.

Policy (Config.truncation): 'error' (default) rejects text longer than max_tokens with a message
giving both numbers; 'keep_end' keeps the last max_tokens tokens (plus BOS), because for an agent
reading its own state the latest text matters most; 'keep_start' keeps the first max_tokens.
"""

from __future__ import annotations

from .config import TruncationPolicy


class TextError(ValueError):
    """Bad text input; the message says how to fix it."""


def check_text(text: object, what: str = "text") -> str:
    if not isinstance(text, str):
        raise TextError(f"{what} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise TextError(f"{what} is empty or whitespace-only; pass the text to read (at least one non-space character)")
    if only_control(text):
        first = next(ch for ch in text if not ch.isspace())
        raise TextError(f"{what} has only control or invisible format characters (e.g. U+{ord(first):04X}), no "
                        "readable text; pass the text itself (at least one letter, digit, mark or symbol)")
    return text


def only_control(text: str) -> bool:
    """True when every character is whitespace or a control, format, surrogate, private-use or unassigned one.

    Such input (NUL bytes, zero-width joiners, a BOM) tokenizes to something, and the readout would
    score it as if it were text; it is refused instead.
    """
    import unicodedata

    return all(ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn") for ch in text)


def encode(tokenizer: object, text: str, max_tokens: int, truncation: TruncationPolicy = "error",
           what: str = "text", add_special_tokens: bool = True) -> list[int]:
    check_text(text, what)
    ids: list[int] = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    if len(ids) <= max_tokens:
        return ids
    if truncation == "error":
        raise TextError(f"{what} is {len(ids)} tokens, over the limit of {max_tokens}; shorten it, raise "
                        "--max-tokens, or choose a truncation policy (keep_end / keep_start)")
    bos = getattr(tokenizer, "bos_token_id", None)
    has_bos = add_special_tokens and bos is not None and ids and ids[0] == bos
    if truncation == "keep_start":
        return ids[:max_tokens]
    tail = ids[-(max_tokens - 1):] if has_bos else ids[-max_tokens:]
    return ([bos] + tail) if has_bos else tail
