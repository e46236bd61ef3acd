"""Subprocess for the dream-loop kill tests: runs standalone cycles on the tiny model until SIGKILLed.

    python tests/dream_kill_worker.py HOME MODEL_DIR train
        one real cycle with many one-example steps (so the kill lands inside training)
    python tests/dream_kill_worker.py HOME MODEL_DIR graph
        dry-run cycles back to back, writing progress to the graph at every update (so the kill
        lands inside graph writes); prints "cycle done" after each
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amygdala.dream.evaluate import EvalSettings  # noqa: E402
from amygdala.dream.loop import DreamSettings  # noqa: E402
from amygdala.dream.standalone import run_standalone  # noqa: E402
from amygdala.engine.config import Config  # noqa: E402
from amygdala.training.schemas import TrainSettings  # noqa: E402

SETTINGS = DreamSettings(cases_per_invariant=6, template_cases=0, samples_per_case=4, max_new_tokens=6,
                         budget_steps=200, train_batch_size=1, train_chunks=1, progress_every_s=0,
                         eval=EvalSettings(held_out_templates=0, perplexity_texts=2, perplexity_max_tokens=32))


def main() -> None:
    home, model_dir, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    config = Config(home=home, model=model_dir, threads=1)
    train = TrainSettings(rank=8, lr=1e-3, progress=False, threads=1)
    if mode == "train":
        run_standalone(config, SETTINGS, seed=5, train_settings=train, echo=lambda s: None)
        print("finished", flush=True)
        return
    n = 0
    while True:
        run_standalone(config, SETTINGS, dry_run=True, seed=n, echo=lambda s: None)
        n += 1
        print("cycle done", flush=True)


if __name__ == "__main__":
    main()
