"""Backends implementing `engine.backend.Backend`: transformers (in-process) and vLLM (plugin, GPU)."""
