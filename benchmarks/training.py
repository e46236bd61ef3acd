"""Issue 6 benchmark: training on the embedded model (Gemma 3 270M, fp32, CPU).

(1) Optimizer state bytes and step time for AdamW, APOLLO (rank 64) and APOLLO-Mini, on the same
    ORPO example and the same trained parameters (the decoder layers; embeddings frozen), steps
    interleaved round-robin so background load hits all three alike.
    Targets: APOLLO-Mini state < 1% of AdamW's; APOLLO-Mini step time <= 1.3x AdamW's.
(2) Context-frozen vs full backprop for a 512-token context and a 32-token continuation (SFT loss):
    forward + backward time (best of --repeats, in this process) and peak memory, measured two ways:
    the peak of tensor storage allocated during forward + backward (exact, training/peak_memory.py),
    and the peak-RSS increase over the loaded model in a fresh subprocess per variant (what the OS
    sees). Target: context-frozen uses at least 2x less memory (peak-RSS increase).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks._common import load_embedded, machine_line, sample_texts  # noqa: E402
from amygdala.training.apollo import DEFAULT_RANK, state_bytes  # noqa: E402
from amygdala.training.peak_memory import PeakTensorMemory  # noqa: E402
from amygdala.training.schemas import TrainExample, TrainSettings  # noqa: E402
from amygdala.training.trainer import ContextFrozenTrainer, continuation_logprobs, full_backprop_logprobs  # noqa: E402

CONTEXT_TOKENS = 512
CONTINUATION_TOKENS = 32
VARIANTS = {"frozen": continuation_logprobs, "full": full_backprop_logprobs}


def token_stream(lm, n: int) -> list[int]:
    ids: list[int] = [lm.tokenizer.bos_token_id]
    for text in sample_texts(64):
        ids += lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= n:
            break
    while len(ids) < n:
        ids += ids[1:]
    return ids[:n]


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n:.1f} GiB"


# -- (1) optimizers ---------------------------------------------------------------------------------
def bench_optimizers(lm, steps: int) -> dict[str, dict]:
    ids = token_stream(lm, 64 + 2 * 16)
    ex = TrainExample(context_ids=ids[:64], continuation_ids=ids[64:80], rejected_ids=ids[80:96], loss="orpo")
    kinds = {"AdamW": "adamw", f"APOLLO (rank {DEFAULT_RANK})": "apollo", "APOLLO-Mini": "apollo-mini"}
    trainers = {name: ContextFrozenTrainer(lm.model, TrainSettings(optimizer=kind, progress=False, keep_snapshots=0))
                for name, kind in kinds.items()}
    original = {n: p.detach().clone() for n, p in next(iter(trainers.values())).named}
    times: dict[str, list[float]] = {name: [] for name in trainers}
    opt_times: dict[str, list[float]] = {name: [] for name in trainers}
    for name, tr in trainers.items():
        inner = tr.optimizer.step

        def timed(inner=inner, name=name):  # noqa: ANN001, ANN202
            t0 = time.perf_counter()
            out = inner()
            opt_times[name].append(time.perf_counter() - t0)
            return out

        tr.optimizer.step = timed
    for rep in range(steps + 1):  # the first round allocates state: not timed
        for name, tr in trainers.items():
            t0 = time.perf_counter()
            report = tr.step([ex], rep + 1)
            if not report.applied:
                raise RuntimeError(f"{name}: step skipped ({report.reason})")
            if rep:
                times[name].append(time.perf_counter() - t0)
            print(f"  {name:<20} step {rep}: {time.perf_counter() - t0:6.2f} s", file=sys.stderr, flush=True)
    with torch.no_grad():
        for n, p in next(iter(trainers.values())).named:
            p.copy_(original[n])
    out = {}
    for name, tr in trainers.items():
        sb = state_bytes(tr.optimizer)
        out[name] = {"state": sb["persisted"], "projections": sb["projections"], "step_s": min(times[name]),
                     "opt_s": min(opt_times[name][1:])}
    n_params = sum(p.numel() for _, p in next(iter(trainers.values())).named)
    out["_trained_params"] = n_params
    return out


# -- (2) context-frozen vs full backprop -------------------------------------------------------------
def fwd_bwd(lm, trainer: ContextFrozenTrainer, fn, context: list[int], cont: list[int]) -> float:
    t0 = time.perf_counter()
    with trainer._grads_on():
        (lp,) = fn(lm.model, context, [cont])
        (-lp.mean()).backward()
    elapsed = time.perf_counter() - t0
    trainer._zero_grad()
    return elapsed


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(variant: str) -> None:
    """Fresh process: load, reset the RSS high-water mark, one forward + backward, report the increase."""
    lm = load_embedded()
    trainer = ContextFrozenTrainer(lm.model, TrainSettings(progress=False, keep_snapshots=0))
    ids = token_stream(lm, CONTEXT_TOKENS + CONTINUATION_TOKENS)
    with torch.no_grad():  # weights may be mapped lazily from the safetensors file: make them resident first,
        for p in lm.model.parameters():  # or the step's RSS increase would count paging the model in
            p.sum()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    base = _rss_kib("VmRSS")
    elapsed = fwd_bwd(lm, trainer, VARIANTS[variant], ids[:CONTEXT_TOKENS], ids[CONTEXT_TOKENS:])
    print(json.dumps({"base_kib": base, "peak_kib": _rss_kib("VmHWM"), "seconds": elapsed}))


def bench_context(lm, repeats: int) -> dict[str, dict]:
    trainer = ContextFrozenTrainer(lm.model, TrainSettings(progress=False, keep_snapshots=0))
    ids = token_stream(lm, CONTEXT_TOKENS + CONTINUATION_TOKENS)
    context, cont = ids[:CONTEXT_TOKENS], ids[CONTEXT_TOKENS:]
    out: dict[str, dict] = {}
    for name, fn in VARIANTS.items():
        with PeakTensorMemory() as mem:
            fwd_bwd(lm, trainer, fn, context, cont)
        out[name] = {"tensor_peak": mem.peak}
    for _ in range(repeats):  # interleaved, best of
        for name, fn in VARIANTS.items():
            t = fwd_bwd(lm, trainer, fn, context, cont)
            out[name]["seconds"] = min(out[name].get("seconds", float("inf")), t)
    for name in VARIANTS:
        proc = subprocess.run([sys.executable, __file__, "--child", name], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"memory subprocess for {name} failed:\n{proc.stderr[-2000:]}")
        data = json.loads(proc.stdout.strip().splitlines()[-1])
        out[name]["rss_increase"] = (data["peak_kib"] - data["base_kib"]) * 1024
        out[name]["rss_base"] = data["base_kib"] * 1024
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps per optimizer (after one untimed)")
    ap.add_argument("--repeats", type=int, default=2, help="forward+backward repeats for the time comparison")
    ap.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return
    lm = load_embedded()
    print(machine_line())
    print(f"model: {lm.name}, {sum(p.numel() for p in lm.model.parameters()) / 1e6:.0f}M parameters, {lm.dtype}")

    opt = bench_optimizers(lm, args.steps)
    n = opt.pop("_trained_params")
    adamw = opt["AdamW"]
    print(f"\n(1) optimizers: {n / 1e6:.1f}M trained parameters (decoder layers; embeddings frozen), ORPO example "
          f"64 + 2x16 tokens, best of {args.steps} steps")
    print(f"  {'optimizer':<20} {'state':>11} {'vs AdamW':>9} {'(+proj.)':>10} {'step':>8} {'vs AdamW':>9} {'opt.step':>9} {'vs AdamW':>9}")
    for name, r in opt.items():
        print(f"  {name:<20} {fmt_bytes(r['state']):>11} {100 * r['state'] / adamw['state']:8.2f}% {fmt_bytes(r['projections']):>10} "
              f"{r['step_s']:7.2f}s {r['step_s'] / adamw['step_s']:8.2f}x {r['opt_s']:8.3f}s {r['opt_s'] / adamw['opt_s']:8.2f}x")
    mini = opt["APOLLO-Mini"]
    state_ratio = mini["state"] / adamw["state"]
    time_ratio = mini["step_s"] / adamw["step_s"]
    print(f"  APOLLO-Mini state / AdamW state = {100 * state_ratio:.3f}%  (target < 1%: {'PASS' if state_ratio < 0.01 else 'FAIL'})")
    print(f"  APOLLO-Mini step / AdamW step   = {time_ratio:.2f}x  (target <= 1.3x: {'PASS' if time_ratio <= 1.3 else 'FAIL'})")

    ctx = bench_context(lm, args.repeats)
    fz, fb = ctx["frozen"], ctx["full"]
    print(f"\n(2) one forward + backward, {CONTEXT_TOKENS}-token context + {CONTINUATION_TOKENS}-token continuation (SFT)")
    print(f"  {'variant':<16} {'time':>8} {'tensor peak':>12} {'peak RSS increase':>18}")
    for name, label in (("full", "full backprop"), ("frozen", "context-frozen")):
        r = ctx[name]
        print(f"  {label:<16} {r['seconds']:7.2f}s {fmt_bytes(r['tensor_peak']):>12} {fmt_bytes(r['rss_increase']):>18}")
    print(f"  (peak RSS increase: over the loaded, resident model, {fmt_bytes(fz['rss_base'])} RSS before the step; "
          f"whole-process peaks {fmt_bytes(fb['rss_base'] + fb['rss_increase'])} vs {fmt_bytes(fz['rss_base'] + fz['rss_increase'])})")
    rss_ratio = fb["rss_increase"] / fz["rss_increase"]
    tensor_ratio = fb["tensor_peak"] / fz["tensor_peak"]
    print(f"  full / frozen: time {fb['seconds'] / fz['seconds']:.2f}x, tensor peak {tensor_ratio:.2f}x, "
          f"peak RSS increase {rss_ratio:.2f}x  (target >= 2x less memory: {'PASS' if rss_ratio >= 2 else 'FAIL'})")


if __name__ == "__main__":
    main()
