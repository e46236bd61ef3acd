"""Per-request steering and readout on vLLM's flattened token batch.

vLLM's V1 model runner runs every scheduled request in one forward over a flat (num_tokens, hidden)
tensor: request i owns rows query_start_loc[i] .. query_start_loc[i+1], which are its positions
num_computed[i] .. num_computed[i] + len. A row is a prompt token while its position is below the
request's prompt length, a generated token after: that is how a chunked prefill (a prompt split
over several steps, sharing a step with other requests' decodes) keeps "steer the prompt only"
exact. Rows past query_start_loc[-1] are padding.

Continuous batching correctness is decided here, once per forward, on the CPU, from numbers the
runner already holds on the host (no GPU sync): each steered row gets its own request's vector,
every other row is left bit-for-bit untouched. The GPU work per layer is then one gather from a
small table of registered vectors and one index_add into the hidden states.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

Positions = Literal["prompt", "generated", "both"]
POSITIONS: tuple[str, ...] = ("prompt", "generated", "both")


class LayoutError(ValueError):
    """A batch layout that cannot be right (the runner's buffers were read at the wrong moment)."""


@dataclass(frozen=True)
class BatchLayout:
    """One forward's flattened batch: per request its rows, first position, prompt length and keys."""

    query_start_loc: tuple[int, ...]  # num_reqs + 1 offsets, starting at 0
    num_computed: tuple[int, ...]  # tokens of the request already in the KV cache before this forward
    num_prompt: tuple[int, ...]
    steer_keys: tuple[str | None, ...]
    read_keys: tuple[str | None, ...]
    num_tokens: int  # rows of the hidden-state tensor (>= query_start_loc[-1]; the rest is padding)
    probe_ids: tuple[str | None, ...] = ()  # the probe each reading request reads with (empty: none reads)

    def __post_init__(self) -> None:
        n = len(self.query_start_loc) - 1
        if n < 0 or self.query_start_loc[0] != 0:
            raise LayoutError(f"query_start_loc must start at 0, got {list(self.query_start_loc[:3])}")
        if not all(len(x) == n for x in (self.num_computed, self.num_prompt, self.steer_keys, self.read_keys)):
            raise LayoutError(f"{n} requests in query_start_loc, but per-request lists of lengths "
                              f"{[len(self.num_computed), len(self.num_prompt), len(self.steer_keys), len(self.read_keys)]}")
        if self.probe_ids and len(self.probe_ids) != n:
            raise LayoutError(f"{n} requests but {len(self.probe_ids)} probe ids")
        missing = [i for i, k in enumerate(self.read_keys) if k is not None and not self.probe_of(i)]
        if missing:
            raise LayoutError(f"requests {missing} read but name no probe; send amygdala_probe with amygdala_read")
        qsl = np.asarray(self.query_start_loc)
        if (np.diff(qsl) < 0).any():
            raise LayoutError(f"query_start_loc must be non-decreasing, got {list(self.query_start_loc)}")
        if self.query_start_loc[-1] > self.num_tokens:
            raise LayoutError(f"layout covers {self.query_start_loc[-1]} rows, the hidden states have {self.num_tokens}")

    def probe_of(self, i: int) -> str | None:
        return self.probe_ids[i] if self.probe_ids else None

    @property
    def num_reqs(self) -> int:
        return len(self.query_start_loc) - 1

    def segment(self, i: int) -> tuple[int, int]:
        return self.query_start_loc[i], self.query_start_loc[i + 1]

    def row_positions(self, i: int) -> np.ndarray:
        start, end = self.segment(i)
        return self.num_computed[i] + np.arange(end - start)

    @classmethod
    def build(cls, query_lens: Sequence[int], num_computed: Sequence[int], num_prompt: Sequence[int],
              steer_keys: Sequence[str | None] | None = None, read_keys: Sequence[str | None] | None = None,
              num_tokens: int | None = None, probe_ids: Sequence[str | None] | None = None) -> BatchLayout:
        """From per-request query lengths (tests, and runners that expose lengths instead of offsets)."""
        qsl = tuple(int(x) for x in np.concatenate([[0], np.cumsum(np.asarray(query_lens, dtype=np.int64))]))
        n = len(query_lens)
        return cls(qsl, tuple(int(x) for x in num_computed), tuple(int(x) for x in num_prompt),
                   tuple(steer_keys) if steer_keys is not None else (None,) * n,
                   tuple(read_keys) if read_keys is not None else (None,) * n,
                   qsl[-1] if num_tokens is None else int(num_tokens), tuple(probe_ids) if probe_ids is not None else ())


@dataclass
class SteeringEntry:
    """A registered steering spec: vectors per layer (model dtype, device) and where they apply."""

    vectors: dict[int, torch.Tensor]
    positions: Positions


class SteeringTable:
    """The worker's registered steering specs, stacked per layer for the one-gather add.

    Row 0 of every layer's table is unused padding so that a spec without a given layer never
    needs a branch in the hot path: its rows are simply not listed for that layer.
    """

    def __init__(self, hidden_size: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.hidden_size = hidden_size
        self.device = torch.device(device)
        self.dtype = dtype
        self.entries: dict[str, SteeringEntry] = {}
        self._tables: dict[int, torch.Tensor] | None = None
        self._slots: dict[int, dict[str, int]] = {}

    def register(self, key: str, vectors: Mapping[int, torch.Tensor], positions: str) -> None:
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {', '.join(POSITIONS)}; got {positions!r}")
        if not vectors:
            raise ValueError(f"steering spec {key} has no layers")
        out = {}
        for layer, v in vectors.items():
            v = torch.as_tensor(v)
            if tuple(v.shape) != (self.hidden_size,):
                raise ValueError(f"steering vector for layer {layer} has shape {tuple(v.shape)}; the model's hidden size is {self.hidden_size}")
            if not torch.isfinite(v).all():
                raise ValueError(f"steering vector for layer {layer} has NaN or inf")
            out[int(layer)] = v.to(device=self.device, dtype=self.dtype)
        self.entries[key] = SteeringEntry(out, positions)  # type: ignore[arg-type]
        self._tables = None

    def remove(self, key: str) -> None:
        if self.entries.pop(key, None) is not None:
            self._tables = None

    def __contains__(self, key: object) -> bool:
        return key in self.entries

    def tables(self) -> tuple[dict[int, torch.Tensor], dict[int, dict[str, int]]]:
        """{layer: (1 + n_specs_with_layer, H)} and {layer: {key: row}}; rebuilt only after a change."""
        if self._tables is None:
            by_layer: dict[int, list[tuple[str, torch.Tensor]]] = {}
            for key, e in self.entries.items():
                for layer, v in e.vectors.items():
                    by_layer.setdefault(layer, []).append((key, v))
            self._tables, self._slots = {}, {}
            for layer, items in by_layer.items():
                pad = torch.zeros(1, self.hidden_size, device=self.device, dtype=self.dtype)
                self._tables[layer] = torch.cat([pad] + [v.unsqueeze(0) for _, v in items])
                self._slots[layer] = {k: j + 1 for j, (k, _) in enumerate(items)}
        return self._tables, self._slots


@dataclass
class LayerRoute:
    """Rows of the flat batch to steer at one layer, and the table row each one adds."""

    rows: torch.Tensor  # (R,) long
    slots: torch.Tensor  # (R,) long


@dataclass
class ReadRoute:
    """Rows of the flat batch some request reads, grouped per request (contiguous in `rows`)."""

    rows: torch.Tensor  # (R,) long, all reading rows
    keys: list[str] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)  # rows per key, in order
    first_positions: list[int] = field(default_factory=list)  # position of each key's first row


def _steered_rows(layout: BatchLayout, i: int, positions: str) -> np.ndarray:
    start, end = layout.segment(i)
    rows = np.arange(start, end)
    if positions == "both":
        return rows
    is_prompt = layout.row_positions(i) < layout.num_prompt[i]
    return rows[is_prompt] if positions == "prompt" else rows[~is_prompt]


def steering_routes(layout: BatchLayout, table: SteeringTable) -> dict[int, LayerRoute]:
    """Per layer, the rows to steer and their vectors' table rows; empty when nothing is steered."""
    _, slots = table.tables()
    rows: dict[int, list[np.ndarray]] = {}
    slot_rows: dict[int, list[np.ndarray]] = {}
    for i, key in enumerate(layout.steer_keys):
        if key is None:
            continue
        entry = table.entries.get(key)
        if entry is None:  # registered per request before it is scheduled; a missing one is a bug upstream
            raise LayoutError(f"request {i} names steering spec {key}, which this worker does not hold; "
                              "set_steering must run on every worker before the request is submitted")
        r = _steered_rows(layout, i, entry.positions)
        if r.size == 0:
            continue
        for layer in entry.vectors:
            rows.setdefault(layer, []).append(r)
            slot_rows.setdefault(layer, []).append(np.full(r.size, slots[layer][key], dtype=np.int64))
    out = {}
    for layer, parts in rows.items():
        r = torch.from_numpy(np.concatenate(parts))
        s = torch.from_numpy(np.concatenate(slot_rows[layer]))
        out[layer] = LayerRoute(r.to(table.device, non_blocking=True), s.to(table.device, non_blocking=True))
    return out


def read_routes(layout: BatchLayout, device: torch.device | str = "cpu") -> dict[str, ReadRoute]:
    """Per probe, all rows of the requests reading with it, with per-request counts and first positions."""
    parts: dict[str, list[np.ndarray]] = {}
    routes: dict[str, ReadRoute] = {}
    for i, key in enumerate(layout.read_keys):
        if key is None:
            continue
        start, end = layout.segment(i)
        if end == start:
            continue
        probe = layout.probe_of(i)
        assert probe is not None  # checked in BatchLayout
        route = routes.setdefault(probe, ReadRoute(rows=torch.empty(0, dtype=torch.long)))
        parts.setdefault(probe, []).append(np.arange(start, end))
        route.keys.append(key)
        route.counts.append(end - start)
        route.first_positions.append(layout.num_computed[i])
    for probe, route in routes.items():
        route.rows = torch.from_numpy(np.concatenate(parts[probe])).to(device, non_blocking=True)
    return routes


def apply_steering(hidden: torch.Tensor, route: LayerRoute, table: torch.Tensor) -> torch.Tensor:
    """hidden[rows] += table[slots], in place: one gather and one index_add; other rows untouched."""
    hidden.index_add_(0, route.rows, table.index_select(0, route.slots).to(hidden.dtype))
    return hidden
