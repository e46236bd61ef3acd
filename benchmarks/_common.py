"""Helpers shared by the benchmark scripts (run them as `python benchmarks/<name>.py`)."""

from __future__ import annotations

import os
import platform
import time
from contextlib import contextmanager

import torch


def machine_line() -> str:
    return (f"machine: {platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, "
            f"threads {torch.get_num_threads()}")


@contextmanager
def timer(out: dict, key: str):
    t0 = time.perf_counter()
    yield
    out[key] = time.perf_counter() - t0


def load_embedded():
    from amygdala.engine.config import Config
    from amygdala.engine.model import load_model

    return load_model(Config.load())


def sample_texts(n: int) -> list[str]:
    """Corpus stories if present (the real workload), else generated filler of story length."""
    try:
        from amygdala.corpus import load_corpus

        texts = [t.text for t in load_corpus(strict=False).all_texts()]
    except Exception:
        texts = []
    if len(texts) < n:
        base = ("The kettle clicked off and she stood at the window a moment longer, counting the cars that "
                "passed below, thinking about the letter on the table and what it would mean to open it now.")
        texts += [f"{base} Variation {i}: " + " ".join(["and then the evening went on"] * (i % 7)) for i in range(n - len(texts))]
    return texts[:n]
