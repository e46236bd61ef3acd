"""The vLLM backend, driver side: `engine.backend.Backend` over `vllm.LLM` and our worker extension.

Per `generate` call: every distinct steering spec and probe is sent to all workers first
(tensors do not travel in SamplingParams; `collective_rpc` carries them), each request names its
spec, probe and a fresh read key in `extra_args`, gets the cache salt and prefix-cache policy of
`prefix_cache`, and after generation the workers' projections are collected and the specs
cleared. The request-building and output-assembly steps are plain functions (`build_request`,
`assemble_output`, `merge_collected`) so their rules are tested without a GPU.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...activations import Pooling, pool
from ...backend import (
    BackendError,
    BackendKind,
    GenerationOutput,
    GenerationRequest,
    ModelInfo,
    Probe,
    Sampling,
    check_names,
)
from .plugin import OPT_IN_ENV, RUNNER_ENV, WORKER_EXTENSION
from .prefix_cache import policy, steering_key
from .serve import require_vllm
from .worker import XARG_PROBE, XARG_READ, XARG_STEER


def probe_id(probe: Probe) -> str:
    """Content hash of a probe: the same readout registers once per worker, whatever object carries it."""
    h = hashlib.sha256(b"amygdala-probe-v1\0")
    for i in probe.layers:
        h.update(str(i).encode() + b"\0")
        for t in (probe.weight[i], probe.bias.get(i)):
            if t is None:
                h.update(b"-")
            else:
                c = t.detach().float().contiguous().cpu()
                h.update(str(tuple(c.shape)).encode())
                h.update(memoryview(c.numpy()).cast("B"))
    return h.hexdigest()[:24]


@dataclass(frozen=True)
class VllmRequest:
    """What one GenerationRequest becomes: vLLM's prompt dict and SamplingParams keyword arguments."""

    prompt: dict[str, Any]
    params: dict[str, Any]
    read_key: str | None
    requested_tokens: int  # max_tokens sent: one more than asked when the last token must be fed too


def build_request(req: GenerationRequest, *, weights_version: int, steer: str | None, probe: str | None,
                  read_key: str | None = None, user_salt: str | None = None) -> VllmRequest:
    s = req.sampling
    if not req.prompt_ids:
        raise BackendError("prompt is empty; pass at least one token")
    reads = probe is not None
    read_key = (read_key or uuid.uuid4().hex) if reads else None
    # vLLM needs max_tokens >= 1 and never runs the last sampled token: ask for one more and drop it
    # when the caller wants the final token observed (read_last) or wants no token at all.
    extra = 1 if (s.read_last and s.max_new_tokens > 0) or s.max_new_tokens == 0 else 0
    requested = s.max_new_tokens + extra
    cp = policy(weights_version, steer, reads, user_salt)
    xargs: dict[str, Any] = {}
    if steer:
        xargs[XARG_STEER] = steer
    if reads:
        xargs[XARG_READ] = read_key
        xargs[XARG_PROBE] = probe
    params = {"max_tokens": requested, "temperature": float(s.temperature), "top_p": float(s.top_p),
              "top_k": int(s.top_k) or -1,  # -1 is "off" in every vLLM version; 0 only in newer ones
              "seed": s.seed, "ignore_eos": not s.stop_at_eos, "logprobs": 0,
              "extra_args": xargs or None, "skip_reading_prefix_cache": cp.skip_reading_prefix_cache}
    prompt = {"prompt_token_ids": list(req.prompt_ids), "cache_salt": cp.cache_salt}
    return VllmRequest(prompt=prompt, params=params, read_key=read_key, requested_tokens=requested)


def merge_collected(per_rank: Sequence[Mapping[str, dict] | None]) -> dict[str, dict]:
    """Join the workers' collect results: pipeline stages hold different layers; TP ranks but one send None."""
    out: dict[str, dict] = {}
    for part in per_rank:
        for key, res in (part or {}).items():
            cur = out.setdefault(key, {"layers": {}, "error": None})
            cur["layers"].update(res.get("layers", {}))
            cur["error"] = cur["error"] or res.get("error")
    return out


def assemble_output(req: GenerationRequest, vreq: VllmRequest, token_ids: Sequence[int], logprobs: Sequence[float],
                    finish: str, collected: dict | None, decode: Any, stop_ids: set[int]) -> GenerationOutput:
    """GenerationOutput with engine.generation's semantics from one vLLM completion.

    Tokens beyond max_new_tokens (the extra one build_request asked for) are dropped, and then the
    finish reason is "length". Projections keep the positions engine.generation would have run:
    the prompt, then every generated token but the last, unless read_last and it stopped on length.
    A forward vLLM ran after the stop (its scheduler can schedule one more step) is cut off.
    """
    s = req.sampling
    toks, lps = list(token_ids), list(logprobs)
    reason = "eos" if finish == "stop" else "length"
    if len(toks) > s.max_new_tokens:
        toks, lps, reason = toks[: s.max_new_tokens], lps[: s.max_new_tokens], "length"
    if reason == "eos" and toks and toks[-1] not in stop_ids and s.stop_at_eos:
        reason = "length"  # a stop string, which engine.generation does not have; report the honest one
    fed = len(toks) if (s.read_last and reason == "length") else max(len(toks) - 1, 0)
    n_rows = len(req.prompt_ids) + fed
    proj = None
    if vreq.read_key is not None:
        if not collected or not collected.get("layers"):
            raise BackendError("the workers returned no projections for a request that reads: the hooks did not "
                               "run (engine not in eager mode, or the V2 model runner); see amygdala_install")
        if collected.get("error"):
            raise BackendError(f"readout incomplete: {collected['error']}")
        proj = {}
        for i, t in collected["layers"].items():
            if t.shape[0] < n_rows:
                raise BackendError(f"layer {i}: {t.shape[0]} positions read, {n_rows} expected; was the prefix "
                                   "cache read for this request?")
            proj[int(i)] = t[:n_rows]
        want = set(req.probe.layers) if req.probe else set()
        if set(proj) != want:
            raise BackendError(f"projections for layers {sorted(proj)}, the probe has {sorted(want)}")
    text = decode([t for t in toks if t not in stop_ids])
    return GenerationOutput(prompt_ids=list(req.prompt_ids), token_ids=toks, text=text, finish_reason=reason,  # type: ignore[arg-type]
                            logprobs=lps, projections=proj)


def _sampling_params(cls: Any, params: dict[str, Any]) -> Any:
    """SamplingParams from build_request's keywords; the prefix-cache flag is set as an attribute,
    which every vLLM that has it accepts (vllm-lens sets it the same way)."""
    kw = {k: v for k, v in params.items() if k != "skip_reading_prefix_cache"}
    sp = cls(**kw)
    if params.get("skip_reading_prefix_cache"):
        sp.skip_reading_prefix_cache = True
    return sp


class VllmBackend:
    """A vLLM engine in this process (offline `LLM`), hooks installed in every worker."""

    kind: BackendKind = "vllm"

    def __init__(self, model: str | Path, *, tensor_parallel_size: int = 1, dtype: str = "auto",
                 max_model_len: int | None = None, gpu_memory_utilization: float = 0.85,
                 enable_prefix_caching: bool = True, seed: int = 0, **engine_kwargs: Any):
        require_vllm()
        os.environ[OPT_IN_ENV] = "1"
        os.environ[RUNNER_ENV] = "0"
        from vllm import LLM

        self.llm = LLM(model=str(model), tensor_parallel_size=tensor_parallel_size, dtype=dtype,
                       max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization,
                       enable_prefix_caching=enable_prefix_caching, enforce_eager=True, seed=seed,
                       worker_extension_cls=WORKER_EXTENSION, **engine_kwargs)
        infos = self.llm.collective_rpc("amygdala_install")
        self._installed = infos[0]
        self.tokenizer = self.llm.get_tokenizer()
        self.model_path = Path(model)
        self.tensor_parallel_size = tensor_parallel_size
        self.weights_version = 0
        self._probes: set[str] = set()
        self._names: list[str] | None = None
        eos = getattr(self.tokenizer, "eos_token_id", None)
        self.stop_ids = {int(eos)} if isinstance(eos, int) else set()
        try:
            from transformers import GenerationConfig

            g = GenerationConfig.from_pretrained(str(model)).eos_token_id
            self.stop_ids |= {int(g)} if isinstance(g, int) else {int(x) for x in (g or [])}
        except (OSError, ValueError):
            pass

    def info(self) -> ModelInfo:
        i = self._installed
        return ModelInfo(backend="vllm", name=self.model_path.name, architecture=i["architecture"],
                         n_layers=i["n_layers"], hidden_size=i["hidden_size"], vocab_size=i["vocab_size"],
                         dtype=i["dtype"], device=i["device"], tensor_parallel_size=self.tensor_parallel_size)

    # -- generation --------------------------------------------------------------------------------
    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationOutput]:
        from vllm import SamplingParams

        info = self.info()
        steer_keys: dict[str, Any] = {}
        plan_keys: list[str | None] = []
        probes: list[str | None] = []
        for r in requests:
            key = None
            if r.steering is not None and not r.steering.is_empty():
                bad = [i for i in r.steering.pushes if not 0 <= i < info.n_layers]
                if bad:
                    raise BackendError(f"steering layers {bad} out of range: the model has {info.n_layers} decoder layers")
                key = steering_key(r.steering.pushes, r.steering.positions)
                steer_keys[key] = r.steering
            plan_keys.append(key)
            if r.probe is not None:
                r.probe.check(info.n_layers, info.hidden_size)
                pid = probe_id(r.probe)
                if pid not in self._probes:
                    self.llm.collective_rpc("amygdala_set_probe", args=(pid, dict(r.probe.weight), dict(r.probe.bias)))
                    self._probes.add(pid)
                probes.append(pid)
            else:
                probes.append(None)
        vreqs = [build_request(r, weights_version=self.weights_version, steer=k, probe=p)
                 for r, k, p in zip(requests, plan_keys, probes)]
        keys = [v.read_key for v in vreqs if v.read_key]
        collected: dict[str, dict] | None = None
        try:
            for key, plan in steer_keys.items():
                self.llm.collective_rpc("amygdala_set_steering",
                                        args=(key, {i: v.cpu() for i, v in plan.pushes.items()}, plan.positions))
            outs = self.llm.generate([v.prompt for v in vreqs], [_sampling_params(SamplingParams, v.params) for v in vreqs],
                                     use_tqdm=False)
            collected = merge_collected(self.llm.collective_rpc("amygdala_collect", args=(keys,))) if keys else {}
        finally:
            if steer_keys:
                self.llm.collective_rpc("amygdala_clear_steering", args=(sorted(steer_keys),))
            if keys and collected is None:
                self.llm.collective_rpc("amygdala_discard", args=(keys,))
        results = []
        for r, v, o in zip(requests, vreqs, outs):
            c = o.outputs[0]
            lps = [float(step[t].logprob) for step, t in zip(c.logprobs or [], c.token_ids)] if c.logprobs else []
            results.append(assemble_output(r, v, c.token_ids, lps, c.finish_reason or "length",
                                           collected.get(v.read_key) if v.read_key else None,
                                           lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True),
                                           self.stop_ids))
        return results

    # -- residuals ---------------------------------------------------------------------------------
    def capture(self, seqs: Sequence[Sequence[int]], layers: Sequence[int]) -> list[dict[int, torch.Tensor]]:
        probe = Probe.raw(layers)
        outs = self.generate([GenerationRequest(list(s), Sampling(max_new_tokens=0), probe=probe) for s in seqs])
        return [o.projections or {} for o in outs]

    def capture_pooled(self, seqs: Sequence[Sequence[int]], layers: Sequence[int], pooling: Pooling) -> dict[int, torch.Tensor]:
        per = self.capture(seqs, layers)
        out = {}
        for i in layers:
            out[i] = torch.stack([pool(p[i].unsqueeze(0), torch.ones(1, p[i].shape[0], dtype=torch.long), pooling)[0]
                                  for p in per]) if per else torch.empty(0, self.info().hidden_size)
        return out

    # -- weights -----------------------------------------------------------------------------------
    def weight_names(self) -> list[str]:
        if self._names is None:
            self._names = self.llm.collective_rpc("amygdala_weight_names")[0]
        return list(self._names)

    def read_weights(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        check_names(list(names), self.weight_names())
        return self.llm.collective_rpc("amygdala_read_weights", args=(list(names),))[0]

    def write_weights(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """In place through load_weights on every worker; then a new cache salt and a prefix-cache reset."""
        check_names(list(tensors), self.weight_names())
        versions = self.llm.collective_rpc("amygdala_load_weights", args=([(n, t.cpu()) for n, t in tensors.items()],))
        # every later request gets a new salt: no block computed with the old weights is reused
        self.weights_version = max([self.weights_version + 1, *versions])
        self.llm.reset_prefix_cache()

    def weights_sha256(self) -> str:
        return self.llm.collective_rpc("amygdala_weights_sha256")[0]

    def close(self) -> None:
        llm, self.llm = self.llm, None
        del llm
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
