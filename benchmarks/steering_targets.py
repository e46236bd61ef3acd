"""Issue 5 targets: does steering move what the text expresses, without wrecking it?

For concepts from different families, over 20 neutral prompts: sweep alpha, re-read each
continuation without steering, and report per concept the best alpha (highest mean score with
median perplexity <= 2x baseline), the share of prompts whose re-read score rose over baseline at
that alpha (target >= 80%), the perplexity ratio (target <= 2x), the steerability slope and the
wrong-way share. Writes one PNG per concept.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import machine_line  # noqa: E402

DEFAULT_CONCEPTS = "joyful,furious,terrified,melancholy,calm,piqued"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--concepts", default=DEFAULT_CONCEPTS)
    ap.add_argument("--alphas", default="0.015,0.02,0.03,0.045")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--layers", default=None, help="e.g. 6-9 (default: the readout's default layers)")
    ap.add_argument("--positions", default="both")
    ap.add_argument("--out", type=Path, default=Path("steering_targets"))
    args = ap.parse_args()

    from tqdm import tqdm

    from amygdala.engine.config import Config
    from amygdala.engine.model import load_model
    from amygdala.engine.steering_eval import NEUTRAL_PROMPTS, plot_sweep, sweep
    from amygdala.training.vectors.cli import parse_layers
    from amygdala.training.vectors.build import ensure_readout

    cfg = Config.load()
    lm = load_model(cfg)
    r = ensure_readout(lm, cfg)
    print(machine_line())
    args.out.mkdir(parents=True, exist_ok=True)
    prompts = list(NEUTRAL_PROMPTS[: args.prompts])
    alphas = [float(a) for a in args.alphas.split(",")]
    layers = parse_layers(args.layers)
    rows = []
    t0 = time.perf_counter()
    for concept in args.concepts.split(","):
        bar = tqdm(total=len(prompts) * (len(set(alphas) | {0.0})), desc=concept, unit="gen")
        res = sweep(lm, r, concept, alphas, prompts, layers, args.positions, args.tokens, progress=lambda d, t: bar.update(1))
        bar.close()
        plot_sweep(res, args.out / f"{concept}.png")
        (args.out / f"{concept}.json").write_text(json.dumps(res.to_dict(), indent=2))
        best = next((s for s in res.per_alpha if s.alpha == res.best_alpha), None)
        ratio = (best.median_perplexity / res.baseline_perplexity) if best and res.baseline_perplexity else None
        rows.append((concept, res, best, ratio))
    print(f"{len(prompts)} prompts x {args.tokens} tokens, greedy, layers {rows[0][1].layers}, positions {args.positions}, "
          f"{time.perf_counter() - t0:.0f} s")
    print(f"{'concept':<12} {'best alpha':>10} {'rose':>6} {'ppl ratio':>9} {'slope':>7} {'wrong way':>9}  target")
    passed = 0
    for concept, res, best, ratio in rows:
        rose = best.rise_fraction if best else None
        ok = best is not None and rose is not None and rose >= 0.8 and ratio is not None and ratio <= 2.0
        passed += ok
        print(f"{concept:<12} {str(res.best_alpha):>10} {rose if rose is None else f'{rose:.0%}':>6} "
              f"{'-' if ratio is None else f'{ratio:.2f}x':>9} {res.slope or 0:+7.2f} {(res.wrong_way or 0):>9.0%}  "
              f"{'PASS' if ok else 'FAIL'}")
    print(f"{passed}/{len(rows)} concepts meet the target (rise in >= 80% of prompts at median perplexity <= 2x)")


if __name__ == "__main__":
    main()
