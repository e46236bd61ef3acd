"""Targets on the real embedded model (slow): ORPO moves the margin, not general perplexity; HOGWILD worker."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from amygdala.engine.activations import token_activations
from amygdala.engine.generation import sequence_logprobs
from amygdala.training.client import TrainingClient
from amygdala.training.schemas import TrainExample, TrainJob, TrainSettings
from amygdala.training.trainer import ContextFrozenTrainer

pytestmark = pytest.mark.slow

CONTEXT = "My cat knocked my coffee off the table this morning."
PREFERRED = " Oh no, I hope you are both okay."
REJECTED = " Serves you right, honestly."
HELD_OUT = ("The river runs through the valley for nearly forty miles before it reaches the sea. In spring, melting "
            "snow from the mountains swells its banks, and the farmers who work the fields along its course have "
            "learned to plant late. The town at its mouth grew up around a small harbour, where fishing boats still "
            "unload their catch each morning before the market opens. Visitors come in summer for the beaches and "
            "the old stone bridge, which has stood for more than three hundred years.")


def triplet(lm) -> TrainExample:
    tok = lm.tokenizer
    return TrainExample(context_ids=tok(CONTEXT)["input_ids"],
                        continuation_ids=tok(PREFERRED, add_special_tokens=False)["input_ids"],
                        rejected_ids=tok(REJECTED, add_special_tokens=False)["input_ids"], loss="orpo")


def margin(lm, ex: TrainExample) -> float:
    return float(sequence_logprobs(lm, ex.context_ids, ex.continuation_ids).mean()
                 - sequence_logprobs(lm, ex.context_ids, ex.rejected_ids).mean())


def perplexity(lm, ids: list[int]) -> float:
    return math.exp(-float(sequence_logprobs(lm, ids[:1], ids[1:]).mean()))


def test_twenty_orpo_steps_raise_margin_not_perplexity(embedded_lm) -> None:
    lm = embedded_lm
    ex = triplet(lm)
    held = lm.tokenizer(HELD_OUT)["input_ids"]
    m0, p0 = margin(lm, ex), perplexity(lm, held)
    trainer = ContextFrozenTrainer(lm.model, TrainSettings(progress=False, keep_snapshots=1))  # defaults: APOLLO r64, lr 1e-5
    try:
        result = trainer.run(TrainJob(examples=[ex], epochs=20), "orpo-20")
        m1, p1 = margin(lm, ex), perplexity(lm, held)
    finally:
        trainer.rollback("orpo-20")  # the session model is shared with other slow tests
    change = p1 / p0 - 1
    print(f"\nORPO x20 (lr 1e-5, APOLLO rank 64): margin {m0:+.4f} -> {m1:+.4f}; held-out perplexity "
          f"{p0:.3f} -> {p1:.3f} ({100 * change:+.2f}%); loss {result.steps[0].loss:.4f} -> {result.steps[-1].loss:.4f}")
    assert result.state == "done" and result.steps_applied == 20
    assert m1 > m0, (m0, m1)
    assert abs(change) < 0.05, (p0, p1)
    assert perplexity(lm, held) == p0  # rolled back exactly


def test_worker_trains_served_weights_while_readouts_run(embedded_lm, embedded_config, tmp_path) -> None:
    lm = embedded_lm
    ex = triplet(lm)
    text = lm.tokenizer(HELD_OUT)["input_ids"][:48]
    layers = [6, 12]
    before = token_activations(lm, text, layers)
    config = embedded_config.model_copy(update={"home": tmp_path})  # optimizer state in a temporary home
    client = TrainingClient(lm, config, TrainSettings(progress=False, keep_snapshots=1, threads=1))
    stop, reads, errors = threading.Event(), [], []

    def readouts() -> None:
        while not stop.is_set():
            try:
                token_activations(lm, text, layers)
                reads.append(client.weights_version)
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
                return

    reader = threading.Thread(target=readouts)
    try:
        reader.start()
        job_id = client.submit(TrainJob(examples=[ex], epochs=2))
        result = client.wait(job_id, timeout=300)
        stop.set()
        reader.join()
        assert not errors and reads, errors
        assert result.state == "done" and result.steps_applied == 2, result
        after = token_activations(lm, text, layers)
        assert not torch.equal(after[12], before[12])  # the served model reads the worker's updates
        client.rollback(job_id)
        restored = token_activations(lm, text, layers)
        assert all(torch.equal(restored[i], before[i]) for i in layers)
    finally:
        stop.set()
        if reader.is_alive():
            reader.join()
        client.close()
