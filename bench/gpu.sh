#!/usr/bin/env bash
# The GPU checks, as one script for a lent H100/H200 (bench/README in BENCHMARKS.md says how to run it).
# Each step has its own time limit so one slow step cannot eat the others; results land in $OUT (or bench/out).
set -u
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 MUSE_NO_PROGRESS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"

echo "== 1. MFU, ~350M llama+muon: plain+compile vs FSDP2(ws=1)+compile (seq 2048, bf16)"
timeout 200 python3 bench/mfu.py --config llama+muon --compile --fsdp --depth 24 --d-model 1024 --seq-len 2048 \
  --batch-size 8 --steps 8 --warmup 3 --json-out "$OUT/mfu_llama.json" 2>&1 | grep -v Warning | tee "$OUT/mfu_llama.txt"
echo "== 2. MFU, the gpt2+adamw baseline of the same shape"
timeout 90 python3 bench/mfu.py --config gpt2+adamw --compile --depth 24 --d-model 1024 --seq-len 2048 \
  --batch-size 8 --steps 8 --warmup 3 --json-out "$OUT/mfu_gpt2.json" 2>&1 | grep -v Warning | tee "$OUT/mfu_gpt2.txt"
echo "== 3. CUDA-only tests (pinned-memory loader, bf16 Muon)"
timeout 45 python3 -m pytest -q -p no:cacheprovider tests/test_loader.py tests/test_optim.py -k cuda 2>&1 | tail -3 | tee "$OUT/cuda_tests.txt"
if [ -f bench/engine.py ]; then
  echo "== 4. engine throughput on the GPU (bf16)"
  timeout 90 python3 bench/engine.py --device cuda 2>&1 | grep -v Warning | tee "$OUT/engine.txt"
fi
echo "== 5. batch-1 decode of a ~1B bf16 model as a fraction of measured bandwidth (issue 5: >= 75%)"
timeout 150 python3 bench/decode_bandwidth.py --device cuda --json-out "$OUT/decode_bw.json" 2>&1 | grep -v Warning \
  | tee "$OUT/decode_bw.txt"
echo "== done"
