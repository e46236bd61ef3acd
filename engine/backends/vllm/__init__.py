"""The vLLM backend: a plugin for vLLM's own server and engine, not a fork (install the [vllm] extra).

- `routing`: per-request steering and readout rows on the flattened token batch
- `prefix_cache`: cache salts and the skip-reading rule, so steered prefixes never leak
- `names`: HuggingFace names over vLLM's packed parameters (checkpoint sync's table)
- `worker`: the worker extension (hooks, steering, probes, weights) run by collective_rpc
- `plugin`: vLLM entry points (general plugin, endpoint plugin for /train and /checkpoint)
- `backend`: `VllmBackend`, the engine.backend.Backend over `vllm.LLM`
- `serve`: the install check and the `vllm serve` command line amygdala runs

Every module imports without vLLM installed; only `VllmBackend()` and `serve.run_server` need it.
"""

from .serve import INSTALL_HINT, VllmMissing, require_vllm, vllm_available

__all__ = ["INSTALL_HINT", "VllmMissing", "require_vllm", "vllm_available"]
