"""vLLM backend benchmark (GPU): what readout and per-request steering cost, and in-place training.

    python benchmarks/vllm_bench.py --model DIR [--out results.json] [--compare-graphs]

Measured, each at batch 1, 16 and 64 (prompt 128 tokens, 128 new tokens, greedy, EOS ignored):
- generation throughput (generated tokens / s) with the hooks installed but idle (baseline),
  with the readout on every request (a 267-concept probe at 4 layers), and with steering on half
  the requests (4 layers); the overhead of each against the baseline (target < 5%);
- with --compare-graphs, the same baseline in a separate process without amygdala and with CUDA
  graphs: what eager mode, which the hooks need, costs;
- a training step (context-frozen SFT, APOLLO, batch 4) on a HuggingFace copy of the model on
  the same GPU, and the in-place update latency: one layer's weights and all of them, written into
  the live vLLM engine by name (collective_rpc + load_weights + prefix-cache reset).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

BATCHES = (1, 16, 64)
PROMPT, NEW = 128, 128


def _requests(n: int, vocab: int, steer_half: bool, probe, hidden: int, layers: list[int], seed: int = 0):
    from amygdala.engine.backend import GenerationRequest, Sampling
    from amygdala.engine.steering import SteeringPlan

    g = torch.Generator().manual_seed(seed)
    plan = SteeringPlan(pushes={i: torch.randn(hidden, generator=g) * 0.05 for i in layers}, positions="both")
    out = []
    for k in range(n):
        ids = torch.randint(10, vocab - 10, (PROMPT,), generator=g).tolist()
        out.append(GenerationRequest(ids, Sampling(max_new_tokens=NEW, stop_at_eos=False),
                                     steering=plan if steer_half and k % 2 else None, probe=probe))
    return out


def _throughput(backend, reqs, repeats: int = 3) -> float:
    backend.generate(reqs[:1])  # warm
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = backend.generate(reqs)
        dt = time.perf_counter() - t0
        rates.append(sum(len(o.token_ids) for o in outs) / dt)
    return statistics.median(rates)


def bench_generation(backend) -> dict:
    from amygdala.engine.backend import Probe

    info = backend.info()
    layers = sorted({info.n_layers // 4, info.n_layers // 2, 2 * info.n_layers // 3, 3 * info.n_layers // 4})
    g = torch.Generator().manual_seed(1)
    probe = Probe(weight={i: torch.randn(267, info.hidden_size, generator=g) for i in layers},
                  bias={i: torch.randn(267, generator=g) for i in layers})
    res: dict = {"layers": layers}
    for b in BATCHES:
        base = _throughput(backend, _requests(b, info.vocab_size, False, None, info.hidden_size, layers))
        read = _throughput(backend, _requests(b, info.vocab_size, False, probe, info.hidden_size, layers))
        steer = _throughput(backend, _requests(b, info.vocab_size, True, None, info.hidden_size, layers))
        res[f"batch_{b}"] = {"baseline_tok_s": base, "readout_tok_s": read, "steer_half_tok_s": steer,
                             "readout_overhead_pct": 100 * (base - read) / base,
                             "steer_overhead_pct": 100 * (base - steer) / base}
        print(f"batch {b:3d}: {base:9.1f} tok/s baseline, readout {100 * (base - read) / base:+.1f}%, "
              f"steering on half {100 * (base - steer) / base:+.1f}%", file=sys.stderr)
    return res


def bench_graphs(model: str, tp: int) -> dict:
    """The same baseline without amygdala, with CUDA graphs, in a fresh process (GPU memory freed)."""
    code = f"""
import json, time, torch
from vllm import LLM, SamplingParams
llm = LLM(model={model!r}, tensor_parallel_size={tp}, gpu_memory_utilization=0.6)
vocab = llm.get_tokenizer().vocab_size
out = {{}}
for b in {BATCHES!r}:
    g = torch.Generator().manual_seed(0)
    prompts = [{{"prompt_token_ids": torch.randint(10, vocab - 10, ({PROMPT},), generator=g).tolist()}} for _ in range(b)]
    sp = SamplingParams(max_tokens={NEW}, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:1], sp, use_tqdm=False)
    rates = []
    for _ in range(3):
        t0 = time.perf_counter(); o = llm.generate(prompts, sp, use_tqdm=False); dt = time.perf_counter() - t0
        rates.append(sum(len(x.outputs[0].token_ids) for x in o) / dt)
    out[f"batch_{{b}}"] = sorted(rates)[1]
print("RESULT " + json.dumps(out))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("AMYGDALA_VLLM", "VLLM_PLUGINS")}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1200, check=False)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        return {"error": (p.stderr or p.stdout)[-2000:]}
    return json.loads(line[7:])


def bench_training(model: str, backend) -> dict:
    from amygdala.training.schemas import TrainExample, TrainSettings
    from amygdala.training.trainer import ContextFrozenTrainer
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).cuda()
    trainer = ContextFrozenTrainer(hf, TrainSettings(progress=False))
    g = torch.Generator().manual_seed(2)
    vocab = hf.config.vocab_size
    batch = [TrainExample(context_ids=torch.randint(10, vocab - 10, (96,), generator=g).tolist(),
                          continuation_ids=torch.randint(10, vocab - 10, (32,), generator=g).tolist(), loss="sft")
             for _ in range(4)]
    trainer.step(batch, 0)  # warm (optimizer state, kernels)
    times = []
    for k in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        trainer.step(batch, k + 1)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    named = dict(hf.named_parameters())
    layer = [n for n in named if ".layers.1." in n]
    every = [n for n in named if n in set(backend.weight_names())]
    out = {"train_step_s": statistics.median(times)}
    for label, names in (("update_one_layer_s", layer), ("update_all_s", every)):
        tensors = {n: named[n].detach() for n in names}
        backend.write_weights(tensors)  # warm
        t0 = time.perf_counter()
        backend.write_weights(tensors)
        torch.cuda.synchronize()
        out[label] = time.perf_counter() - t0
        out[label.replace("_s", "_tensors")] = len(names)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="HuggingFace model directory (local)")
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--compare-graphs", action="store_true")
    ap.add_argument("--skip-training", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    from amygdala.engine.backends.vllm.backend import VllmBackend

    result = {"model": args.model, "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "prompt_tokens": PROMPT, "new_tokens": NEW}
    import vllm

    result["vllm"] = vllm.__version__
    backend = VllmBackend(args.model, tensor_parallel_size=args.tensor_parallel_size, gpu_memory_utilization=0.5)
    try:
        result["generation"] = bench_generation(backend)
        if not args.skip_training:
            result["training"] = bench_training(args.model, backend)
    finally:
        backend.close()
    if args.compare_graphs:
        graphs = bench_graphs(args.model, args.tensor_parallel_size)
        result["cuda_graphs_no_plugin_tok_s"] = graphs
        for b in BATCHES:
            key = f"batch_{b}"
            if key in graphs and key in result["generation"]:
                base = result["generation"][key]["baseline_tok_s"]
                result["generation"][key]["eager_cost_vs_graphs_pct"] = 100 * (graphs[key] - base) / graphs[key]
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
