"""The emotion corpus: manifest, stories, paired scenarios, loader and checks.

Depends on nothing else in amygdala, so it can be used (and checked) without loading a model.
"""

from .checks import CorpusError, Violation, check_corpus
from .loader import Corpus, Scenario, Text, load_corpus
from .manifest import Emotion, Family, Manifest, load_manifest

__all__ = ["Corpus", "CorpusError", "Emotion", "Family", "Manifest", "Scenario", "Text", "Violation",
           "check_corpus", "load_corpus", "load_manifest"]
