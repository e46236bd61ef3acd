#!/usr/bin/env bash
# GPU checks of the vLLM backend: its own venv with the [vllm] extra, the GPU tests, the benchmark.
#
#   benchmarks/vllm_gpu.sh [MODEL_DIR]        (MODEL_DIR: a local HuggingFace model for the benchmark
#                                              and the real-model golden test; without it, only the
#                                              tiny-model tests run and the benchmark uses a tiny
#                                              model, which measures plumbing, not throughput)
# Environment: VENV (default .venv-vllm), PYTHON (default python3), OUT (default bench-out),
#              TORCH_SPEC (default: whatever vLLM pins; set it to force a CUDA torch build).
# Needs: Linux, a CUDA GPU, network access to PyPI (or a wheel cache) for the first run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-vllm}
PYTHON=${PYTHON:-python3}
OUT=${OUT:-bench-out}
MODEL=${1:-}
mkdir -p "$OUT"

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt" \
  || { echo "no nvidia-smi: this script needs a CUDA GPU" >&2; exit 2; }

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  if [ -n "${TORCH_SPEC:-}" ]; then "$VENV/bin/pip" install -q "$TORCH_SPEC"; fi
  # vLLM brings its own CUDA torch; the project's CPU pin is not used here
  "$VENV/bin/pip" install -q -e ".[vllm,dev]"
fi
"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee "$OUT/versions.txt"

export VLLM_USE_V2_MODEL_RUNNER=0
if [ -n "$MODEL" ]; then export AMYGDALA_VLLM_GOLDEN_MODEL="$MODEL"; fi
set +e
OMP_NUM_THREADS=4 timeout 1800 "$VENV/bin/python" -m pytest tests/test_vllm_gpu.py tests/test_vllm_cpu.py \
  tests/test_backend_protocol.py -q -rs -m "gpu or not gpu" 2>&1 | tee "$OUT/tests.txt"
tests_rc=${PIPESTATUS[0]}
set -e

if [ -z "$MODEL" ]; then
  MODEL="$OUT/tiny-model"
  "$VENV/bin/python" -c "from pathlib import Path; from amygdala.engine.testing import save_tiny_model; save_tiny_model(Path('$MODEL'))"
  echo "benchmark on the tiny model: the numbers show overhead ratios of the plumbing, not real throughput" >&2
fi
timeout 3600 "$VENV/bin/python" benchmarks/vllm_bench.py --model "$MODEL" --out "$OUT/bench.json" --compare-graphs \
  2>&1 | tee "$OUT/bench.txt"
echo "tests exit code: $tests_rc; results in $OUT/"
exit "$tests_rc"
