"""Subprocess for the checkpoint-sync crash tests: syncs a model directory and gets SIGKILLed.

    python tests/sync_crash_worker.py MODEL_DIR A.safetensors B.safetensors loop [MODE]
        print "ready", then sync MODEL_DIR to B, A, B, A, ... until killed from outside.
    python tests/sync_crash_worker.py MODEL_DIR A.safetensors B.safetensors event N [MODE]
        sync MODEL_DIR to B once, SIGKILLing itself at the N-th sync event (1-based);
        prints the sync's event names as a JSON list instead if it finishes first (N=0).
    MODE: the sync's journal mode, "redo" (default here: the tests written for it) or "undo" (the
    library's default); "undo0" is undo mode without an undo log (keep_undo=0).
    python tests/sync_crash_worker.py MODEL_DIR A.safetensors B.safetensors rollback N
        roll MODEL_DIR back to sync point 0 (through its undo log), killed at the N-th event likewise.
    python tests/sync_crash_worker.py MODEL_DIR A.safetensors B.safetensors rollback-loop
        print "ready", then sync to B and roll back to sync point 0, again and again, until killed.

Imports numpy, not torch, so that each of the many restarts is quick.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amygdala.training.checkpoint.sync import sync_checkpoint
from amygdala.training.checkpoint.undo import rollback
from safetensors.numpy import load_file


def main() -> None:
    model_dir, a_path, b_path, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    a, b = load_file(a_path), load_file(b_path)
    journal = sys.argv[6 if mode == "event" else 5] if len(sys.argv) > (6 if mode == "event" else 5) else "redo"
    kw = {"journal_mode": "undo" if journal.startswith("undo") else "redo", "keep_undo": 0 if journal == "undo0" else 4}
    if mode == "loop":
        sync_checkpoint(model_dir, a, dry_run=True)  # warm up (lazy imports) so kills land in real syncs
        print("ready", flush=True)
        while True:
            sync_checkpoint(model_dir, b, **kw)
            sync_checkpoint(model_dir, a, **kw)
    if mode == "rollback-loop":
        sync_checkpoint(model_dir, a, dry_run=True)
        print("ready", flush=True)
        while True:
            sync_checkpoint(model_dir, b)
            rollback(model_dir, 0)
    kill_at = int(sys.argv[5])
    events: list[str] = []

    def on_event(name: str) -> None:
        events.append(name)
        if len(events) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    if mode == "rollback":
        rollback(model_dir, 0, on_event=on_event)
    else:
        sync_checkpoint(model_dir, b, on_event=on_event, **kw)
    print(json.dumps(events), flush=True)


if __name__ == "__main__":
    main()
