"""Steering vectors as files: llama.cpp / repeng GGUF control vectors and plain safetensors.

GGUF control vectors (the format repeng exports and llama.cpp's `--control-vector` reads) hold one
float32 tensor `direction.<layer>` per layer plus `controlvector.model_hint` and
`controlvector.layer_count`. `direction.N` is added to the output of 0-based decoder layer N, the
same indexing as ours. llama.cpp cannot steer layer 0's output, so exports skip it.

We export a concept's unit direction times the layer's typical residual norm: a llama.cpp strength
of s then pushes as hard as amygdala's alpha = s (see engine.steering for the unit).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ARCH = "controlvector"


@dataclass
class ControlVector:
    """Per-layer raw-space vectors; their norms are meaningful (strength 1 adds them as-is)."""

    directions: dict[int, torch.Tensor]
    model_hint: str = ""

    def validate(self, hidden_size: int | None = None, n_layers: int | None = None) -> None:
        if not self.directions:
            raise ValueError("control vector has no layers")
        for layer, v in self.directions.items():
            if v.ndim != 1:
                raise ValueError(f"direction for layer {layer} must be 1-D, has shape {tuple(v.shape)}")
            if hidden_size is not None and v.shape[0] != hidden_size:
                raise ValueError(f"direction for layer {layer} has size {v.shape[0]}, the model's hidden size is {hidden_size}")
            if n_layers is not None and not 0 <= layer < n_layers:
                raise ValueError(f"direction for layer {layer}: the model has layers 0-{n_layers - 1}")
            if not torch.isfinite(v).all():
                raise ValueError(f"direction for layer {layer} contains NaN or inf")


def write_gguf(cv: ControlVector, path: Path) -> Path:
    import gguf

    cv.validate()
    layers = sorted(i for i in cv.directions if i > 0)
    if not layers:
        raise ValueError("llama.cpp control vectors cannot steer layer 0; include at least one layer >= 1")
    w = gguf.GGUFWriter(str(path), ARCH)
    w.add_string(f"{ARCH}.model_hint", cv.model_hint or "unknown")
    w.add_uint32(f"{ARCH}.layer_count", len(layers))
    for i in layers:
        w.add_tensor(f"direction.{i}", cv.directions[i].detach().float().cpu().numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def read_gguf(path: Path) -> ControlVector:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:
        raise ValueError(f"{path}: not a readable GGUF file ({exc})") from None
    directions: dict[int, torch.Tensor] = {}
    for t in reader.tensors:
        if not t.name.startswith("direction."):
            continue
        try:
            layer = int(t.name.split(".", 1)[1])
        except ValueError:
            raise ValueError(f"{path}: tensor {t.name!r} is not direction.<layer>") from None
        directions[layer] = torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(-1))
    if not directions:
        raise ValueError(f"{path}: no direction.<layer> tensors; is this a control vector (repeng / llama.cpp)?")
    hint = ""
    field = reader.fields.get(f"{ARCH}.model_hint")
    if field is not None:
        hint = bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
    return ControlVector(directions, hint)


def write_safetensors(cv: ControlVector, path: Path) -> Path:
    from safetensors.torch import save_file

    cv.validate()
    save_file({f"direction.{i}": v.detach().float().contiguous() for i, v in cv.directions.items()}, str(path),
              metadata={"format": "amygdala-control-vector", "model_hint": cv.model_hint})
    return path


def read_safetensors(path: Path) -> ControlVector:
    from safetensors import safe_open

    directions: dict[int, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            for k in fh.keys():
                name = k.removeprefix("layer_").replace(".direction", "")
                if k.startswith("direction."):
                    name = k.split(".", 1)[1]
                if not name.isdigit():
                    raise ValueError(f"{path}: tensor {k!r} is not direction.<layer>")
                directions[int(name)] = fh.get_tensor(k).float().reshape(-1)
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None
    if not directions:
        raise ValueError(f"{path}: no direction.<layer> tensors")
    return ControlVector(directions, meta.get("model_hint", ""))


def read_vector_file(path: Path | str) -> ControlVector:
    """GGUF or safetensors control vector, by extension."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"vector file {path} not found")
    if path.suffix == ".gguf":
        return read_gguf(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    raise ValueError(f"{path}: unknown vector file type; use a .gguf control vector or a .safetensors file with direction.<layer> tensors")
