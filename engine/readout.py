"""Emotion readout: files on disk, validation on load, and scoring.

Score formula, per layer l and concept c, for a pooled residual x (see Pooling):

    u      = (x - center_l) / scale_l          (scale_l = 1 when the readout is not standardised)
    s_c    = u . v_{l,c}                       (v = unit readout vector, `layer_<l>.vectors`)
    z_c    = (s_c - score_mean_{l,c}) / score_std_{l,c}

score_mean and score_std are the statistics of s_c over the training corpus, so z is "standard
deviations above this concept's corpus average": comparable across concepts, layers and texts.
The readout's headline score is the mean of z over the default layers (chosen by validation).

At decode time a mean-pooled readout reads a running window of the most recent `window` token
residuals (default 64, about half a corpus story), so a score during generation means what it
meant in training: the mean state over a stretch of text, not one token's noise.

Length calibration: a mean over 8 tokens varies far more than a mean over a 140-token story, so
with one set of statistics a one-line text would score 12 where a paragraph scores 5. Readouts
built by amygdala also store the statistics for means over m = 4, 8, 16, 32, 64 tokens (measured
on corpus prefixes) next to the full-text ones, and `score_mean`/`score_std` are interpolated in
log(m) for the number of tokens actually pooled.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from pydantic import BaseModel, ConfigDict, Field

from .activations import Pooling, multi_pooled_activations, token_activations

if TYPE_CHECKING:
    from .model import LoadedModel

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
TENSORS_FILE = "readout.safetensors"
MANIFEST_FILE = "readout.json"
PER_LAYER = ("vectors", "directions", "center", "scale", "score_mean", "score_std", "residual_norm")
CALIBRATION = ("calib_tokens", "calib_mean", "calib_std")  # optional: length-calibrated statistics
PROBE = "probe"  # optional, default layers only: pooled residuals of the drift probe texts at fit time
HALF_OK = ("vectors", "directions")  # the only tensors that may be stored as float16 (see ReadoutManifest.storage)
DEFAULT_WINDOW = 64


class ReadoutError(ValueError):
    """A readout file that does not fit the model or itself; the message says what to do."""


class UnknownConcept(ReadoutError, KeyError):
    """A concept name the readout does not know (a KeyError too, for lookups)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ModelRef(BaseModel):
    name: str
    weights_hash: str
    n_layers: int


class ReadoutManifest(BaseModel):
    """`readout.json`: everything needed to interpret `readout.safetensors`."""

    model_config = ConfigDict(extra="allow")

    format_version: int = FORMAT_VERSION
    concepts: list[str]
    families: list[str] = Field(description="family of each concept, same order as concepts")
    layers: list[int]
    hidden_size: int
    dtype: str = "float32"
    model: ModelRef
    pooling: str
    standardize: bool
    pca_share: float = 0.0
    whiten: float = 0.0
    window: int = DEFAULT_WINDOW
    default_layers: list[int]
    corpus_hash: str = ""
    created: float = Field(default_factory=time.time)
    validation: dict = Field(default_factory=dict)
    storage: dict[str, str] = Field(default_factory=dict, description=(
        "tensor name -> on-disk dtype where it is not float32 ('float16' for vectors/directions of a shipped "
        "readout); loaded as float32"))
    drift_probe: list[list[int]] = Field(default_factory=list, description=(
        "token ids of the neutral probe texts whose pooled residuals at fit time are stored as layer_<l>.probe; "
        "re-reading them shows how far the served weights drifted from these"))


@dataclass
class LayerReadout:
    vectors: torch.Tensor  # (C, H) unit rows, readout space
    directions: torch.Tensor  # (C, H) unit rows, raw residual space (steering, GGUF export)
    center: torch.Tensor  # (H,)
    scale: torch.Tensor  # (H,)
    score_mean: torch.Tensor  # (C,)
    score_std: torch.Tensor  # (C,)
    residual_norm: torch.Tensor  # () typical token residual norm at this layer
    calib_tokens: torch.Tensor | None = None  # (K,) ascending pooled-token counts, last = full texts
    calib_mean: torch.Tensor | None = None  # (K, C) score mean when that many tokens are pooled
    calib_std: torch.Tensor | None = None  # (K, C)
    probe: torch.Tensor | None = None  # (P, H) drift-probe pooled residuals at fit time (default layers)

    def scores_raw(self, x: torch.Tensor) -> torch.Tensor:
        """(..., H) pooled residuals -> (..., C) projections before normalisation (s in the formula)."""
        return ((x.float() - self.center) / self.scale) @ self.vectors.T

    def scores(self, x: torch.Tensor, pooled_tokens: torch.Tensor | int | None = None) -> torch.Tensor:
        """(..., H) pooled residuals -> (..., C) z-scores; pooled_tokens selects length-calibrated stats."""
        s = self.scores_raw(x)
        if pooled_tokens is None or self.calib_tokens is None:
            return (s - self.score_mean) / self.score_std
        mean, std = self.stats_at(pooled_tokens, s.shape[:-1])
        return (s - mean) / std

    def stats_at(self, pooled_tokens: torch.Tensor | int, batch_shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        """Score mean and std interpolated in log(pooled tokens) between the calibration knots."""
        knots = torch.log(self.calib_tokens.float())
        m = torch.as_tensor(pooled_tokens, dtype=torch.float32).expand(batch_shape) if batch_shape else \
            torch.as_tensor(pooled_tokens, dtype=torch.float32)
        lm = torch.log(m.clamp(min=1.0)).clamp(float(knots[0]), float(knots[-1]))
        hi = torch.searchsorted(knots, lm.contiguous()).clamp(1, len(knots) - 1)
        lo = hi - 1
        w = ((lm - knots[lo]) / (knots[hi] - knots[lo])).unsqueeze(-1)
        mean = self.calib_mean[lo] * (1 - w) + self.calib_mean[hi] * w
        std = self.calib_std[lo] * (1 - w) + self.calib_std[hi] * w
        return mean, std


@dataclass
class TextScores:
    """Scores of one text: z per concept per layer, and their mean over the layers read."""

    per_layer: dict[int, torch.Tensor]  # layer -> (C,)
    combined: torch.Tensor  # (C,)


class ReadoutManager:
    """Loads a readout, checks it against the model, and scores text with it."""

    def __init__(self, manifest: ReadoutManifest, layers: dict[int, LayerReadout], lm: "LoadedModel | None" = None,
                 max_tokens: int = 2048, truncation: str = "error"):
        self.manifest = manifest
        self.layers = layers
        self.lm = lm
        self.max_tokens = max_tokens
        self.truncation = truncation
        self._index = {c: i for i, c in enumerate(manifest.concepts)}
        _check_consistent(manifest, layers, where="readout")

    # -- identity ----------------------------------------------------------------------------
    @property
    def concepts(self) -> list[str]:
        return self.manifest.concepts

    @property
    def pooling(self) -> Pooling:
        return Pooling.parse(self.manifest.pooling)

    @property
    def default_layers(self) -> list[int]:
        return list(self.manifest.default_layers)

    def concept_index(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            close = [c for c in self.concepts if name.lower()[:4] in c][:8]
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise UnknownConcept(f"unknown concept {name!r}; valid concepts are the {len(self.concepts)} names from "
                           f"list_concepts / `amygdala vectors list`.{hint}") from None

    def family_of(self, concept: str) -> str:
        return self.manifest.families[self.concept_index(concept)]

    def check_layers(self, layers: list[int] | None) -> list[int]:
        if layers is None:
            return self.default_layers
        if not layers:
            raise ReadoutError(f"no layers given; the readout has layers {self.manifest.layers}")
        bad = [i for i in layers if i not in self.layers]
        if bad:
            raise ReadoutError(f"layer(s) {bad} not in this readout; available layers: {self.manifest.layers} "
                             f"(default {self.default_layers})")
        return sorted(set(layers))

    # -- files -------------------------------------------------------------------------------
    def save(self, directory: Path, half: tuple[str, ...] = ()) -> Path:
        """Write readout.safetensors + readout.json atomically (temp files, fsync, rename).

        `half` names tensors (of HALF_OK) stored as float16, recorded in the manifest's `storage`;
        they load as float32. Statistics always stay float32: z-scores divide by them.
        """
        from safetensors.torch import save_file

        from amygdala.fsio import atomic_write, replace_durably

        bad = sorted(set(half) - set(HALF_OK))
        if bad:
            raise ValueError(f"only {HALF_OK} may be stored as float16, not {bad}")
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for i, lr in self.layers.items():
            for name in PER_LAYER + CALIBRATION + (PROBE,):
                t = getattr(lr, name)
                if t is not None:
                    dtype = torch.float16 if name in half else torch.float32
                    tensors[f"layer_{i}.{name}"] = t.detach().to(dtype).contiguous()
        manifest = self.manifest.model_copy(update={"storage": {n: "float16" for n in sorted(set(half))}})
        tmp = directory / (TENSORS_FILE + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "amygdala-readout", "version": str(FORMAT_VERSION)})
        replace_durably(tmp, directory / TENSORS_FILE)
        atomic_write(directory / MANIFEST_FILE, manifest.model_dump_json(indent=2).encode())
        return directory

    @classmethod
    def from_file(cls, path: Path | str, model: "LoadedModel | None" = None, max_tokens: int = 2048,
                  truncation: str = "error") -> "ReadoutManager":
        """Load a readout directory (or its readout.json / readout.safetensors) and validate it.

        Refuses, with a message naming the mismatch: hidden size, layer indices, concept count or
        dtype that disagree with the model or between the two files, and any NaN/inf.
        """
        from safetensors import safe_open

        path = Path(path)
        directory = path.parent if path.is_file() or path.suffix in (".json", ".safetensors") else path
        mpath, tpath = directory / MANIFEST_FILE, directory / TENSORS_FILE
        for p in (mpath, tpath):
            if not p.is_file():
                raise ReadoutError(f"{p} not found; train one with `amygdala vectors train` or pass the directory "
                                   f"that holds {MANIFEST_FILE} and {TENSORS_FILE}")
        try:
            manifest = ReadoutManifest.model_validate_json(mpath.read_text())
        except ValueError as exc:
            raise ReadoutError(f"{mpath}: invalid manifest: {exc}") from None
        if manifest.format_version != FORMAT_VERSION:
            raise ReadoutError(f"{mpath}: format version {manifest.format_version}, this amygdala reads {FORMAT_VERSION}; retrain the readout")
        if manifest.dtype != "float32":
            raise ReadoutError(f"{mpath}: dtype {manifest.dtype!r} not supported (float32 only)")
        odd = {n: d for n, d in manifest.storage.items() if n not in HALF_OK or d not in ("float16", "float32")}
        if odd:
            raise ReadoutError(f"{mpath}: storage {odd} not supported; only {HALF_OK} may be stored as float16")
        layers: dict[int, LayerReadout] = {}
        try:
            with safe_open(str(tpath), framework="pt") as fh:
                keys = set(fh.keys())
                for i in manifest.layers:
                    missing = [f"layer_{i}.{n}" for n in PER_LAYER if f"layer_{i}.{n}" not in keys]
                    if missing:
                        raise ReadoutError(f"{tpath}: missing tensors {missing} for layer {i} listed in {MANIFEST_FILE}")
                    parts = {n: fh.get_tensor(f"layer_{i}.{n}") for n in PER_LAYER}
                    calib = [f"layer_{i}.{n}" in keys for n in CALIBRATION]
                    if any(calib) and not all(calib):
                        raise ReadoutError(f"{tpath}: layer {i} has only part of the length calibration {CALIBRATION}")
                    if all(calib):
                        parts.update({n: fh.get_tensor(f"layer_{i}.{n}") for n in CALIBRATION})
                    if f"layer_{i}.{PROBE}" in keys:
                        parts[PROBE] = fh.get_tensor(f"layer_{i}.{PROBE}")
                    for n, t in parts.items():
                        want = manifest.storage.get(n, "float32")
                        if t.dtype != getattr(torch, want):
                            raise ReadoutError(f"{tpath}: layer_{i}.{n} is {t.dtype}, manifest says {want}")
                        parts[n] = t.to(torch.float32)
                    layers[i] = LayerReadout(**parts)
                extra = sorted({k.split(".")[0] for k in keys} - {f"layer_{i}" for i in manifest.layers})
                if extra:
                    raise ReadoutError(f"{tpath}: tensors for {extra} not listed in {MANIFEST_FILE} layers {manifest.layers}")
        except ReadoutError:
            raise
        except Exception as exc:  # safetensors raises its own error types
            raise ReadoutError(f"{tpath}: unreadable ({exc}); retrain with `amygdala vectors train`") from None
        _check_consistent(manifest, layers, where=str(directory))
        if model is not None:
            if manifest.hidden_size != model.hidden_size:
                raise ReadoutError(f"{directory}: readout hidden size {manifest.hidden_size} != model {model.name} hidden size "
                                   f"{model.hidden_size}; this readout was trained for another model ({manifest.model.name})")
            bad = [i for i in manifest.layers if not 0 <= i < model.n_layers]
            if bad:
                raise ReadoutError(f"{directory}: readout layers {bad} do not exist in {model.name} ({model.n_layers} layers)")
            if manifest.model.name != model.name:
                log.warning("%s was trained on %s, now used with %s; retrain with `amygdala vectors train` if they differ",
                            directory, manifest.model.name, model.name)
        return cls(manifest, layers, lm=model, max_tokens=max_tokens, truncation=truncation)

    # -- scoring -----------------------------------------------------------------------------
    def _need_lm(self) -> "LoadedModel":
        if self.lm is None:
            raise RuntimeError("this ReadoutManager has no model; load it with ReadoutManager.from_file(path, model=lm)")
        return self.lm

    def encode(self, text: str) -> list[int]:
        from .tokens import encode

        return encode(self._need_lm().tokenizer, text, self.max_tokens, self.truncation)  # type: ignore[arg-type]

    def pooled_tokens(self, n_tokens: torch.Tensor | int) -> torch.Tensor | int:
        """How many token residuals the pooling averages for a text of n tokens (read, not decode)."""
        p = self.pooling
        if p.kind == "last":
            return 1 if isinstance(n_tokens, int) else torch.ones_like(n_tokens)
        if isinstance(n_tokens, int):
            return n_tokens - min(p.start, n_tokens // 2)
        return n_tokens - torch.minimum(torch.full_like(n_tokens, p.start), n_tokens // 2)

    def score_pooled(self, pooled: dict[int, torch.Tensor], layers: list[int],
                     n_tokens: torch.Tensor | None = None) -> list[TextScores]:
        """Scores from pooled residuals {layer: (N, H)}; n_tokens (N,) enables length calibration."""
        m = None if n_tokens is None else self.pooled_tokens(n_tokens)
        per_layer = {i: self.layers[i].scores(pooled[i], m) for i in layers}
        combined = torch.stack([per_layer[i] for i in layers]).mean(0)
        n = combined.shape[0]
        return [TextScores({i: per_layer[i][k] for i in layers}, combined[k]) for k in range(n)]

    def read(self, texts: list[str], layers: list[int] | None = None, progress: bool | str = False) -> list[TextScores]:
        """Scores at the pooled position of each text (one batched, body-only pass)."""
        return self.read_ids([self.encode(t) for t in texts], layers, progress)

    def read_ids(self, seqs: list[list[int]], layers: list[int] | None = None,
                 progress: bool | str = False) -> list[TextScores]:
        """`read` for already-encoded texts (callers that also need the token counts encode once)."""
        lm = self._need_lm()
        layers = self.check_layers(layers)
        res = multi_pooled_activations(lm, seqs, layers, [self.pooling], progress=progress)
        return self.score_pooled(res.pooled[self.pooling], layers, torch.tensor([len(q) for q in seqs]))

    def read_tokens(self, text: str, layers: list[int] | None = None) -> tuple[list[str], torch.Tensor]:
        """(token strings, (T, C) scores) where row t is the readout of the text up to token t.

        BOS is left out: the text up to BOS is no text, and BOS's residual is an outlier that
        scored 17-26 on every concept. Its residual still runs through the model, as always.
        """
        lm = self._need_lm()
        layers = self.check_layers(layers)
        seq = self.encode(text)
        acts = token_activations(lm, seq, layers)
        tokens = [lm.tokenizer.decode([t]) for t in seq]
        scores = self.score_windowed(acts, layers)
        bos = getattr(lm.tokenizer, "bos_token_id", None)
        if bos is not None and seq and seq[0] == bos:
            return tokens[1:], scores[1:]
        return tokens, scores

    def score_windowed(self, acts: dict[int, torch.Tensor], layers: list[int]) -> torch.Tensor:
        """(T, C) scores of each prefix from per-token residuals {layer: (T, H)}, as decoding sees them."""
        n = torch.arange(1, next(iter(acts.values())).shape[0] + 1)
        m = torch.ones_like(n) if self.pooling.kind == "last" else n - window_start(n, self.pooling.start, self.manifest.window)
        return torch.stack([self.layers[i].scores(self.windowed(acts[i]), m) for i in layers]).mean(0)

    def windowed(self, residuals: torch.Tensor) -> torch.Tensor:
        """(T, H) token residuals -> (T, H) pooled-as-in-training residuals ending at each token."""
        p = self.pooling
        if p.kind == "last":
            return residuals
        n = torch.arange(1, residuals.shape[0] + 1)  # tokens so far
        start = window_start(n, p.start, self.manifest.window)
        csum = torch.cumsum(torch.cat([torch.zeros(1, residuals.shape[1]), residuals]), 0)
        return (csum[n] - csum[start]) / (n - start).unsqueeze(1).float()

    def top(self, scores: torch.Tensor, k: int = 10) -> list[tuple[str, float]]:
        k = max(1, min(k, len(self.concepts)))
        vals, idx = torch.topk(scores, k)
        return [(self.concepts[i], float(v)) for v, i in zip(vals.tolist(), idx.tolist())]

    def decode_reader(self, layers: list[int] | None = None) -> "DecodeReader":
        return DecodeReader(self, self.check_layers(layers))


def window_start(n: torch.Tensor | int, start: int, window: int) -> torch.Tensor | int:
    """First token index pooled when reading the first n tokens during decoding.

    The pooling start of training (short texts: their second half, see Pooling), and at most the
    last `window` tokens.
    """
    if isinstance(n, int):
        return max(min(start, n // 2), n - window)
    return torch.maximum(torch.minimum(torch.full_like(n, start), n // 2), n - window)


class DecodeReader:
    """Readout at each decoded token, fed by engine.generation's on_residuals callback.

    Keeps, per layer, a running sum over the last `window` residuals (mean pooling) or only the
    latest residual (last-token pooling), so each decoded token costs one small matrix-vector
    product per layer, however long the text already is. Matches `ReadoutManager.windowed`.
    """

    def __init__(self, manager: ReadoutManager, layers: list[int]):
        from collections import deque

        self.manager = manager
        self.layers = layers
        p = manager.pooling
        self._start = p.start if p.kind == "mean" else None  # None: last-token pooling
        self._window = manager.manifest.window
        self._n = 0  # tokens seen
        self._buf: dict[int, deque] = {i: deque() for i in layers}  # (position, residual) in the window
        self._sum: dict[int, torch.Tensor] = {}
        self.scores: list[torch.Tensor] = []  # one (C,) per generated token

    def _advance(self, i: int, rows: torch.Tensor) -> None:
        buf = self._buf[i]
        for k in range(rows.shape[0]):
            pos = self._n + k
            buf.append((pos, rows[k]))
            self._sum[i] = rows[k].clone() if i not in self._sum else self._sum[i] + rows[k]
            first = pos if self._start is None else window_start(pos + 1, self._start, self._window)
            while buf[0][0] < first:
                self._sum[i] = self._sum[i] - buf.popleft()[1]

    def current(self, i: int) -> torch.Tensor:
        """The pooled residual of the text so far, exactly as `ReadoutManager.windowed` pools it."""
        return self._sum[i] / len(self._buf[i])

    def __call__(self, phase: str, residuals: dict[int, torch.Tensor]) -> None:
        for i in self.layers:
            self._advance(i, residuals[i])
        self._n += next(iter(residuals.values())).shape[0]
        if phase == "generate":
            per_layer = [self.manager.layers[i].scores(self.current(i), len(self._buf[i])) for i in self.layers]
            self.scores.append(torch.stack(per_layer).mean(0))


def _check_consistent(manifest: ReadoutManifest, layers: dict[int, LayerReadout], where: str) -> None:
    c, h = len(manifest.concepts), manifest.hidden_size
    if len(manifest.families) != c:
        raise ReadoutError(f"{where}: {len(manifest.families)} families for {c} concepts")
    if len(set(manifest.concepts)) != c:
        raise ReadoutError(f"{where}: duplicate concept names")
    if sorted(layers) != sorted(manifest.layers):
        raise ReadoutError(f"{where}: tensor layers {sorted(layers)} != manifest layers {manifest.layers}")
    if not set(manifest.default_layers) <= set(manifest.layers) or not manifest.default_layers:
        raise ReadoutError(f"{where}: default layers {manifest.default_layers} must be a non-empty subset of {manifest.layers}")
    shapes = {"vectors": (c, h), "directions": (c, h), "center": (h,), "scale": (h,), "score_mean": (c,),
              "score_std": (c,), "residual_norm": ()}
    for i, lr in layers.items():
        for name, shape in shapes.items():
            t = getattr(lr, name)
            if tuple(t.shape) != shape:
                raise ReadoutError(f"{where}: layer_{i}.{name} has shape {tuple(t.shape)}, expected {shape} "
                                   f"({c} concepts, hidden size {h})")
            if not torch.isfinite(t).all():
                raise ReadoutError(f"{where}: layer_{i}.{name} contains NaN or inf; retrain the readout")
        if (lr.score_std <= 0).any() or (lr.scale <= 0).any():
            raise ReadoutError(f"{where}: layer_{i} has non-positive scale or score_std")
        if lr.probe is not None and (lr.probe.ndim != 2 or lr.probe.shape[1] != h
                                     or lr.probe.shape[0] != len(manifest.drift_probe)):
            raise ReadoutError(f"{where}: layer_{i}.probe has shape {tuple(lr.probe.shape)}, expected "
                               f"({len(manifest.drift_probe)}, {h}) (one row per drift_probe text)")
        if lr.calib_tokens is not None:
            k = lr.calib_tokens.shape[0] if lr.calib_tokens.ndim == 1 else -1
            if k < 2 or tuple(lr.calib_mean.shape) != (k, c) or tuple(lr.calib_std.shape) != (k, c):
                raise ReadoutError(f"{where}: layer_{i} length calibration has inconsistent shapes")
            if not (torch.isfinite(lr.calib_mean).all() and torch.isfinite(lr.calib_std).all()) or (lr.calib_std <= 0).any():
                raise ReadoutError(f"{where}: layer_{i} length calibration contains NaN, inf or non-positive std")
            if not (lr.calib_tokens[1:] > lr.calib_tokens[:-1]).all() or lr.calib_tokens[0] < 1:
                raise ReadoutError(f"{where}: layer_{i} calib_tokens must be ascending counts >= 1")


def readout_dir(readouts_root: Path, lm: "LoadedModel") -> Path:
    """Where the readout for this model lives by default: one directory per model.

    Local models get a hash of their resolved path in the name, so two different `model/`
    directories never share (and silently misuse) one readout.
    """
    return readouts_root / readout_dir_name(lm.name, lm.path)


def readout_dir_name(name: str, path: Path | None) -> str:
    """The directory name of `readout_dir`, from the model's name and path alone (no model needed)."""
    import hashlib

    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name.split(" ")[0])
    if path is not None and "(embedded)" not in name:
        safe += "-" + hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:8]
    return safe


def expected_readout_dir(config) -> Path | None:
    """The default readout directory of config's model, found without loading the model.

    Lets slow commands check concept names before a multi-second model load; None when the model
    path does not exist (the load then reports that).
    """
    from .embedded import EMBEDDED_NAME

    if config.is_embedded:
        return config.readouts_dir / readout_dir_name("gemma-3-270m (embedded)", config.models_dir / EMBEDDED_NAME)
    path = Path(config.model).expanduser()
    if not path.is_dir():
        return None
    return config.readouts_dir / readout_dir_name(path.name, path)


def read_manifest(directory: Path | str) -> ReadoutManifest | None:
    """A readout directory's readout.json alone (no tensors, no model), or None when absent or unreadable."""
    path = Path(directory)
    path = path if path.suffix == ".json" else (path.parent if path.suffix == ".safetensors" else path) / MANIFEST_FILE
    try:
        return ReadoutManifest.model_validate_json(path.read_text())
    except (OSError, ValueError):
        return None


def load_readout(lm: "LoadedModel", config, readout_path: Path | None = None,
                 echo: Callable[[str], None] = print) -> "ReadoutManager":
    """An existing readout for `lm` (explicit path, else the model's default directory); never builds one.

    Building needs the corpus and the fitting code (`amygdala.training.vectors.build.ensure_readout`);
    callers above engine pass that instead when a missing readout should be built.
    """
    directory = Path(readout_path) if readout_path is not None else readout_dir(config.readouts_dir, lm)
    if readout_path is None and not (directory / MANIFEST_FILE).is_file():
        raise ReadoutError(f"no emotion readout for {lm.name} in {directory} yet; build it with `amygdala vectors train` "
                           "(or start `amygdala serve`, which builds it), or pass --readout DIR")
    return ReadoutManager.from_file(directory, model=lm, max_tokens=config.max_tokens, truncation=config.truncation)
