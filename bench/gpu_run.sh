#!/usr/bin/env bash
# One-shot GPU session (device time is ~15 minutes in all): prepared by bench/gpu_prepare.sh, run
# on the device machine as `bash bench/gpu_run.sh` with carry [".gpu"]. In order:
#   1. the CUDA tests (Triton kernels, CUDA dispatch), TF32 off so exact comparisons hold;
#   2. the GPU benchmark (`ghn-onnx bench --device cuda`);
#   3. training on the GPU from the shipped checkpoint (the best validated campaign weights) into
#      runs/gpu, until GPU_MINUTES (default 14) after the start have passed, with a safe margin.
# Everything worth keeping lands in $OUT (at most 8 files come back): logs, bench JSON, the
# trained GHN and its trainer state. The run forks the campaign (a GPU run sees a subset of the
# images), so its checkpoint is adopted only if its validation beats the campaign's.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
MINUTES="${GPU_MINUTES:-14}"
OUT="${OUT:-out/gpu}"
mkdir -p "$OUT"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export GHN_ONNX_SHARED="$(pwd)/.gpu/shared"
export NVIDIA_TF32_OVERRIDE=0 TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=0
PY=python3
left() { echo $(( START + MINUTES * 60 - $(date +%s) )); }

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1

# 1. CUDA tests (the kernel tests set no TF32 themselves; the override makes sure)
timeout 240 $PY -m pytest -q -p no:cacheprovider -x tests/test_kernels.py tests/test_flat_decode.py \
  tests/test_message_passing_engines.py -k "cuda or triton" > "$OUT/cuda_tests.log" 2>&1
echo "cuda tests exit $?" >> "$OUT/env.txt"

# 2. GPU bench
timeout 180 $PY -m ghn_onnx.cli bench --device cuda --repeats 10 --json "$OUT/bench-cuda.json" \
  > "$OUT/bench.log" 2>&1
echo "bench exit $?" >> "$OUT/env.txt"

# 2b. GHN-3-T end to end (ghn3-parity is not carried: random GHN-3-T on torchvision exports);
#     its table goes into bench.log, so the files that come back stay at 8
timeout 150 $PY -m ghn_onnx.benchmarks.ghn3 --device cuda --rounds 5 --threads 0 >> "$OUT/bench.log" 2>&1
echo "ghn3 bench exit $?" >> "$OUT/env.txt"

# 3. training until the deadline (60 s margin for the final save and the copy back)
BUDGET=$(( $(left) - 60 ))
if [ "$BUDGET" -gt 60 ]; then
  timeout "$BUDGET" $PY -m ghn_onnx.cli train --out runs/gpu --data .gpu/cifar10-subset.zip --device cuda \
    --init ghn_onnx/checkpoints/ghn2_cifar10.safetensors --steps 100000 --warmup 20 --batch-size 64 --meta-batch 8 \
    --save-every 50 --eval-every 0 --seed 7 > "$OUT/train.log" 2>&1
  echo "train exit $? after ${BUDGET}s budget" >> "$OUT/env.txt"
  cp runs/gpu/ghn.safetensors runs/gpu/trainer.json runs/gpu/log.jsonl "$OUT/" 2>/dev/null
fi
tail -c 4000 "$OUT/train.log" > "$OUT/train_tail.log" 2>/dev/null; rm -f "$OUT/train.log"
ls -la "$OUT"
