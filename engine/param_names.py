"""Live parameter names -> checkpoint tensor names, per serving backend.

transformers keeps the HuggingFace names, so the mapping is the identity. vLLM packs some projections
into one parameter (its `packed_modules_mapping` / `stacked_params_mapping`): `qkv_proj` is q, k and v
concatenated along dim 0, `gate_up_proj` is gate then up. Sync splits such a parameter back into
the HuggingFace tensors as views (no copy). The split sizes come from the file's own shapes, so no
model config is needed, and a disagreement is a shape mismatch rather than a silent misalignment.

Why this sits in engine: checkpoint sync (training) and the vLLM backend (engine/backends/vllm) both
need the one table, and engine may not import training. `training.checkpoint.names` re-exports it,
and `training.checkpoint.format` re-exports the two errors, so sync's callers see no change.

Tensor-parallel vLLM (each worker holding a slice) is out of scope: the live tensors must be whole.
The table is data: a new packed module is one more `PackedModule` entry.

No torch import here: live tensors may be numpy arrays (tests, plain-file syncs).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .checkpoint_journal import SyncError

NameScheme = Literal["transformers", "vllm"]


class MismatchError(SyncError):
    """Shape or dtype of a live tensor disagrees with the file."""


class MissingTensorError(SyncError):
    """A tensor exists on one side (live weights or files) but not the other."""


@dataclass(frozen=True)
class PackedModule:
    """A module the backend packs: `packed` is its live name, `parts` the checkpoint names in order."""

    packed: str
    parts: tuple[str, ...]


# vLLM's stacked_params_mapping (Llama, Gemma 1-3, Qwen 2/3, Mistral, ...): shard order along dim 0.
VLLM_PACKED: tuple[PackedModule, ...] = (
    PackedModule("qkv_proj", ("q_proj", "k_proj", "v_proj")),
    PackedModule("gate_up_proj", ("gate_proj", "up_proj")),
)

NAME_TABLES: dict[str, tuple[PackedModule, ...]] = {
    "transformers": (),
    "vllm": VLLM_PACKED,
}


def _table(scheme: str) -> tuple[PackedModule, ...]:
    try:
        return NAME_TABLES[scheme]
    except KeyError:
        raise ValueError(f"unknown name scheme {scheme!r}; use one of {sorted(NAME_TABLES)}") from None


def unpacked_names(live_name: str, scheme: NameScheme) -> tuple[str, ...] | None:
    """Checkpoint names a packed live parameter splits into, or None if it is not packed."""
    parts = live_name.split(".")
    for entry in _table(scheme):
        if entry.packed in parts:
            i = parts.index(entry.packed)
            return tuple(".".join(parts[:i] + [p] + parts[i + 1:]) for p in entry.parts)
    return None


def packed_name(file_name: str, scheme: NameScheme) -> tuple[str, int] | None:
    """(live packed name, shard index) of a checkpoint tensor the backend packs, or None."""
    parts = file_name.split(".")
    for entry in _table(scheme):
        for shard, part in enumerate(entry.parts):
            if part in parts:
                i = parts.index(part)
                return ".".join(parts[:i] + [entry.packed] + parts[i + 1:]), shard
    return None


def _rows(t: Any, start: int, n: int) -> Any:
    """Rows [start, start+n) of a torch tensor or numpy array, as a view."""
    if hasattr(t, "narrow"):
        return t.narrow(0, start, n)
    return t[start:start + n]


def to_file_names(live: Mapping[str, Any], file_shapes: Mapping[str, tuple[int, ...]],
                  scheme: NameScheme) -> tuple[dict[str, Any], list[str]]:
    """Live tensors re-keyed by checkpoint name, plus the live names that found no checkpoint tensor.

    Packed parameters are split along dim 0 into the checkpoint's q/k/v (gate/up) tensors, sized by
    the checkpoint's shapes. The unmatched list is for the caller to judge (tied weights are fine).
    """
    out: dict[str, Any] = {}
    unmatched: list[str] = []
    for name, tensor in live.items():
        parts = unpacked_names(name, scheme)
        if parts is None:
            if name in file_shapes:
                out[name] = tensor
            else:
                unmatched.append(name)
            continue
        missing = [p for p in parts if p not in file_shapes]
        if len(missing) == len(parts):
            unmatched.append(name)
            continue
        if missing:
            raise MissingTensorError(f"live {name} packs {', '.join(parts)}, but the checkpoint lacks "
                                     f"{', '.join(missing)}: it is not this model's checkpoint")
        sizes = [file_shapes[p][0] if file_shapes[p] else 0 for p in parts]
        shape = tuple(tensor.shape)
        if not shape or sum(sizes) != shape[0] or any(tuple(file_shapes[p][1:]) != shape[1:] for p in parts):
            raise MismatchError(f"live {name} has shape {list(shape)}, which does not split into "
                                + ", ".join(f"{p}{list(file_shapes[p])}" for p in parts)
                                + " along dim 0; is the live model tensor-parallel (sync needs whole tensors) "
                                  "or a different model?")
        offset = 0
        for part, size in zip(parts, sizes):
            out[part] = _rows(tensor, offset, size)
            offset += size
    return out, unmatched


def pack(hf: Mapping[str, Any], scheme: NameScheme) -> dict[str, Any]:
    """HuggingFace tensors packed the way the backend's loader packs them (the inverse of to_file_names).

    Used to test the round trip, and to build backend-named weights from a checkpoint.
    """
    groups: dict[str, dict[int, Any]] = {}
    out: dict[str, Any] = {}
    for name, tensor in hf.items():
        target = packed_name(name, scheme)
        if target is None:
            out[name] = tensor
        else:
            groups.setdefault(target[0], {})[target[1]] = tensor
    for live_name, shards in groups.items():
        parts = unpacked_names(live_name, scheme) or ()
        if sorted(shards) != list(range(len(parts))):
            have = [parts[i] for i in sorted(shards)]
            raise MissingTensorError(f"cannot pack {live_name}: have {have}, need all of {list(parts)}")
        tensors = [shards[i] for i in range(len(parts))]
        if hasattr(tensors[0], "narrow"):
            import torch

            out[live_name] = torch.cat(tensors, dim=0)
        else:
            import numpy as np

            out[live_name] = np.concatenate(tensors, axis=0)
    return out
