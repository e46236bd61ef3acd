"""Issue 5 benchmark: what readout and steering cost during generation on the embedded model.

Three runs over the same prompts, greedy, same number of tokens, interleaved and best-of-N:
(a) plain generation; (b) generation with the readout of every concept at every layer on every
decoded token; (c) generation with steering (one concept at the default layers).
Target: (b) and (c) each cost under 5% of (a)'s speed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import machine_line  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--concept", default="joyful")
    args = ap.parse_args()

    from amygdala.engine.config import Config
    from amygdala.engine.generation import generate
    from amygdala.engine.model import load_model
    from amygdala.engine.steering import build_plan, generate_steered
    from amygdala.engine.steering_eval import NEUTRAL_PROMPTS
    from amygdala.training.vectors.build import ensure_readout

    cfg = Config.load()
    lm = load_model(cfg)
    r = ensure_readout(lm, cfg)
    print(machine_line())
    prompts = [r.encode(p) for p in NEUTRAL_PROMPTS[: args.prompts]]
    all_layers = r.manifest.layers
    plan = build_plan(r, {args.concept: 0.03}, None)

    def plain() -> int:
        return sum(len(generate(lm, p, max_new_tokens=args.tokens, stop_at_eos=False).token_ids) for p in prompts)

    def with_readout() -> int:
        n = 0
        for p in prompts:
            reader = r.decode_reader(all_layers)
            g = generate(lm, p, max_new_tokens=args.tokens, stop_at_eos=False, capture_layers=all_layers, on_residuals=reader)
            assert len(reader.scores) == len(g.token_ids) - 1 or len(reader.scores) == len(g.token_ids)
            n += len(g.token_ids)
        return n

    def steered() -> int:
        return sum(len(generate_steered(lm, p, plan, max_new_tokens=args.tokens, stop_at_eos=False).token_ids) for p in prompts)

    runs = {"(a) plain generation": plain,
            f"(b) + readout, {len(r.concepts)} concepts x {len(all_layers)} layers, every token": with_readout,
            f"(c) + steering '{args.concept}' at layers {sorted(plan.pushes)}": steered}
    plain()  # warm-up
    best: dict[str, float] = {}
    tokens: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            tokens[name] = fn()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
    base = tokens["(a) plain generation"] / best["(a) plain generation"]
    print(f"{len(prompts)} prompts x {args.tokens} tokens, greedy, best of {args.repeats}")
    ok = True
    for name in runs:
        speed = tokens[name] / best[name]
        cost = 1 - speed / base
        line = f"  {name:<62} {speed:7.2f} tok/s"
        if name != "(a) plain generation":
            line += f"   cost {cost:+6.1%}  (target < 5%: {'PASS' if cost < 0.05 else 'FAIL'})"
            ok &= cost < 0.05
        print(line)
    print("all targets met" if ok else "some targets missed")


if __name__ == "__main__":
    main()
