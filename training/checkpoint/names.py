"""Live parameter names -> checkpoint tensor names, per serving backend: re-exported from engine.

The table moved to `amygdala.engine.param_names` so the vLLM backend (in engine, which may not
import training) uses the very same one; see that module for the mapping and its rules.
"""

from __future__ import annotations

from amygdala.engine.param_names import (NAME_TABLES, VLLM_PACKED, NameScheme, PackedModule, pack, packed_name,
                                         to_file_names, unpacked_names)

__all__ = ["NAME_TABLES", "VLLM_PACKED", "NameScheme", "PackedModule", "pack", "packed_name", "to_file_names",
           "unpacked_names"]
