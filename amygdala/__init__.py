"""amygdala: read an agent's emotional state from its residual stream, test steering, train corrections.

The package face. The folders of the repository are installed beneath it (`amygdala.engine`,
`amygdala.training`, `amygdala.memory_graph`, `amygdala.corpus`, `amygdala.dream`,
`amygdala.server`); the small API below is for notebooks and scripts:

    import amygdala
    am = amygdala.load()                       # the embedded Gemma 3 270M and its emotion readout
    am.read_emotions("Eleven days on this bug, and the tests finally pass.", top_k=5)
    am.steer("The meeting was moved to Thursday, and", {"joyful": 0.04}, temperature=0)
    graph = amygdala.open_memory_graph()       # the durable memory graph under AMYGDALA_HOME

Names are resolved lazily, so `import amygdala` stays cheap (no torch until a model is loaded).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

__all__ = ["ConceptReading", "Session", "__version__", "load", "open_memory_graph"]

if TYPE_CHECKING:
    from .api import ConceptReading, Session, load, open_memory_graph


def __getattr__(name: str) -> Any:
    if name in ("ConceptReading", "Session", "load", "open_memory_graph"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'amygdala' has no attribute {name!r}")
