"""Regenerate tests/data/subset_readout: the readout of two corpus families on the embedded model.

tests/test_shipped_readout_slow.py rebuilds it from scratch (about 2 minutes instead of the full
build's 10-25) and compares. Run this after re-shipping the full readout (`amygdala vectors train --ship`):

    OMP_NUM_THREADS=2 .venv/bin/python tests/data/make_subset_readout.py
"""

from __future__ import annotations

import shutil
from pathlib import Path

SUBSET_FAMILIES = ["disgust_contempt", "longing"]
OUT = Path(__file__).resolve().parent / "subset_readout"


def main() -> None:
    from amygdala.corpus import load_corpus
    from amygdala.engine.config import Config
    from amygdala.engine.model import load_model
    from amygdala.training.vectors.build import build_readout

    lm = load_model(Config.load())
    corpus = load_corpus().families_subset(SUBSET_FAMILIES)
    tmp = OUT.with_name(OUT.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    build_readout(lm, corpus, tmp, plots=False, cache_dir=None)
    shutil.rmtree(OUT, ignore_errors=True)
    tmp.rename(OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
