"""The transformers backend: `engine.backend.Backend` over the in-process `LoadedModel`.

A thin adapter: every operation is the engine's own function (activations, generation, steering
hooks), so this backend and the engine cannot disagree. Requests are generated one after the
other under the model's lock; on CPU, batching several decodes buys little and would change the
numerics the rest of the engine is tested against.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..activations import Pooling, pooled_activations, token_activations
from ..backend import (
    BackendError,
    BackendKind,
    GenerationOutput,
    GenerationRequest,
    ModelInfo,
    check_names,
)
from ..generation import DecodeState, generate
from ..model import LoadedModel


class TransformersBackend:
    kind: BackendKind = "transformers"

    def __init__(self, lm: LoadedModel):
        self.lm = lm

    def info(self) -> ModelInfo:
        lm = self.lm
        return ModelInfo(backend="transformers", name=lm.name, architecture=type(lm.model).__name__,
                         n_layers=lm.n_layers, hidden_size=lm.hidden_size, vocab_size=lm.vocab_size,
                         dtype=str(lm.dtype).removeprefix("torch."), device=str(lm.device))

    # -- residuals ---------------------------------------------------------------------------------
    def capture(self, seqs: Sequence[Sequence[int]], layers: Sequence[int]) -> list[dict[int, torch.Tensor]]:
        use = self.lm.check_layers(list(layers))
        return [token_activations(self.lm, list(s), use) for s in seqs]

    def capture_pooled(self, seqs: Sequence[Sequence[int]], layers: Sequence[int], pooling: Pooling) -> dict[int, torch.Tensor]:
        return pooled_activations(self.lm, [list(s) for s in seqs], self.lm.check_layers(list(layers)), pooling)

    # -- generation --------------------------------------------------------------------------------
    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationOutput]:
        return [self._one(r) for r in requests]

    def _one(self, req: GenerationRequest) -> GenerationOutput:
        lm = self.lm
        if req.probe is not None:
            req.probe.check(lm.n_layers, lm.hidden_size)
        if req.steering is not None:
            bad = [i for i in req.steering.pushes if not 0 <= i < lm.n_layers]
            if bad:
                raise BackendError(f"steering layers {bad} out of range: the model has {lm.n_layers} decoder layers")
        state = DecodeState()
        fns = req.steering.layer_fns(state) if req.steering is not None and not req.steering.is_empty() else {}
        rows: dict[int, list[torch.Tensor]] = {i: [] for i in (req.probe.layers if req.probe else [])}

        def observe(_phase: str, residuals: dict[int, torch.Tensor]) -> None:
            for i, r in residuals.items():
                rows[i].append(req.probe.apply(i, r))  # type: ignore[union-attr]

        s = req.sampling
        res = generate(lm, list(req.prompt_ids), max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                       top_p=s.top_p, top_k=s.top_k, seed=s.seed, layer_fns=fns, state=state,
                       capture_layers=req.probe.layers if req.probe else None,
                       on_residuals=observe if req.probe else None, read_last=s.read_last, stop_at_eos=s.stop_at_eos)
        proj = {i: torch.cat(r) for i, r in rows.items()} if req.probe else None
        return GenerationOutput(prompt_ids=res.prompt_ids, token_ids=res.token_ids, text=res.text,
                                finish_reason=res.finish_reason, logprobs=res.logprobs, projections=proj)

    # -- weights -----------------------------------------------------------------------------------
    def _params(self) -> dict[str, torch.Tensor]:
        # state_dict keeps tied aliases (lm_head.weight next to embed_tokens.weight), like the files do
        return dict(self.lm.model.state_dict(keep_vars=True))

    def weight_names(self) -> list[str]:
        return sorted(self._params())

    def read_weights(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        params = self._params()
        check_names(list(names), list(params))
        with self.lm.lock, torch.no_grad():
            return {n: params[n].detach().cpu().clone() for n in names}

    def write_weights(self, tensors: Mapping[str, torch.Tensor]) -> None:
        params = self._params()
        check_names(list(tensors), list(params))
        bad = [f"{n}: got {tuple(t.shape)}, the model has {tuple(params[n].shape)}"
               for n, t in tensors.items() if tuple(t.shape) != tuple(params[n].shape)]
        if bad:
            raise BackendError("weight shape mismatch (nothing written): " + "; ".join(bad[:5]))
        with self.lm.lock, torch.no_grad():
            for n, t in tensors.items():
                params[n].copy_(t.to(device=params[n].device, dtype=params[n].dtype))
        self.lm.invalidate_weights_hash()

    def close(self) -> None:
        """Nothing to release: the LoadedModel belongs to whoever loaded it."""
