"""A fresh KV cache and the keyword a model's forward takes it under (one place for transformers' API drift)."""

from __future__ import annotations

import inspect

from torch import nn


def cache_kwarg(model: nn.Module) -> str:
    """'cache' or 'past_key_values': transformers renamed the argument; ask the model's own signature."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def new_cache(model: nn.Module) -> object:
    """An empty DynamicCache built for this model's config (sliding-window layers included)."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older signature
        return DynamicCache()
