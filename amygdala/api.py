"""A small typed API for notebooks and scripts: load the model, read emotions, steer, open the graph.

The same engine the MCP server uses, without a server: `load()` returns a Session holding the
model and its emotion readout (built from the corpus on first use, as `amygdala serve` does).
Everything here runs in the calling thread; for many agents at once, run `amygdala serve`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from amygdala.engine.config import Config
    from amygdala.engine.model import LoadedModel
    from amygdala.engine.readout import ReadoutManager
    from amygdala.engine.steering_eval import SteeringComparison
    from amygdala.memory_graph import MemoryGraph


@dataclass(frozen=True)
class ConceptReading:
    concept: str
    family: str
    score: float  # z-score against the corpus: standard deviations above this concept's average


@dataclass
class Session:
    """A loaded model and its readout. Create it with `amygdala.load()`."""

    config: Config
    lm: LoadedModel
    readout: ReadoutManager

    def read_emotions(self, text: str, top_k: int = 10, layers: list[int] | None = None) -> list[ConceptReading]:
        """The concepts `text` evokes most, best first (averaged over the readout's default layers)."""
        scores = self.readout.read([text], layers=layers)[0].combined
        return [ConceptReading(c, self.readout.family_of(c), round(v, 4)) for c, v in self.readout.top(scores, top_k)]

    def scores(self, texts: list[str], layers: list[int] | None = None) -> dict[str, list[float]]:
        """Every concept's score for every text (one batched pass): {concept: [score per text]}."""
        rows = self.readout.read(texts, layers=layers)
        return {c: [float(r.combined[i]) for r in rows] for i, c in enumerate(self.readout.concepts)}

    def steer(self, prompt: str, concepts: dict[str, float], *, layers: list[int] | None = None,
              positions: str = "both", max_new_tokens: int = 48, seed: int | None = 0,
              temperature: float = 0.7) -> SteeringComparison:
        """Steered vs unsteered continuation of `prompt` (same seed), both re-read without steering.

        alpha is in units of the layer's typical residual norm: a few hundredths move this model.
        """
        from amygdala.engine.steering_eval import compare

        return compare(self.lm, self.readout, prompt, concepts, layers, positions, max_new_tokens, seed, temperature)

    def generate(self, prompt: str, max_new_tokens: int = 48, temperature: float = 0.0, seed: int | None = None) -> str:
        from amygdala.engine.generation import generate
        from amygdala.engine.tokens import encode

        ids = encode(self.lm.tokenizer, prompt, self.config.max_tokens, self.config.truncation, what="prompt")
        return generate(self.lm, ids, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed).text

    @property
    def concepts(self) -> list[str]:
        return list(self.readout.concepts)


def load(model: str | None = None, home: str | Path | None = None, readout: str | Path | None = None,
         threads: int | None = None) -> Session:
    """Load a model (default: the embedded Gemma 3 270M) and its emotion readout.

    `home` defaults to $AMYGDALA_HOME or ~/.local/share/amygdala; `model` is a local HuggingFace
    causal-LM directory; a missing readout is trained from the corpus once (minutes on a CPU).
    """
    from amygdala.engine.config import Config
    from amygdala.engine.model import load_model, resolve_model_path
    from amygdala.training.checkpoint.sync import recover
    from amygdala.training.vectors.build import ensure_readout

    config = Config.load(home=home, model=model, threads=threads)
    recover(resolve_model_path(config))  # an interrupted checkpoint sync is replayed before the weights are read
    lm = load_model(config)
    return Session(config=config, lm=lm, readout=ensure_readout(lm, config, Path(readout) if readout else None))


def open_memory_graph(home: str | Path | None = None, *, readonly: bool = False) -> MemoryGraph:
    """The memory graph under `home` (default $AMYGDALA_HOME): corrections, invariants, certificates.

    Only one process writes at a time; while the daemon runs, open it read-only.
    """
    from amygdala.engine.config import Config
    from amygdala.memory_graph import MemoryGraph

    return MemoryGraph(Config.load(home=home).memory_dir, readonly=readonly)
