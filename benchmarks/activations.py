"""Issue 2 benchmark: activation capture throughput on the embedded model.

(a) full forward with output_hidden_states (what most libraries do: LM head included),
(b) body-only capture of all layers (LM head skipped),
(c) body-only capture stopping after the middle layer (what readout does when reading layer <= 9).
Same texts, same batches, one run; prints tokens/s and the ratios (target: (b) >= 3x (a)).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks._common import load_embedded, machine_line, sample_texts  # noqa: E402
from amygdala.engine.activations import forward_body, length_batches, pad_batch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--texts", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    lm = load_embedded()
    print(machine_line())
    texts = sample_texts(args.texts)
    seqs = [lm.tokenizer(t)["input_ids"] for t in texts]
    n_tokens = sum(len(s) for s in seqs)
    batches = [pad_batch([seqs[i] for i in b], 0) for b in length_batches([len(s) for s in seqs], args.batch, 1 << 30)]
    mid = lm.n_layers // 2

    def full() -> None:
        with torch.inference_mode():
            for ids, mask, pos in batches:
                lm.model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)

    def body_all() -> None:
        for ids, mask, pos in batches:
            forward_body(lm, ids, mask, pos, list(range(lm.n_layers)))

    def body_mid() -> None:
        for ids, mask, pos in batches:
            forward_body(lm, ids, mask, pos, [mid])

    runs = {"(a) full forward + output_hidden_states": full, "(b) body only, all layers": body_all,
            f"(c) body only, stop after {lm.describe_layer(mid)}": body_mid}
    body_all()  # warm-up
    best: dict[str, float] = {}
    for _ in range(args.repeats):  # interleaved, best of N: the machine is shared and noisy
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
    print(f"{len(texts)} texts, {n_tokens} tokens, batch {args.batch}, best of {args.repeats}")
    base = best["(a) full forward + output_hidden_states"]
    for name, t in best.items():
        print(f"  {name:<45} {n_tokens / t:9.0f} tok/s   {base / t:5.2f}x vs (a)")
    ratio = base / best["(b) body only, all layers"]
    print(f"ratio (b)/(a) = {ratio:.2f}x  (target >= 3x: {'PASS' if ratio >= 3 else 'FAIL'})")


if __name__ == "__main__":
    main()
