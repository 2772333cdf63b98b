#!/usr/bin/env bash
# Rollout speed on a GPU: the hf engine against vLLM on a random 1.1B-parameter Llama (TinyLlama's
# shape, bf16), 64 prompts x 256 new tokens; the goal is vllm >= 3x hf in tokens/s. Needs an
# environment with soupkit and the CUDA vllm package (pip install -e '.[vllm]'). Results go to
# ${OUT:-benchmarks/.work}/rollout-gpu.json and stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
"$PY" -c "import torch, vllm; assert torch.cuda.is_available(), 'no CUDA device'; print('vllm', vllm.__version__, torch.cuda.get_device_name())"
mkdir -p "${OUT:-benchmarks/.work}"
HF_HUB_OFFLINE=1 "$PY" benchmarks/rollout_speed.py --size 1b --prompts 64 --tokens 256 --memory-fraction 0.5 \
    --repeats 3 --work "${WORK:-benchmarks/.work/rollout-speed}" --json "${OUT:-benchmarks/.work}/rollout-gpu.json"
