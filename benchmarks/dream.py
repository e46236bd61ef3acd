"""Issue 14 benchmark: one dream cycle with both shipped invariants on the embedded model (2 CPU cores).

Runs `amygdala dream --once` in-process (dream/standalone.py: home lock, model load, training worker,
checkpoint sync) on a home you can write to; copy the real one first, e.g.

    cp -r --reflink=auto $AMYGDALA_HOME /tmp/home-dream
    OMP_NUM_THREADS=2 python benchmarks/dream.py --home /tmp/home-dream

Reports, per invariant, the held-out pass rate and mean preference margin before and after the
cycle; the neutral-text perplexity drift; time per phase and in total; then the whole report as JSON.
Targets (issue 14): mean held-out pass rate of the two invariants up by >= 20 points, neither down by
more than 5, perplexity drift <= 5%, the whole cycle under 15 minutes. The benchmark reports what it
measures, met or not. Note a cycle that regressed is rolled back: its "after" is then the evaluation
of the trained weights that were refused, and the weights on disk are unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import machine_line  # noqa: E402
from amygdala.dream.evaluate import EvalSettings  # noqa: E402
from amygdala.dream.loop import DreamSettings  # noqa: E402
from amygdala.dream.standalone import run_standalone  # noqa: E402
from amygdala.engine.config import Config  # noqa: E402
from amygdala.training.schemas import TrainSettings  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", type=Path, required=True, help="A writable AMYGDALA_HOME (a copy of the real one).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-steps", type=int, default=None)
    ap.add_argument("--budget-minutes", type=float, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--cases", type=int, default=None, help="Training-side cases per invariant.")
    ap.add_argument("--samples", type=int, default=None, help="On-policy samples per case.")
    ap.add_argument("--train-batch", type=int, default=None)
    ap.add_argument("--preferred", choices=["reference", "best_sample"], default=None)
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--no-forced-choice", action="store_true", help="Train on-policy failures and corrections only.")
    ap.add_argument("--no-rehearse", action="store_true", help="No rehearsal triplets for cases the model gets right.")
    ap.add_argument("--on-policy-ratio", type=float, default=None, help="Cap on-policy triplets per written pair.")
    ap.add_argument("--held-out-templates", type=int, default=None)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()

    overrides = {"budget_steps": args.budget_steps, "budget_minutes": args.budget_minutes, "lr": args.lr,
                 "cases_per_invariant": args.cases, "samples_per_case": args.samples,
                 "train_batch_size": args.train_batch, "preferred": args.preferred,
                 "max_new_tokens": args.max_new_tokens, "on_policy_ratio": args.on_policy_ratio, "forced_choice": False if args.no_forced_choice else None,
                 "rehearse": False if args.no_rehearse else None}
    ev = {} if args.held_out_templates is None else {"held_out_templates": args.held_out_templates}
    settings = DreamSettings(**{k: v for k, v in overrides.items() if v is not None}, eval=EvalSettings(**ev))
    config = Config.load(home=args.home)
    print(machine_line())
    load_before = os.getloadavg()
    print("settings:", json.dumps(settings.model_dump(mode="json", exclude={"temperature", "eval"})))
    t0 = time.perf_counter()
    report = run_standalone(config, settings, dry_run=args.dry_run, seed=args.seed,
                            train_settings=TrainSettings(threads=config.threads or 2), echo=lambda s: print(s, file=sys.stderr))
    wall = time.perf_counter() - t0
    load_after = os.getloadavg()

    print(f"\noutcome: {report.outcome}: {report.reason}")
    print(f"temperature {report.temperature} -> {report.next_temperature}, failure rate {report.failure_rate}")
    print(f"\n{'invariant':<12} {'cases':>5} {'pass before':>11} {'pass after':>10} {'Δ points':>8} "
          f"{'margin before':>13} {'margin after':>12}")
    deltas = []
    b_eval, a_eval = report.before, report.after
    for name, b in (b_eval.invariants.items() if b_eval else []):
        a = a_eval.invariants.get(name) if a_eval else None
        d = 100 * (a.pass_rate - b.pass_rate) if a else float("nan")
        deltas.append(d)
        print(f"{name:<12} {b.cases:>5} {b.pass_rate:>11.3f} {a.pass_rate if a else float('nan'):>10.3f} {d:>+8.1f} "
              f"{b.mean_margin:>+13.4f} {a.mean_margin if a else float('nan'):>+12.4f}")
    drift = None
    if b_eval and a_eval and b_eval.perplexity and a_eval.perplexity:
        drift = a_eval.perplexity / b_eval.perplexity - 1
        print(f"\nneutral perplexity {b_eval.perplexity:.3f} -> {a_eval.perplexity:.3f} ({100 * drift:+.2f}%)")
    tr = report.training
    print(f"training: {tr.steps_applied}/{tr.planned_steps} steps, {tr.examples} examples ({tr.orpo} ORPO, {tr.sft} SFT), "
          f"{tr.seconds:.1f} s, losses {[round(x, 3) for x in tr.losses if x is not None]}")
    print("\nphase        seconds")
    for phase, sec in report.timings.items():
        print(f"{phase:<12} {sec:>7.1f}")
    print(f"{'wall (incl. load)':<12} {wall:>7.1f}")
    print(f"machine load average (1/5/15 min) before {load_before}, after {load_after}: other processes share "
          "the 2 cores when it is above 2")
    mean_delta = sum(deltas) / len(deltas) if deltas else None
    targets = {
        "mean_pass_rate_up_20_points": mean_delta is not None and mean_delta >= 20,
        "none_down_more_than_5_points": bool(deltas) and min(deltas) >= -5,
        "perplexity_drift_at_most_5_percent": drift is not None and drift <= 0.05,
        "cycle_under_15_minutes": report.timings.get("total", wall) < 15 * 60,
    }
    print("\ntargets:", json.dumps(targets))
    out = {"report": report.model_dump(mode="json"), "wall_s": wall, "mean_delta_points": mean_delta,
           "perplexity_drift": drift, "targets": targets, "machine": machine_line(),
           "load_average_before": load_before, "load_average_after": load_after,
           "settings": settings.model_dump(mode="json")}
    text = json.dumps(out, indent=1)
    if args.json_out:
        args.json_out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
