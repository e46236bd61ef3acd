"""The worker side of the plugin: decoder-layer hooks, per-request steering and readout, weights.

`AmygdalaWorkerExtension` is vLLM's `worker_extension_cls`: vLLM mixes it into its GPU worker, so
`self.model_runner` is the V1 model runner and every `amygdala_*` method is callable from the
driver with `collective_rpc`. Nothing here imports vllm: the math is plain torch, and the tests run
it on CPU with a fake runner and a fake model that return what vLLM's decoder layers return.

Per forward, once: read the flat batch's layout from the runner's host-side buffers (no GPU sync)
and turn it into per-layer routes (`routing`). Per decoder layer: add the steered rows' vectors in
place (one gather + one index_add), then, for requests that read, project their rows through their
probe and keep the (rows, concepts) result on the GPU until the driver collects it.

vLLM's decoder layers return (hidden_states, residual) with the residual add fused into the next
layer's norm; the residual stream after layer l is their *sum*. Steering adds to hidden_states,
which moves the sum by exactly the vector; readout reads the sum. (Reading hidden_states alone,
or norm-matching against it, is the fused-residual bug vllm-lens lists in its changelog.)

Only eager mode works: forward hooks do not run inside torch.compile'd graphs or CUDA graphs, and
the V2 model runner keeps its batch elsewhere. `amygdala_install` refuses both, loudly, instead of
steering nothing.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...backend import Probe
from ...model import LAYER_PATHS, _get_path
from .names import hf_views, kv_rows
from .routing import (
    BatchLayout,
    LayerRoute,
    ReadRoute,
    SteeringTable,
    apply_steering,
    read_routes,
    steering_routes,
)

log = logging.getLogger(__name__)

# SamplingParams.extra_args keys (flat strings, so they also travel as vllm_xargs over HTTP)
XARG_STEER = "amygdala_steer"
XARG_READ = "amygdala_read"
XARG_PROBE = "amygdala_probe"

# vLLM's own layouts that engine.model.LAYER_PATHS (HuggingFace's) does not list
VLLM_LAYER_PATHS = ("language_model.model.layers",)


class HookError(RuntimeError):
    """The hooks cannot work in this engine configuration; the message says which setting to change."""


def split_output(output: object) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden_states, residual or None) of a decoder layer's output (vLLM tuple or plain tensor)."""
    if isinstance(output, torch.Tensor):
        return output, None
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        h = output[0]
        r = output[1] if len(output) > 1 and isinstance(output[1], torch.Tensor) and output[1].shape == h.shape else None
        return h, r
    raise HookError(f"cannot find the hidden states in a decoder layer output of type {type(output).__name__}")


@dataclass
class _Chunks:
    rows: list[torch.Tensor] = field(default_factory=list)
    n: int = 0


class ReadStore:
    """Projections per read key and layer, in position order, kept on the device until collected.

    Chunks arrive per forward (a chunked prefill gives several). A chunk that starts before the
    rows already held is a recompute (vLLM preempted the request and runs it again): the held rows
    from that position on are dropped. A chunk that starts after them means positions were never
    run (a prefix read from the cache): recorded, and reported when collected.
    """

    def __init__(self) -> None:
        self._data: dict[str, dict[int, _Chunks]] = {}
        self._errors: dict[str, str] = {}

    def add(self, key: str, layer: int, first_position: int, proj: torch.Tensor) -> None:
        c = self._data.setdefault(key, {}).setdefault(layer, _Chunks())
        if first_position > c.n:
            self._errors.setdefault(key, f"positions {c.n}..{first_position - 1} were never run at layer {layer} "
                                         "(read from the prefix cache?); the request must set skip_reading_prefix_cache")
        elif first_position < c.n:
            keep, rows = first_position, []
            for t in c.rows:
                if keep <= 0:
                    break
                rows.append(t[:keep])
                keep -= t.shape[0]
            c.rows, c.n = rows, first_position
        c.rows.append(proj)
        c.n = max(c.n, first_position) + proj.shape[0]

    def take(self, key: str) -> dict[str, Any] | None:
        """{'layers': {layer: (T, C) float32 CPU}, 'error': str | None}; None when nothing was read."""
        layers = self._data.pop(key, None)
        error = self._errors.pop(key, None)
        if layers is None:
            return None if error is None else {"layers": {}, "error": error}
        return {"layers": {i: torch.cat(c.rows).float().cpu() for i, c in sorted(layers.items())}, "error": error}

    def drop(self, key: str) -> None:
        self._data.pop(key, None)
        self._errors.pop(key, None)

    def keys(self) -> list[str]:
        return sorted(self._data)


class HookEngine:
    """Steering and readout for one worker, given a source of batch layouts. No vllm here."""

    def __init__(self, hidden_size: int, device: torch.device | str, dtype: torch.dtype, *, capture: bool = True):
        self.hidden_size = hidden_size
        self.device = torch.device(device)
        self.steering = SteeringTable(hidden_size, device, dtype)
        self.probes: dict[str, Probe] = {}
        self.reads = ReadStore()
        self.capture = capture  # TP: every rank steers, one rank keeps projections (the stream is replicated)
        self._steer: dict[int, LayerRoute] = {}
        self._read: dict[str, ReadRoute] = {}
        self.forwards = 0

    def set_probe(self, probe_id: str, weight: Mapping[int, torch.Tensor | None],
                  bias: Mapping[int, torch.Tensor | None] | None = None) -> None:
        w = {int(i): None if t is None else torch.as_tensor(t).to(self.device, torch.float32) for i, t in weight.items()}
        b = {int(i): None if t is None else torch.as_tensor(t).to(self.device, torch.float32) for i, t in (bias or {}).items()}
        probe = Probe(weight=w, bias=b)
        for i, t in w.items():
            if t is not None and (t.ndim != 2 or t.shape[1] != self.hidden_size):
                raise ValueError(f"probe {probe_id} layer {i}: weight shape {tuple(t.shape)}, expected (C, {self.hidden_size})")
        self.probes[probe_id] = probe

    def begin(self, layout: BatchLayout | None) -> None:
        """Plan this forward's rows (called once per forward, before the first decoder layer)."""
        self.forwards += 1
        if layout is None or layout.num_reqs == 0:
            self._steer, self._read = {}, {}
            return
        self._steer = steering_routes(layout, self.steering) if any(layout.steer_keys) else {}
        self._read = read_routes(layout, self.device) if self.capture and any(layout.read_keys) else {}
        unknown = [p for p in self._read if p not in self.probes]
        if unknown:
            self._read = {}
            raise HookError(f"requests read with probe(s) {unknown}, which this worker does not hold; "
                            "amygdala_set_probe must run before they are submitted")

    def on_layer(self, layer: int, output: object) -> None:
        """Steer, then read, this layer's output in place (the hook returns nothing)."""
        if not self._steer and not self._read:
            return
        hidden, residual = split_output(output)
        route = self._steer.get(layer)
        if route is not None:
            tables, _ = self.steering.tables()
            apply_steering(hidden, route, tables[layer])
        for probe_id, rr in self._read.items():
            probe = self.probes[probe_id]
            if layer not in probe.weight:
                continue
            stream = hidden.index_select(0, rr.rows)
            if residual is not None:
                stream = stream + residual.index_select(0, rr.rows)
            proj = probe.apply(layer, stream)
            for key, rows, first in zip(rr.keys, proj.split(rr.counts), rr.first_positions):
                self.reads.add(key, layer, first, rows)


@dataclass
class _RequestMeta:
    steer: str | None
    read: str | None
    probe: str | None
    n_prompt: int


def _extra_args(req_state: Any) -> dict:
    sp = getattr(req_state, "sampling_params", None)
    return dict(getattr(sp, "extra_args", None) or {})


def layout_from_runner(runner: Any, num_tokens: int, cache: dict[str, _RequestMeta]) -> BatchLayout | None:
    """The current forward's BatchLayout from the V1 runner's host buffers; None for dummy/profile runs.

    Reads input_batch.req_ids / num_computed_tokens_cpu, query_start_loc.np and each request's
    prompt length and extra_args (cached per request id: they never change for a request).
    """
    batch = runner.input_batch
    n = int(batch.num_reqs)
    if n == 0:
        return None
    req_ids = list(batch.req_ids[:n])
    qsl = [int(x) for x in runner.query_start_loc.np[: n + 1]]
    if qsl[-1] > num_tokens or qsl[0] != 0:
        log.debug("skipping a forward whose %d rows do not match the batch's %d tokens (dummy run)", num_tokens, qsl[-1])
        return None
    computed = [int(x) for x in batch.num_computed_tokens_cpu[:n]]
    metas = []
    for rid in req_ids:
        meta = cache.get(rid)
        if meta is None:
            state = runner.requests[rid]
            xa = _extra_args(state)
            n_prompt = getattr(state, "num_prompt_tokens", None)
            if not isinstance(n_prompt, int):
                n_prompt = len(state.prompt_token_ids or [])
            meta = _RequestMeta(xa.get(XARG_STEER) or None, xa.get(XARG_READ) or None, xa.get(XARG_PROBE) or None,
                                n_prompt)
            cache[rid] = meta
        metas.append(meta)
    live = set(req_ids)
    if len(cache) > 4 * max(n, 64):  # forget finished requests now and then
        for rid in [r for r in cache if r not in live]:
            del cache[rid]
    reads = tuple(m.read if m.probe else None for m in metas)
    return BatchLayout(tuple(qsl), tuple(computed), tuple(m.n_prompt for m in metas), tuple(m.steer for m in metas),
                       reads, num_tokens, tuple(m.probe for m in metas))


def find_decoder_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """(the module owning the decoder layers, the layers) of a vLLM model, by engine's known paths."""
    for path in LAYER_PATHS + VLLM_LAYER_PATHS:
        layers = _get_path(model, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            parent = _get_path(model, path.rpartition(".")[0]) if "." in path else model
            return parent, layers  # type: ignore[return-value]
    raise HookError(f"cannot find the decoder layers of {type(model).__name__}; add its path to engine.model.LAYER_PATHS")


def _is_missing_layer(layer: nn.Module) -> bool:
    return type(layer).__name__ == "PPMissingLayer"  # pipeline parallel: the layer lives on another rank


def _num_tokens(args: tuple, kwargs: dict) -> int | None:
    """Rows of this forward: input_ids (N,), else inputs_embeds (N, H), else positions (N,) or M-RoPE's (3, N)."""
    x = kwargs.get("input_ids", args[0] if args else None)
    if isinstance(x, torch.Tensor):
        return int(x.shape[0])
    e = kwargs.get("inputs_embeds", args[3] if len(args) > 3 else None)
    if isinstance(e, torch.Tensor):
        return int(e.shape[0])
    p = kwargs.get("positions", args[1] if len(args) > 1 else None)
    return int(p.shape[-1]) if isinstance(p, torch.Tensor) else None


def install_hooks(model: nn.Module, engine: HookEngine, layout_source: Callable[[int], BatchLayout | None]) -> list[int]:
    """One pre-hook on the decoder stack (plans the forward) and one hook per local decoder layer."""
    parent, layers = find_decoder_layers(model)

    def plan(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        n = _num_tokens(args, kwargs)
        engine.begin(layout_source(n) if n is not None else None)

    handles = [parent.register_forward_pre_hook(plan, with_kwargs=True)]
    local = []
    for index, layer in enumerate(layers):
        if _is_missing_layer(layer):
            continue

        def hook(_m: nn.Module, _args: object, output: object, index: int = index) -> None:
            engine.on_layer(index, output)

        handles.append(layer.register_forward_hook(hook))
        local.append(index)
    return local


@dataclass
class _WorkerState:
    engine: HookEngine
    layers: list[int]
    n_layers: int
    weights_version: int = 0
    meta: dict[str, _RequestMeta] = field(default_factory=dict)


class AmygdalaWorkerExtension:
    """Methods vLLM mixes into its worker (`worker_extension_cls`); call them with collective_rpc.

    vLLM refuses an extension with an attribute its Worker already has, so every name here,
    private helpers included, starts with `amygdala_` / `_amygdala_`.
    """

    model_runner: Any  # provided by vLLM's Worker
    rank: int
    parallel_config: Any

    # -- set-up ------------------------------------------------------------------------------------
    def _amygdala_model(self) -> nn.Module:
        runner = self.model_runner
        return runner.get_model() if hasattr(runner, "get_model") else runner.model

    def _amygdala_state(self) -> _WorkerState:
        st = self.__dict__.get("_amygdala")
        if st is None:
            raise HookError("amygdala hooks are not installed in this worker; call collective_rpc('amygdala_install') first")
        return st

    def amygdala_install(self) -> dict:
        """Install the hooks once (idempotent); refuse configurations where hooks would silently not run."""
        st = self.__dict__.get("_amygdala")
        if st is not None:
            return self.amygdala_info()
        runner = self.model_runner
        if not (hasattr(runner, "input_batch") and hasattr(runner, "query_start_loc")):
            raise HookError(f"{type(runner).__module__}.{type(runner).__name__} is not vLLM's V1 GPU model runner: "
                            "amygdala's hooks read its batch layout. Set VLLM_USE_V2_MODEL_RUNNER=0")
        mc = getattr(runner, "model_config", None)
        if mc is not None and not getattr(mc, "enforce_eager", True):
            raise HookError("vLLM runs with torch.compile/CUDA graphs, where forward hooks do not run: "
                            "start it with enforce_eager=True (`--enforce-eager`)")
        model = self._amygdala_model()
        _, layers = find_decoder_layers(model)
        p = next(model.parameters())
        tp = int(getattr(getattr(self, "parallel_config", None), "tensor_parallel_size", 1) or 1)
        rank = int(getattr(self, "rank", 0) or 0)
        hidden = int(getattr(_text_config(model), "hidden_size", 0) or _hidden_of(layers))
        engine = HookEngine(hidden, p.device, p.dtype, capture=tp <= 1 or rank % tp == 0)
        meta: dict[str, _RequestMeta] = {}
        local = install_hooks(model, engine, lambda n: layout_from_runner(runner, n, meta))
        self.__dict__["_amygdala"] = _WorkerState(engine=engine, layers=local, n_layers=len(layers), meta=meta)
        return self.amygdala_info()

    def amygdala_info(self) -> dict:
        st = self._amygdala_state()
        model = self._amygdala_model()
        cfg = _text_config(model)
        return {"rank": int(getattr(self, "rank", 0) or 0), "layers": st.layers, "n_layers": st.n_layers,
                "hidden_size": st.engine.hidden_size, "vocab_size": int(getattr(cfg, "vocab_size", 0) or 0),
                "dtype": str(st.engine.steering.dtype).removeprefix("torch."), "device": str(st.engine.device),
                "architecture": type(model).__name__, "capture": st.engine.capture,
                "weights_version": st.weights_version, "forwards": st.engine.forwards}

    # -- steering and probes -----------------------------------------------------------------------
    def amygdala_set_steering(self, key: str, vectors: Mapping[int, torch.Tensor], positions: str) -> None:
        st = self._amygdala_state()
        bad = [i for i in vectors if not 0 <= int(i) < st.n_layers]
        if bad:
            raise ValueError(f"steering layers {bad} out of range: the model has {st.n_layers} decoder layers")
        st.engine.steering.register(key, vectors, positions)

    def amygdala_clear_steering(self, keys: Sequence[str]) -> None:
        st = self._amygdala_state()
        for k in keys:
            st.engine.steering.remove(k)

    def amygdala_set_probe(self, probe_id: str, weight: Mapping[int, torch.Tensor | None],
                           bias: Mapping[int, torch.Tensor | None] | None = None) -> None:
        self._amygdala_state().engine.set_probe(probe_id, weight, bias)

    def amygdala_clear_probe(self, probe_id: str) -> None:
        self._amygdala_state().engine.probes.pop(probe_id, None)

    def amygdala_collect(self, read_keys: Sequence[str]) -> dict[str, dict] | None:
        """Projections of finished requests (removed here); None on ranks that do not capture."""
        st = self._amygdala_state()
        if not st.engine.capture:
            for k in read_keys:
                st.engine.reads.drop(k)
            return None
        return {k: r for k in read_keys if (r := st.engine.reads.take(k)) is not None}

    def amygdala_discard(self, read_keys: Sequence[str]) -> None:
        """Forget projections nobody will collect (a generate call that failed or was aborted)."""
        st = self._amygdala_state()
        for k in read_keys:
            st.engine.reads.drop(k)

    # -- weights -----------------------------------------------------------------------------------
    def _amygdala_hf_views(self) -> dict[str, torch.Tensor]:
        model = self._amygdala_model()
        cfg = model.config
        tp = int(getattr(getattr(self, "parallel_config", None), "tensor_parallel_size", 1) or 1)
        if tp > 1:
            raise HookError(f"weights by HuggingFace name need whole tensors; this worker holds a 1/{tp} shard. "
                            "Read and sync weights with tensor_parallel_size=1")
        live = {n: p.data for n, p in model.named_parameters()}
        text_cfg = _text_config(model)
        return hf_views(live, kv_rows(text_cfg), getattr(text_cfg, "vocab_size", None),
                        bool(getattr(text_cfg, "tie_word_embeddings", getattr(cfg, "tie_word_embeddings", False))))

    def amygdala_weight_names(self) -> list[str]:
        return sorted(self._amygdala_hf_views())

    def amygdala_read_weights(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        views = self._amygdala_hf_views()
        missing = [n for n in names if n not in views]
        if missing:
            raise KeyError(f"unknown weight name(s) {missing[:5]}; use amygdala_weight_names()")
        return {n: views[n].detach().cpu().clone() for n in names}

    def amygdala_load_weights(self, items: Sequence[tuple[str, torch.Tensor]]) -> int:
        """Write HuggingFace-named tensors into the live weights through the model's own load_weights.

        load_weights packs q/k/v and gate/up (stacked_params_mapping) and shards for tensor
        parallelism itself. Returns the new weights version.
        """
        st = self._amygdala_state()
        model = self._amygdala_model()
        with torch.no_grad():
            loaded = model.load_weights(weights=iter(list(items)))
        if items and loaded is not None and not loaded:  # vLLM returns the live names it filled
            raise HookError(f"load_weights accepted none of {[n for n, _ in items][:5]}; pass HuggingFace names")
        st.weights_version += 1
        return st.weights_version

    def amygdala_load_weights_ipc(self, handles: Sequence[tuple[str, tuple]]) -> int:
        """`amygdala_load_weights` for tensors another process shares over CUDA IPC (no host copy)."""
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        items = [(name, rebuild_cuda_tensor(*args)) for name, args in handles]
        return self.amygdala_load_weights(items)

    def amygdala_weights_sha256(self) -> str:
        """sha256 over HuggingFace names and bytes in sorted order: LoadedModel.weights_sha256's definition."""
        h = hashlib.sha256()
        with torch.no_grad():
            for name, t in sorted(self._amygdala_hf_views().items()):
                h.update(name.encode())
                c = t.detach().contiguous().cpu()
                h.update(memoryview(c.view(torch.uint8).numpy()) if c.numel() else b"")
        return h.hexdigest()


def _text_config(model: nn.Module) -> Any:
    """The language model's config (multimodal wrappers such as Gemma 3 4B+ nest it as text_config)."""
    cfg = getattr(model, "config", None)
    get = getattr(cfg, "get_text_config", None)
    return get() if callable(get) else cfg


def _hidden_of(layers: nn.ModuleList) -> int:
    for p in layers[0].parameters():
        if p.ndim == 1:
            return int(p.shape[0])
    raise HookError("cannot tell the hidden size: the model config has no hidden_size")
