#!/usr/bin/env bash
# One-GPU check for derm-accel (H100/H200 class), under 8 minutes:
#   - efficientnet_b3 training steps at batch 64 in fp32, bf16 and fp16 (images/s, peak memory), bf16 at 288 px
#   - inference images/s at batch 256: fp32, bf16, bf16 + torch.compile (224 and 288 px)
#   - bf16 vs fp32 (TF32 off) on held-out images: top-1 agreement and max probability difference
#   - a training run fed by the DataLoader from stored 427x320 JPEGs vs the same steps on one fixed tensor:
#     does the input pipeline keep the GPU busy?
# Writes gpu_check.json and gpu_check.md into $OUT if set, else bench_results/; prints a summary.
#
# Usage:  bash benchmarks/gpu_check.sh
#         GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh      # toy sizes on the CPU (also automatic without CUDA)
# Knobs:  GPU_CHECK_MODEL, GPU_CHECK_SIZES=224,288, GPU_CHECK_TRAIN_BATCH=64, GPU_CHECK_INFER_BATCH=256,
#         GPU_CHECK_LOADER_IMAGES=2048, GPU_CHECK_WORKERS, GPU_CHECK_BUDGET_S=420 (later sections skip past it),
#         PYTHON=/path/to/python to pick the interpreter.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

# ---- 1. Python environment (separable: set PYTHON to skip it) ------------------------------------------
# The GPU image ships a python3 with torch, torchvision, timm and psutil but maybe not `datasets`; the check
# needs no more than that (without `datasets` the loader reads the same JPEG bytes from memory instead of
# Arrow, and says so in the JSON). The repo is used from source through PYTHONPATH: no install, no network.
# Elsewhere, with network, a venv is made once: python3 -m venv .venv-gpu && .venv-gpu/bin/pip install -e .
pick_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
  for cand in python3 "$REPO/.venv/bin/python" "$REPO/.venv-gpu/bin/python"; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch, torchvision, timm, psutil" >/dev/null 2>&1; then
      echo "$cand"; return
    fi
  done
  python3 -m venv "$REPO/.venv-gpu" >&2
  "$REPO/.venv-gpu/bin/pip" install -q -e "$REPO" >&2
  echo "$REPO/.venv-gpu/bin/python"
}
PY="$(pick_python)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
echo "[gpu_check] python: $PY"

# ---- 2. The check ---------------------------------------------------------------------------------------
exec "$PY" "$REPO/benchmarks/gpu_check.py"
