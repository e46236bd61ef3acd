"""Which weights a training job may change: module name patterns and a decoder-layer range.

Why: the whole body is ~100M parameters of the embedded model; a correction about how the model
attends to its context may only need the mid-late attention projections (the original design's
"core circuit"). Training fewer tensors means less optimizer state, less forgetting of everything
else, and a smaller checkpoint sync (only written tensors are compared and journaled).

Patterns are fnmatch globs over module names. Inside a decoder layer a module is named relative to
the layer (`self_attn.q_proj`, `mlp.down_proj`, `input_layernorm`), and a pattern also matches the
last parts of the name (`q_proj` matches `self_attn.q_proj`; `mlp.*` every MLP projection). Modules
outside the layers (the final norm) are named by their full path (`model.norm`) and are trained
only when a pattern names them. The embeddings stay frozen unless `train_embeddings` is set.
Anything that matches nothing is refused with the list of valid names, so a typo never silently
trains nothing (or everything).
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from amygdala.engine.model import find_layers
from torch import nn

from .schemas import InvalidTargets, TrainTargets


def _module_of(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0] if "." in param_name else ""


def _layer_split(param_name: str, layers_path: str) -> tuple[int, str] | None:
    """(layer index, module name inside the layer) for a parameter of a decoder layer, else None."""
    prefix = layers_path + "."
    if not param_name.startswith(prefix):
        return None
    index, _, rest = param_name[len(prefix):].partition(".")
    if not index.isdigit():
        return None
    return int(index), _module_of(rest)


def _matches(name: str, pattern: str) -> bool:
    return fnmatchcase(name, pattern) or fnmatchcase(name, "*." + pattern)


def valid_module_names(model: nn.Module, exclude: set[int] | None = None) -> tuple[list[str], list[str], int]:
    """(module names inside a decoder layer, module paths outside the layers, number of layers)."""
    layers_path, layers = find_layers(model)
    inner: set[str] = set()
    outer: set[str] = set()
    for name, p in model.named_parameters():
        if exclude and id(p) in exclude:
            continue
        split = _layer_split(name, layers_path)
        if split is None:
            outer.add(_module_of(name))
        else:
            inner.add(split[1])
    return sorted(inner), sorted(outer), len(layers)


def _refuse(model: nn.Module, exclude: set[int], what: str) -> InvalidTargets:
    inner, outer, n = valid_module_names(model, exclude)
    return InvalidTargets(f"{what}. Valid module names inside each of the {n} decoder layers (0-{n - 1}): "
                          f"{', '.join(inner)}; outside the layers: {', '.join(outer) or 'none'}")


def select(model: nn.Module, named: list[tuple[str, nn.Parameter]], targets: TrainTargets | None,
           exclude: set[int] | None = None, where: str = "targets") -> list[tuple[str, nn.Parameter]]:
    """The (name, parameter) pairs of `named` that `targets` selects (all of them for None), in order.

    `exclude`: ids of parameters not offered (the frozen embeddings), left out of the valid-name list.
    Raises InvalidTargets naming the pattern or range that selects nothing, with the valid names.
    """
    if targets is None:
        return list(named)
    exclude = exclude or set()
    layers_path, layers = find_layers(model)
    n_layers = len(layers)
    if targets.layers is not None:
        first, last = targets.layers
        if last >= n_layers:
            raise _refuse(model, exclude, f"{where}.layers [{first}, {last}] is out of range: the model has "
                                          f"{n_layers} decoder layers, numbered 0-{n_layers - 1}")
    hits = [0] * len(targets.modules)
    out = []
    for name, p in named:
        split = _layer_split(name, layers_path)
        if split is None:
            module = _module_of(name)
            picked = [i for i, pat in enumerate(targets.modules) if fnmatchcase(module, pat)]
        else:
            index, module = split
            if targets.layers is not None and not targets.layers[0] <= index <= targets.layers[1]:
                continue
            picked = ([i for i, pat in enumerate(targets.modules) if _matches(module, pat)] if targets.modules
                      else [-1])
        for i in picked:
            if i >= 0:
                hits[i] += 1
        if picked:
            out.append((name, p))
    for i, count in enumerate(hits):
        if not count:
            span = "" if targets.layers is None else f" in layers {targets.layers[0]}-{targets.layers[1]}"
            raise _refuse(model, exclude, f"{where}.modules[{i}] = {targets.modules[i]!r} matches no trainable "
                                          f"module{span}")
    if not out:
        raise _refuse(model, exclude, f"{where} select no trainable parameter")
    return out
