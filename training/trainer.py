"""Context-frozen training: the context is read once without a graph, only the continuation is trained.

A correction is (context, preferred continuation[, rejected continuation]). The context is usually
long (a conversation) and the continuation short, and what we want to change is how the model
*continues* from that context, not how it reads it. So the context is run under no_grad into a KV
cache (all but its last token), and the continuation(s) are run with grad attending to that cache:

- memory holds the graph of the continuation tokens only, not of the context, which is where the
  savings come from (benchmarks/training.py measures them);
- gradients still reach every weight of the decoder layers through the continuation tokens: their
  queries (W_q) attend to the frozen context keys/values, and their own keys/values, MLPs and norms
  are computed with grad. W_k/W_v are trained only through the continuation's own positions;
- the logits are those of a full forward pass (tests check this), so the loss is exact; only the
  gradient paths through the context's hidden states are cut.

The last context token is run with grad, together with the continuation: it predicts the first
continuation token. ORPO's chosen and rejected continuations share one cached context, expanded to a
batch of two and right-padded (causal attention never lets a real token see the padding after it).

Guards per step: a non-finite loss or gradient skips the step and leaves weights and optimizer state
untouched; the global gradient norm is clipped. Before each job, the trained tensors and the
optimizer state are snapshotted (kept for the last `keep_snapshots` jobs) so a job can be rolled back
exactly. `apply_guard` wraps every in-place weight write (steps and rollbacks): the worker uses it to
publish a seqlock-style weights version to readers in the serving process.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager

import torch
from torch import nn

from amygdala.engine.kv_cache import cache_kwarg, new_cache

from .apollo import Apollo, build_optimizer
from .losses import orpo_loss, sft_loss
from .optimizer_state import OptimizerStateError, load_state, model_key, move_aside, save_state, state_directory
from .schemas import (JobRejected, JobResult, RollbackResult, StepReport, TrainExample, TrainJob, TrainSettings,
                      TrainTargets)
from .targets import select

log = logging.getLogger(__name__)

LogprobFn = Callable[[nn.Module, list[int], list[list[int]]], list[torch.Tensor]]


# -- parameters ---------------------------------------------------------------------------------
def trainable_parameters(model: nn.Module, train_embeddings: bool = False,
                         targets: TrainTargets | None = None) -> tuple[list[tuple[str, nn.Parameter]], set[int]]:
    """(name, parameter) pairs to train, in model order, and the ids of embedding/head matrices among them.

    Tied weights appear once. The input embedding and the output head (the same tensor when tied) are
    left out unless `train_embeddings`. `targets` narrows the body to chosen modules and layers
    (training/targets.py); an embedding asked for with `train_embeddings` stays in either way.
    """
    embedding_ids: set[int] = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter):
            embedding_ids.add(id(weight))
    named = [(n, p) for n, p in model.named_parameters() if train_embeddings or id(p) not in embedding_ids]
    if targets is not None:
        body = [(n, p) for n, p in named if id(p) not in embedding_ids]
        chosen = {id(p) for _, p in select(model, body, targets, exclude=embedding_ids, where="settings.targets")}
        named = [(n, p) for n, p in named if id(p) in chosen or id(p) in embedding_ids]
    if not named:
        raise ValueError("the model has no trainable parameters besides its embeddings; pass train_embeddings=True")
    return named, embedding_ids & {id(p) for _, p in named}


# -- forward passes -------------------------------------------------------------------------------
def _gather_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] without materialising the log-softmax over the whole vocabulary."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def continuation_logprobs(model: nn.Module, context_ids: list[int], continuations: list[list[int]]) -> list[torch.Tensor]:
    """Per-token log-probs of each continuation given the context, the context frozen (no graph)."""
    if not context_ids:
        raise ValueError("context_ids is empty: pass at least the BOS token")
    if not continuations or any(len(c) == 0 for c in continuations):
        raise ValueError("every continuation needs at least one token")
    device = next(model.parameters()).device
    kw = cache_kwarg(model)
    n_ctx = len(context_ids)
    cache = new_cache(model)
    if n_ctx > 1:
        with torch.no_grad():
            ids = torch.tensor([context_ids[:-1]], device=device)
            model(input_ids=ids, position_ids=torch.arange(n_ctx - 1, device=device).unsqueeze(0), use_cache=True,
                  logits_to_keep=1, **{kw: cache})
    width = max(len(c) for c in continuations)
    rows = []
    for c in continuations:
        row = [context_ids[-1], *c[:-1]]
        rows.append(row + [row[-1]] * (width - len(row)))  # right padding: never attended to by real tokens
    if len(rows) > 1:
        cache.batch_repeat_interleave(len(rows))
    ids = torch.tensor(rows, device=device)
    pos = torch.arange(n_ctx - 1, n_ctx - 1 + width, device=device).unsqueeze(0).expand(len(rows), -1)
    logits = model(input_ids=ids, position_ids=pos, use_cache=True, **{kw: cache}).logits
    out = []
    for i, c in enumerate(continuations):
        targets = torch.tensor(c, device=device)
        out.append(_gather_logprobs(logits[i, : len(c)], targets))
    return out


def full_backprop_logprobs(model: nn.Module, context_ids: list[int], continuations: list[list[int]]) -> list[torch.Tensor]:
    """The reference: one forward over context + continuation with grad everywhere (for tests and benchmarks)."""
    device = next(model.parameters()).device
    out = []
    for c in continuations:
        ids = torch.tensor([list(context_ids) + list(c)], device=device)
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=len(c) + 1).logits[0, :-1]
        out.append(_gather_logprobs(logits, torch.tensor(c, device=device)))
    return out


def example_loss(model: nn.Module, ex: TrainExample, orpo_lambda: float,
                 logprobs: LogprobFn = continuation_logprobs) -> tuple[torch.Tensor, dict]:
    """The example's loss (with graph) and its parts as floats."""
    if ex.loss == "sft":
        (lp,) = logprobs(model, ex.context_ids, [ex.continuation_ids])
        loss = sft_loss(lp)
        value = float(loss.detach())
        return loss, {"loss": value, "nll": value, "chosen_mean_logp": float(lp.detach().mean())}
    chosen, rejected = logprobs(model, ex.context_ids, [ex.continuation_ids, ex.rejected_ids or []])
    loss, parts = orpo_loss(chosen, rejected, orpo_lambda)
    return loss, vars(parts)


# -- the trainer ------------------------------------------------------------------------------
@dataclass
class Snapshot:
    job_id: str
    weights: dict[str, torch.Tensor]
    optimizer_tensors: dict[str, torch.Tensor]
    optimizer_ints: dict
    jobs_trained: int


def _batches(examples: list[TrainExample], size: int) -> list[list[TrainExample]]:
    return [examples[i: i + size] for i in range(0, len(examples), size)]


class ContextFrozenTrainer:
    """Owns the optimizer over a model's weights and runs jobs on them in place."""

    def __init__(self, model: nn.Module, settings: TrainSettings | None = None, *, model_name: str = "model",
                 state_root: Path | None = None, apply_guard: Callable[[], ContextManager] | None = None,
                 mark_changed: Callable[[list[str]], None] | None = None,
                 logprobs: LogprobFn = continuation_logprobs):
        self.model = model
        self.settings = settings or TrainSettings()
        self.named, self.embedding_ids = trainable_parameters(model, self.settings.train_embeddings,
                                                              self.settings.targets)
        self.optimizer: Apollo = build_optimizer(self.named, self.settings.optimizer_spec(), self.embedding_ids)
        self.apply_guard = apply_guard or contextlib.nullcontext
        # Called inside apply_guard, before the write, with the names of the tensors about to change:
        # the worker stamps them with the weights version so checkpoint sync compares only those.
        self.mark_changed = mark_changed or (lambda _names: None)
        self.logprobs = logprobs
        self.snapshots: OrderedDict[str, Snapshot] = OrderedDict()
        self.jobs_trained = 0
        self.key = model_key(self.named, model_name)
        self.state_dir = (state_directory(state_root, self.key, self.settings.optimizer, self.settings.rank)
                          if state_root is not None else None)
        self.resumed = False
        self.state_warning: str | None = None
        self.generation = 0  # optimizer state generation loaded from (or last written to) disk
        self._job_ids: set[int] | None = None  # a job's targets: only these parameters get gradients

    # -- optimizer state on disk ----------------------------------------------------------------
    def load_state(self) -> bool:
        """Resume the optimizer state saved by an earlier job, if any.

        Unusable state (damaged, or saved for other parameters) is moved aside, not deleted, and
        training starts fresh; `state_warning` says so.
        """
        if self.state_dir is None:
            return False
        try:
            stored = load_state(self.optimizer, self.named, self.state_dir)
        except OptimizerStateError as exc:
            aside = move_aside(self.state_dir)
            self.state_warning = f"{exc}; moved to {aside} and started with fresh optimizer state"
            log.warning(self.state_warning)
            return False
        if stored is not None:
            self.jobs_trained = stored.jobs_trained
            self.generation = stored.generation
            self.resumed = True
        return stored is not None

    def save_state(self) -> bool:
        """Write the optimizer state as the next generation; False when a newer one on disk forbids it.

        The generation check (under the state directory's lock) is what keeps an older process, e.g.
        a worker orphaned by a killed daemon, from overwriting the state a newer worker loaded.
        """
        if self.state_dir is None:
            return True
        stored = save_state(self.optimizer, self.named, self.state_dir, key=self.key, kind=self.settings.optimizer,
                            jobs_trained=self.jobs_trained, expect_generation=self.generation)
        if stored is None:
            self.state_warning = (f"optimizer state in {self.state_dir} is newer than generation {self.generation} this "
                                  "worker loaded (another worker wrote it); not overwritten")
            return False
        self.generation = stored.generation
        return True

    def job_parameters(self, targets: TrainTargets | None) -> list[tuple[str, nn.Parameter]]:
        """The trained parameters a job with `targets` may change; refuses targets outside what this trainer trains."""
        if targets is None:
            return list(self.named)
        body = [(n, p) for n, p in self.named if id(p) not in self.embedding_ids]
        chosen = select(self.model, body, targets, exclude=self.embedding_ids | self._untrained_ids(), where="targets")
        return chosen

    def _untrained_ids(self) -> set[int]:
        trained = {id(p) for _, p in self.named}
        return {id(p) for _, p in self.model.named_parameters() if id(p) not in trained}

    # -- helpers --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _grads_on(self) -> Iterator[None]:
        """requires_grad only while computing a loss: the same weights serve inference the rest of the time."""
        flags = [p.requires_grad for _, p in self.named]
        for _, p in self.named:
            p.requires_grad_(self._job_ids is None or id(p) in self._job_ids)
        try:
            with torch.enable_grad():
                yield
        finally:
            for (_, p), flag in zip(self.named, flags):
                p.requires_grad_(flag)

    def _zero_grad(self) -> None:
        for _, p in self.named:
            p.grad = None

    def _accumulate(self, batch: list[TrainExample], scale: int, parts_out: list | None = None) -> tuple[float, str | None]:
        """Backward each example's loss / scale into .grad; (summed scaled loss, reason if non-finite)."""
        total = 0.0
        with self._grads_on():
            for ex in batch:
                loss, parts = example_loss(self.model, ex, self.settings.orpo_lambda, self.logprobs)
                if parts_out is not None:
                    parts_out.append(parts)
                value = float(loss.detach())
                if not math.isfinite(value):
                    return math.nan, f"non-finite loss ({value})"
                (loss / scale).backward()
                total += value / scale
        return total, None

    def _grad_norm(self) -> torch.Tensor:
        grads = [p.grad for _, p in self.named if p.grad is not None]
        if not grads:
            return torch.tensor(0.0)
        return torch.nn.utils.get_total_norm(grads, norm_type=2.0, error_if_nonfinite=False)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _take_snapshot(self, job_id: str) -> None:
        if self.settings.keep_snapshots == 0:
            return
        while len(self.snapshots) >= self.settings.keep_snapshots:  # evict first: never keep one copy too many
            self.snapshots.popitem(last=False)
        with torch.no_grad():
            weights = {n: p.detach().clone() for n, p in self.named}
        tensors, ints = self.optimizer.export_state({p: n for n, p in self.named})
        self.snapshots[job_id] = Snapshot(job_id, weights, tensors, ints, self.jobs_trained)

    # -- one step ------------------------------------------------------------------------------
    def step(self, batch: list[TrainExample], index: int) -> StepReport:
        """One optimizer step on a batch, or a skipped one (weights and state untouched) if anything is non-finite."""
        self._zero_grad()
        try:
            loss, bad = self._accumulate(batch, len(batch))
            if bad:
                return StepReport(step=index, loss=None, applied=False, reason=bad)
            norm = self._grad_norm()
            if not torch.isfinite(norm):
                return StepReport(step=index, loss=loss, grad_norm=None, applied=False, reason=f"non-finite gradient norm ({float(norm)})")
            if 0 < self.settings.max_grad_norm < float(norm):  # below the bound clipping multiplies by 1
                torch.nn.utils.clip_grads_with_norm_([p for _, p in self.named], self.settings.max_grad_norm, norm)
            changed = [n for n, p in self.named if p.grad is not None]
            with self.apply_guard():
                self.mark_changed(changed)
                self.optimizer.step()
            return StepReport(step=index, loss=loss, grad_norm=float(norm), applied=True, changed_tensors=len(changed))
        finally:
            self._zero_grad()

    # -- jobs ----------------------------------------------------------------------------------
    def total_steps(self, job: TrainJob) -> int:
        per_pass = math.ceil(len(job.examples) / (job.batch_size or self.settings.batch_size))
        return 1 if job.dry_run else per_pass * job.epochs

    def run(self, job: TrainJob, job_id: str, on_step: Callable[[StepReport, int], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> JobResult:
        """Run a job to the end (or until should_stop() between steps); exceptions become a failed result."""
        result = JobResult(job_id=job_id, state="running", dry_run=job.dry_run, label=job.label, examples=len(job.examples),
                           total_steps=self.total_steps(job), started_at=time.time())
        try:
            self.set_lr(job.lr or self.settings.lr)
            self._job_ids = None if job.targets is None else {id(p) for _, p in self.job_parameters(job.targets)}
            if job.dry_run:
                self._dry_run(job, result)
            else:
                self._train(job, job_id, result, on_step, should_stop)
        except JobRejected as exc:
            result.state = "failed"
            result.error = str(exc)
        except Exception as exc:  # noqa: BLE001: reported to the caller, never kills the worker
            log.exception("training job %s failed", job_id)
            result.state = "failed"
            result.error = f"{type(exc).__name__}: {exc}"
        finally:
            self._job_ids = None
        result.finished_at = time.time()
        result.rollback_available = job_id in self.snapshots
        return result

    def _train(self, job: TrainJob, job_id: str, result: JobResult, on_step, should_stop) -> None:
        self._take_snapshot(job_id)
        batches = _batches(job.examples, job.batch_size or self.settings.batch_size)
        bar = None
        if self.settings.progress and result.total_steps > 1:
            from tqdm.auto import tqdm

            bar = tqdm(total=result.total_steps, desc=f"train {job_id}", unit="step", file=sys.stderr, dynamic_ncols=True)
        index = 0
        try:
            for _ in range(job.epochs):
                for batch in batches:
                    if should_stop is not None and should_stop():
                        result.state = "cancelled"
                        result.error = f"stopped after {index} of {result.total_steps} steps (worker shutting down)"
                        return
                    index += 1
                    report = self.step(batch, index)
                    result.steps.append(report)
                    result.steps_applied += report.applied
                    result.steps_skipped += not report.applied
                    result.loss, result.grad_norm = report.loss, report.grad_norm
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{report.loss:.4f}" if report.loss is not None else "skip")
                    if on_step is not None:
                        on_step(report, result.total_steps)
            result.state = "done"
        finally:
            if bar is not None:
                bar.close()
            if result.steps_applied:
                self.jobs_trained += 1
                self.save_state()

    def _dry_run(self, job: TrainJob, result: JobResult) -> None:
        """Loss and gradient norms of the whole job as one batch; no snapshot, no step, nothing written."""
        self._zero_grad()
        parts: list[dict] = []
        try:
            loss, bad = self._accumulate(job.examples, len(job.examples), parts)
            result.example_losses = parts
            if bad:
                result.steps.append(StepReport(step=1, applied=False, reason=f"dry run; {bad}"))
            else:
                norm = self._grad_norm()
                result.loss, result.grad_norm = loss, float(norm)
                result.grad_norms = {n: float(p.grad.norm()) for n, p in self.named if p.grad is not None}
                result.steps.append(StepReport(step=1, loss=loss, grad_norm=float(norm), applied=False, reason="dry run"))
            result.steps_skipped = 1
            result.state = "done"
        finally:
            self._zero_grad()

    # -- rollback --------------------------------------------------------------------------------
    def rollback(self, job_id: str) -> RollbackResult:
        """Restore weights and optimizer state to just before `job_id`, undoing it and every later job."""
        if job_id not in self.snapshots:
            kept = list(self.snapshots)
            raise JobRejected(f"no snapshot for job {job_id!r}: snapshots are kept for the last "
                              f"{self.settings.keep_snapshots} training jobs of this worker (now: {kept or 'none'})")
        snap = self.snapshots[job_id]
        ids = list(self.snapshots)
        undone = ids[ids.index(job_id):]
        with torch.no_grad(), self.apply_guard():
            self.mark_changed([n for n, _ in self.named])
            for name, p in self.named:
                p.copy_(snap.weights[name])
        self.optimizer.import_state({p: n for n, p in self.named}, snap.optimizer_tensors, snap.optimizer_ints)
        self.jobs_trained = snap.jobs_trained
        for j in undone:
            del self.snapshots[j]
        self.save_state()
        return RollbackResult(job_id=job_id, restored_tensors=len(snap.weights), undone_jobs=undone, weights_version=0)

    # -- after a checkpoint undo ------------------------------------------------------------------
    def reload_from(self, model_dir: Path, names: list[str]) -> int:
        """Make the live weights equal to the checkpoint for `names` plus every trained tensor; returns how many differed.

        Called after the checkpoint was rolled back through its undo log: the worker owns the
        weights while it runs, so it does the copy, between jobs. The in-memory job snapshots are
        dropped (they hold weights from the history that was just undone); the optimizer moments
        are kept.
        """
        from safetensors import safe_open

        from .checkpoint.format import model_files

        params = dict(self.model.named_parameters())
        params.update(dict(self.model.named_buffers()))
        wanted = set(names) | {n for n, _ in self.named}
        copied: list[str] = []
        updates: list[tuple[torch.Tensor, torch.Tensor]] = []
        for path in model_files(Path(model_dir)):
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    if key in wanted and key in params:
                        src = f.get_tensor(key)
                        dst = params[key]
                        if src.shape != dst.shape:
                            raise JobRejected(f"{key}: checkpoint shape {list(src.shape)} vs live {list(dst.shape)}; "
                                              "the checkpoint is not this model's")
                        src = src.to(dst.dtype)
                        if not torch.equal(src, dst):
                            updates.append((dst, src.clone()))
                            copied.append(key)
        if updates:
            with torch.no_grad(), self.apply_guard():
                self.mark_changed(copied)
                for dst, src in updates:
                    dst.copy_(src)
        self.snapshots.clear()
        return len(copied)
