"""Peak bytes of tensor storage allocated inside a region, on any device (CPU included).

torch only reports peak memory for CUDA. On CPU, process RSS mixes in the allocator's caching and
Python's own memory, so comparing two ways of computing the same gradient needs something exact:
this dispatch mode sees every tensor an operator creates (forward and backward, since autograd runs
the backward ops in the calling thread on CPU), counts each new storage once, and subtracts it when
the storage is freed. The peak is over storages created inside the region; tensors that existed
before (the weights) are not counted. `UntypedStorage.resize_` bypasses dispatch and is not seen;
the ops of a transformer forward/backward do not use it.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakTensorMemory(TorchDispatchMode):
    """`with PeakTensorMemory() as m: ...` then `m.peak` (bytes) and `m.current` (still alive at exit)."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._seen: dict[int, int] = {}  # storage data_ptr -> bytes, for storages created inside
        self._refs: list[weakref.ref] = []

    def _track(self, t: torch.Tensor, inputs: set[int]) -> None:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr == 0 or ptr in self._seen or ptr in inputs:  # views and in-place results reuse an input's storage
            return
        nbytes = storage.nbytes()
        self._seen[ptr] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)

        def freed(_ref: weakref.ref, ptr: int = ptr) -> None:
            self.current -= self._seen.pop(ptr, 0)

        self._refs.append(weakref.ref(storage, freed))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch's protocol)
        out = func(*args, **(kwargs or {}))
        flat_in, _ = tree_flatten((args, kwargs))
        inputs = {t.untyped_storage().data_ptr() for t in flat_in if isinstance(t, torch.Tensor) and not t.is_meta}
        flat, _ = tree_flatten(out)
        for t in flat:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                self._track(t, inputs)
        return out
