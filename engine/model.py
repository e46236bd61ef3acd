"""Loading a causal LM once and finding its decoder layers, whatever the architecture.

Everything downstream (readout, steering, training) addresses the residual stream by decoder-layer
index, so the one architecture-specific question, "where is the list of decoder layers?", is
answered here and nowhere else.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .config import Config

log = logging.getLogger(__name__)

# Known layouts first (fast and unambiguous); a structural search is the fallback.
LAYER_PATHS = (
    "model.layers",  # Llama, Gemma, Qwen, Mistral, Phi-3
    "model.language_model.layers",  # multimodal wrappers (Gemma 3 4B+, Llava)
    "model.model.layers",
    "transformer.h",  # GPT-2, GPT-J, Falcon
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT
    "transformer.blocks",  # MPT
    "transformer.layers",
)


class ModelError(ValueError):
    """A model path or architecture problem, with a message saying how to fix it."""


def _get_path(obj: object, path: str) -> object | None:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(attribute path, decoder layers) of a HuggingFace causal LM."""
    n_cfg = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for path in LAYER_PATHS:
        layers = _get_path(model, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return path, layers
    candidates = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if n_cfg is not None:
        candidates = [(n, m) for n, m in candidates if len(m) == n_cfg] or candidates
    if not candidates:
        raise ModelError(f"cannot find the decoder layers of {type(model).__name__}: no nn.ModuleList found; "
                         "add its attribute path to engine.model.LAYER_PATHS")
    name, layers = max(candidates, key=lambda c: len(c[1]))
    log.info("decoder layers found by structural search at %s", name)
    return name, layers


def find_body(model: nn.Module) -> nn.Module:
    """The transformer body without the LM head (used to skip the head when only activations are needed)."""
    body = getattr(model, "base_model", None)
    if isinstance(body, nn.Module) and body is not model:
        return body
    for attr in ("model", "transformer", "gpt_neox"):
        m = getattr(model, attr, None)
        if isinstance(m, nn.Module):
            return m
    return model


@dataclass
class LoadedModel:
    """A model and tokenizer loaded once, plus what every caller needs to know about them.

    `lock` serialises forward passes: hooks are registered on shared modules, so two threads
    running forwards at once would see each other's hooks. Every engine entry point takes it.
    """

    model: nn.Module
    tokenizer: object
    name: str
    path: Path | None
    layers: nn.ModuleList
    layers_path: str
    body: nn.Module
    lock: threading.RLock = field(default_factory=threading.RLock)
    _weights_hash: str | None = field(default=None, repr=False)

    @classmethod
    def from_objects(cls, model: nn.Module, tokenizer: object, name: str = "in-memory", path: Path | None = None) -> "LoadedModel":
        model.eval()
        layers_path, layers = find_layers(model)
        if getattr(tokenizer, "pad_token_id", None) is None:
            tokenizer.pad_token = tokenizer.eos_token
        return cls(model=model, tokenizer=tokenizer, name=name, path=path, layers=layers,
                   layers_path=layers_path, body=find_body(model))

    # -- facts -------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd"))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[0])

    def describe_layer(self, index: int) -> str:
        """`layer 12 (67%)`: the relative depth is what transfers between models of different size."""
        return f"layer {index} ({round(100 * index / self.n_layers)}%)"

    def check_layers(self, layers: list[int] | None) -> list[int]:
        """Validated, sorted, de-duplicated layer indices; None means all layers."""
        if layers is None:
            return list(range(self.n_layers))
        bad = [i for i in layers if not 0 <= int(i) < self.n_layers]
        if bad:
            raise ModelError(f"layer(s) {bad} out of range: {self.name} has {self.n_layers} decoder layers, valid indices 0-{self.n_layers - 1}")
        if not layers:
            raise ModelError(f"no layers given; pass indices in 0-{self.n_layers - 1}")
        return sorted({int(i) for i in layers})

    def weights_hash(self, refresh: bool = False) -> str:
        """sha256 over parameter names and bytes, first 16 hex digits: identifies the weights a readout was trained on."""
        return self.weights_sha256(refresh)[:16]

    def weights_sha256(self, refresh: bool = False) -> str:
        """The full sha256 behind weights_hash (certificates record all of it); cached until invalidated."""
        if self._weights_hash is None or refresh:
            h = hashlib.sha256()
            with torch.no_grad():
                for name, p in sorted(self.model.state_dict().items()):
                    h.update(name.encode())
                    t = p.detach().contiguous().cpu()
                    h.update(memoryview(t.view(torch.uint8).numpy()) if t.numel() else b"")
            self._weights_hash = h.hexdigest()
        return self._weights_hash

    def invalidate_weights_hash(self) -> None:
        """Call after the weights changed in place (training), so the next weights_hash() recomputes."""
        self._weights_hash = None

    def info(self) -> dict:
        return {
            "name": self.name,
            "path": str(self.path) if self.path else None,
            "architecture": type(self.model).__name__,
            "layers": self.n_layers,
            "layers_path": self.layers_path,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
        }


def resolve_model_path(config: Config, echo=print) -> Path:
    if config.is_embedded:
        from .embedded import ensure_embedded_model

        return ensure_embedded_model(config.models_dir, echo=echo)
    path = Path(config.model).expanduser()
    if not path.exists():
        raise ModelError(f"--model {config.model}: no such directory. Pass a local HuggingFace causal-LM directory "
                         "(config.json + *.safetensors + tokenizer files) or omit --model to use the embedded Gemma 3 270M.")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ModelError(f"--model {config.model}: not a HuggingFace model directory (no config.json). Point it at the "
                         "folder that holds config.json, e.g. the output of save_pretrained(), or omit --model for the embedded model.")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ModelError(f"--model {config.model}: no weights (*.safetensors) in {path}")
    return path


def replay_journal(path: Path, echo=print) -> None:
    """Finish an interrupted checkpoint sync or rollback of `path` before its weights are read.

    Every loader comes through load_model, so the CLI commands, the notebook API and the daemon
    all see the journal's new weights, never a half-written file; one that cannot be replayed
    (read-only directory, files replaced since) stops the load with the reason (ModelError).
    """
    from .checkpoint_journal import SyncError, replay_before_load

    try:
        report = replay_before_load(path)
    except SyncError as exc:
        raise ModelError(str(exc)) from None
    if report.status != "clean":
        what = {"restored": "undid an unfinished checkpoint sync (the files are as before it)",
                "discarded": "discarded a torn checkpoint journal (the files were untouched)"}.get(
                    report.status, f"{report.status} an unfinished checkpoint journal")
        echo(f"amygdala: {what} in {path} before loading ({report.detail})")


def load_model(config: Config, echo=print) -> LoadedModel:
    """Load model and tokenizer once, on config.device in config.dtype, in eval mode, no grads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if config.threads:
        torch.set_num_threads(config.threads)
    path = resolve_model_path(config, echo=echo)
    replay_journal(path, echo=echo)
    t0 = time.perf_counter()
    dtype = getattr(torch, config.dtype)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a 3 s reload needs no bar; conversion keeps its own
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModelError(f"could not load {path} as a causal LM: {exc}") from exc
    finally:
        hf_logging.enable_progress_bar()
    model.to(config.device)
    model.requires_grad_(False)
    name = "gemma-3-270m (embedded)" if config.is_embedded else path.name
    lm = LoadedModel.from_objects(model, tokenizer, name=name, path=path)
    log.info("loaded %s in %.1f s", name, time.perf_counter() - t0)
    return lm
