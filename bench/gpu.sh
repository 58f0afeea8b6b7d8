#!/usr/bin/env bash
# The GPU checks, as one script for a lent H100/H200 (bench/README in BENCHMARKS.md says how to run it).
# Each step has its own time limit so one slow step cannot eat the others; results land in $OUT (or bench/out).
# All steps take ~15 minutes, more than one device command may run: pick some with ONLY, e.g. ONLY="1 2" then
# ONLY="4 5 6".
set -u
ONLY=${ONLY:-1 2 3 4 5 6}
step() { [[ " $ONLY " == *" $1 "* ]]; }
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 MUSE_NO_PROGRESS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"

if step 1; then
echo "== 1. MFU, ~350M llama+muon: plain+compile vs FSDP2(ws=1)+compile (seq 2048, bf16)"
timeout 200 python3 bench/mfu.py --config llama+muon --compile --fsdp --depth 24 --d-model 1024 --seq-len 2048 \
  --batch-size 8 --steps 8 --warmup 3 --json-out "$OUT/mfu_llama.json" 2>&1 | grep -v Warning | tee "$OUT/mfu_llama.txt"
fi
if step 2; then
echo "== 2. MFU, the gpt2+adamw baseline of the same shape"
timeout 90 python3 bench/mfu.py --config gpt2+adamw --compile --depth 24 --d-model 1024 --seq-len 2048 \
  --batch-size 8 --steps 8 --warmup 3 --json-out "$OUT/mfu_gpt2.json" 2>&1 | grep -v Warning | tee "$OUT/mfu_gpt2.txt"
fi
if step 3; then
echo "== 3. CUDA-only tests (pinned-memory loader, bf16 Muon)"
timeout 45 python3 -m pytest -q -p no:cacheprovider tests/test_loader.py tests/test_optim.py -k cuda 2>&1 | tail -3 | tee "$OUT/cuda_tests.txt"
fi
if step 4; then
  echo "== 4. engine throughput on the GPU (bf16)"
  timeout 90 python3 bench/engine.py --device cuda 2>&1 | grep -v Warning | tee "$OUT/engine.txt"
fi
if step 5; then
echo "== 5. batch-1 decode of a ~1B bf16 model as a fraction of measured bandwidth (issue 5: >= 75%)"
timeout 150 python3 bench/decode_bandwidth.py --device cuda --json-out "$OUT/decode_bw.json" 2>&1 | grep -v Warning \
  | tee "$OUT/decode_bw.txt"
fi
if step 6; then
  echo "== 6. speculative decoding at batch 1: a trained depth-12 target with a trained depth-2 draft (goal >= 1.8x)"
  rm -rf runs/gpu-sd runs/gpu-sd-draft
  timeout 60 python3 -m muse prepare --out runs/gpu-sd >/dev/null &&
  timeout 150 python3 -m muse train runs/gpu-sd --depth 12 --max-steps 400 --eval-every 0 2>&1 | tail -2 &&
  mkdir -p runs/gpu-sd-draft && ln -s ../gpu-sd/data runs/gpu-sd-draft/data &&
  timeout 60 python3 -m muse train runs/gpu-sd-draft --depth 2 --max-steps 400 --eval-every 0 2>&1 | tail -2 &&
  timeout 120 python3 bench/spec_decode.py --target runs/gpu-sd --draft runs/gpu-sd-draft --k 2 4 6 \
    --json-out "$OUT/spec_decode.json" 2>&1 | grep -v Warning | tee "$OUT/spec_decode.txt"
fi
echo "== done"
