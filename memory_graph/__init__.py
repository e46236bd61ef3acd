"""The memory graph: memories, corrections, invariants, scenarios and certificates in a networkx
MultiDiGraph that never loses an acknowledged write.

Standalone: imports nothing from the rest of amygdala, so the dream loop and the MCP server can
both build on it. Start with :class:`MemoryGraph` (store.py); the on-disk format is described in
journal.py and snapshot.py, the emotion tag-line format in tags.py.
"""

from .errors import (CorruptGraphError, IdempotencyConflictError, InvalidInputError, InvalidTransitionError,
                     LockTimeoutError, MalformedTagLinesError, MemoryGraphError, NodeNotFoundError, TornTailWarning)
from .extract import (EmotionExample, EmotionThreshold, ExtractionResult, OrpoTriplet, correction_triplets,
                      emotion_examples, extract_training_pairs)
from .models import (CORRECTION_STATUSES, CYCLE_OUTCOMES, EDGE_KINDS, EDGE_RULES, NODE_KINDS, STATUS_TRANSITIONS,
                     Certificate, Correction, CorrectionStatus, CycleOutcome, CyclePhase, DreamCycle, Edge, EdgeKind,
                     Invariant, JudgeSpec, Memory, Node, NodeKind,
                     Scenario, StatusChange)
from .repair import RepairReport, repair
from .sampling import ReplayConfig, ReplayItem, ReplayWeight, replay_weights, sample_for_replay
from .store import GraphStats, MemoryGraph, open_graph
from .tags import TagLineError, TagParse, format_tag_line, parse_emotion_scores, parse_tag_lines, strip_tag_lines

__all__ = [
    "CORRECTION_STATUSES", "CYCLE_OUTCOMES", "CycleOutcome", "CyclePhase", "DreamCycle", "EDGE_KINDS", "EDGE_RULES",
    "NODE_KINDS", "STATUS_TRANSITIONS",
    "Certificate", "Correction", "CorrectionStatus", "CorruptGraphError", "Edge", "EdgeKind", "EmotionExample",
    "EmotionThreshold", "ExtractionResult", "GraphStats", "IdempotencyConflictError", "InvalidInputError",
    "InvalidTransitionError", "Invariant", "JudgeSpec", "LockTimeoutError", "MalformedTagLinesError", "Memory",
    "MemoryGraph", "MemoryGraphError", "Node", "NodeKind", "NodeNotFoundError", "OrpoTriplet", "RepairReport",
    "ReplayConfig", "ReplayItem", "ReplayWeight", "Scenario", "StatusChange", "TagLineError", "TagParse",
    "TornTailWarning", "correction_triplets", "emotion_examples", "extract_training_pairs", "format_tag_line",
    "open_graph", "parse_emotion_scores", "parse_tag_lines", "repair", "replay_weights", "sample_for_replay",
    "strip_tag_lines",
]
