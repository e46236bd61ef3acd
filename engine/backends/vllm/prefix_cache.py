"""Prefix-cache keys: a steered prefix is never reused for an unsteered request, nor the reverse.

vLLM's prefix cache hashes each KV block from its tokens and the blocks before it; the first block
also mixes in the request's `cache_salt`. The KV of a steered prompt is not the KV of the same
tokens unsteered, so the salt must name the steering: two requests share blocks only when their
tokens *and* steering (vectors, layers, positions) *and* weights are identical, which is exactly
when the KV is identical.

- steering key: sha256 over positions, layers and the float32 bytes of every vector. It names the
  spec on the workers too, so identical specs in one batch share one table row.
- weights version: in-place weight updates make every cached block stale. The version is part of
  every salt, so blocks written before an update (even by requests still in flight while it lands)
  can never be read after it; resetting the cache afterwards only frees their memory.
- readout: the hooks see only positions the model runs, and a prefix read from the cache is not
  run. Requests that read set `skip_reading_prefix_cache`; they still write their blocks, which are
  valid for others with the same salt.

Steering applied to generated positions only still gets its own salt: vLLM caches blocks that
contain output tokens too, and a follow-up turn whose prompt is this request's prompt + output
would otherwise reuse steered KV unsteered.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import torch

SALT_PREFIX = "amygdala"


def steering_key(vectors: Mapping[int, torch.Tensor], positions: str) -> str:
    """Content hash of a steering spec (32 hex digits): equal specs give equal keys, any change a new one."""
    h = hashlib.sha256()
    h.update(b"amygdala-steering-v1\0")
    h.update(positions.encode() + b"\0")
    for layer in sorted(vectors):
        v = vectors[layer].detach().to(torch.float32).contiguous().cpu()
        h.update(struct.pack("<qq", int(layer), v.numel()))
        h.update(memoryview(v.numpy()).cast("B"))
    return h.hexdigest()[:32]


@dataclass(frozen=True)
class CachePolicy:
    """What one request sends vLLM: its cache salt, and whether it may read cached prefixes."""

    cache_salt: str
    skip_reading_prefix_cache: bool


def cache_salt(weights_version: int, steer_key: str | None, user_salt: str | None = None) -> str:
    """`amygdala:w<version>[:s<steering key>][:u<caller's salt>]`; the caller's salt still isolates its users."""
    if weights_version < 0:
        raise ValueError(f"weights_version must be >= 0, got {weights_version}")
    salt = f"{SALT_PREFIX}:w{int(weights_version)}"
    if steer_key:
        salt += f":s{steer_key}"
    if user_salt:
        salt += f":u{user_salt}"
    return salt


def policy(weights_version: int, steer_key: str | None, reads: bool, user_salt: str | None = None) -> CachePolicy:
    return CachePolicy(cache_salt=cache_salt(weights_version, steer_key, user_salt), skip_reading_prefix_cache=bool(reads))
