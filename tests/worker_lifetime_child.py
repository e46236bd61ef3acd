"""Subprocess for the worker-lifetime kill test: a TrainingClient on the tiny model, mid-job, then killed.

    python tests/worker_lifetime_child.py HOME
        start a client and its worker, submit a long job, print {"worker": pid} once the job runs,
        then wait to be SIGKILLed from outside.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amygdala.engine.config import Config
from amygdala.engine.testing import tiny_model
from amygdala.training.client import TrainingClient
from amygdala.training.schemas import TrainExample, TrainJob, TrainSettings

CONTEXT = [2] + [(5 * i) % 250 + 4 for i in range(40)]
ORPO = TrainExample(context_ids=CONTEXT, continuation_ids=[100, 101, 102], rejected_ids=[150, 151], loss="orpo")


def main() -> None:
    client = TrainingClient(tiny_model(), Config.load(home=sys.argv[1]),
                            TrainSettings(rank=8, lr=1e-3, progress=False, threads=1))
    client.submit(TrainJob(examples=[ORPO], epochs=1000))  # minutes of work: still running when we are killed
    for _ in range(600):
        if client.status().current_job and (client.status().step or 0) >= 1:
            break
        time.sleep(0.1)
    print(json.dumps({"worker": client.pid, "version": client.weights_version}), flush=True)
    time.sleep(600)


if __name__ == "__main__":
    main()
