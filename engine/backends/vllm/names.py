"""HuggingFace names over vLLM's live parameters, with checkpoint sync's packed-module table.

The table (qkv_proj = q|k|v, gate_up_proj = gate|up along dim 0) is `engine.param_names`, the one
checkpoint sync uses; nothing here restates it. What this adds is sizing the split from the model
config instead of from a file: q is what remains after k and v (num_key_value_heads * head_dim
rows each), gate and up are halves. Views, never copies: reading a weight by name costs nothing,
and a module bound to these views (`bind_views`) trains vLLM's own memory in place.

vLLM pads the embedding (and an untied LM head) to a multiple of 64 rows: views are cut to the
real vocabulary. Tied embeddings have no lm_head parameter in vLLM: it is served as an alias of
the embedding, as HuggingFace's state_dict lists it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ...param_names import (
    MismatchError,
    MissingTensorError,
    packed_name,
    to_file_names,
    unpacked_names,
)

EMBED_SUFFIX = "embed_tokens.weight"
LM_HEAD = "lm_head.weight"


def kv_rows(config: Any, tensor_parallel_size: int = 1) -> int:
    """Rows of k_proj (= v_proj) in one worker: num_key_value_heads * head_dim / tensor-parallel size."""
    heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rows = heads * int(head_dim)
    if rows % tensor_parallel_size:
        raise MismatchError(f"{heads} KV heads x {head_dim} do not split over tensor-parallel size {tensor_parallel_size}")
    return rows // tensor_parallel_size


def _split_sizes(live_name: str, rows: int, kv: int) -> tuple[int, ...]:
    parts = unpacked_names(live_name, "vllm") or ()
    if len(parts) == 3:  # q, k, v
        q = rows - 2 * kv
        if q <= 0:
            raise MismatchError(f"{live_name} has {rows} rows, too few for q plus k and v of {kv} rows each; "
                                "is kv_rows right for this model (num_key_value_heads * head_dim)?")
        return (q, kv, kv)
    if len(parts) == 2:  # gate, up
        if rows % 2:
            raise MismatchError(f"{live_name} has {rows} rows, which do not split into equal gate and up halves")
        return (rows // 2, rows // 2)
    raise MismatchError(f"no split rule for packed parameter {live_name} ({len(parts)} parts); add one to {__name__}")


def hf_shapes(live_shapes: Mapping[str, Sequence[int]], kv: int) -> dict[str, tuple[int, ...]]:
    """HuggingFace tensor shapes behind vLLM's live parameter shapes (the `file_shapes` of to_file_names)."""
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in live_shapes.items():
        shape = tuple(int(x) for x in shape)
        parts = unpacked_names(name, "vllm")
        if parts is None:
            out[name] = shape
            continue
        if not shape:
            raise MismatchError(f"packed parameter {name} is a scalar")
        for part, rows in zip(parts, _split_sizes(name, shape[0], kv)):
            out[part] = (rows, *shape[1:])
    return out


def hf_views(live: Mapping[str, torch.Tensor], kv: int, vocab_size: int | None = None,
             tie_word_embeddings: bool = False) -> dict[str, torch.Tensor]:
    """{HuggingFace name: view into the live vLLM tensor}, vocabulary padding cut, tied head aliased."""
    shapes = hf_shapes({n: tuple(t.shape) for n, t in live.items()}, kv)
    views, unmatched = to_file_names(live, shapes, "vllm")
    if unmatched:  # every shape was derived from `live`, so this means the table and the split disagree
        raise MissingTensorError(f"live parameters {unmatched[:5]} found no HuggingFace name")
    if vocab_size is not None:
        for name, t in list(views.items()):
            if (name.endswith(EMBED_SUFFIX) or name == LM_HEAD) and t.shape[0] > vocab_size:
                views[name] = t.narrow(0, 0, vocab_size)
    if tie_word_embeddings and LM_HEAD not in views:
        embed = [n for n in views if n.endswith(EMBED_SUFFIX)]
        if len(embed) == 1:
            views[LM_HEAD] = views[embed[0]]
    return views


def live_names_for(hf_names: Sequence[str]) -> dict[str, list[str]]:
    """{live vLLM parameter: the HuggingFace names written into it}: which packed tensors a write touches."""
    out: dict[str, list[str]] = {}
    for name in hf_names:
        target = packed_name(name, "vllm")
        out.setdefault(target[0] if target else name, []).append(name)
    return out


def bind_views(module: nn.Module, views: Mapping[str, torch.Tensor]) -> list[str]:
    """Point `module`'s parameters at `views` (same names, shapes, dtypes): it then reads and writes them.

    This is how a HuggingFace-layout model trains vLLM's live weights without a copy: its q_proj
    parameter *is* rows 0..q of vLLM's qkv_proj. Everything is checked before anything is bound.
    """
    params = dict(module.named_parameters())
    missing = [n for n in params if n not in views]
    if missing:
        raise MissingTensorError(f"no live tensor for {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                                 "is this the served model?")
    bad = [f"{n}: module {tuple(p.shape)}/{p.dtype}, live {tuple(views[n].shape)}/{views[n].dtype}"
           for n, p in params.items() if tuple(p.shape) != tuple(views[n].shape) or p.dtype != views[n].dtype]
    if bad:
        raise MismatchError("cannot bind: " + "; ".join(bad[:5]))
    for n, p in params.items():
        p.data = views[n]
    return sorted(params)
