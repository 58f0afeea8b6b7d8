#!/usr/bin/env bash
# The GPU checks, as one script for a lent H100/H200 (BENCHMARKS.md sections 4 and 5 say how to run it).
# Each step has its own time limit so one slow step cannot eat the others; results land in $OUT (or bench/out),
# and one summary table (step, status, seconds, headline) ends the output (also $OUT/summary.md).
# All steps take more than one device command (~20 minutes): pick some with ONLY, e.g. ONLY="1 2 7" then
# ONLY="4 5 6", then ONLY="8 9 10".
#
# SMOKE=1 runs every step on the CPU at a tiny shape (~45 s of CPU time in all, most of it interpreter
# start-ups), so the script cannot rot between GPU loans: the same commands and flags, only the sizes, the
# device and the time limits differ.
# tests/test_gpu_smoke.py runs it. Compile and FSDP are left out of the smoke run (minutes on a CPU).
set -u
ONLY=${ONLY:-1 2 3 4 5 6 7 8 9 10}
SMOKE=${SMOKE:-0}
step() { [[ " $ONLY " == *" $1 "* ]]; }
OUT=${OUT:-bench/out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
: > "$OUT/summary.tsv"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 MUSE_NO_PROGRESS=1

if [[ $SMOKE == 1 ]]; then
  DEV=cpu
  # tiny shapes: (what the GPU run uses is in the else branch)
  MFU_SHAPE="--depth 2 --d-model 64 --vocab-size 256 --seq-len 32 --batch-size 2 --steps 2 --warmup 1"
  MFU_FAST=""  # no --compile / --fsdp on the CPU smoke run
  CURVE_SHAPE="--depth 2 --d-model 64 --vocab-size 256 --seq-len 32 --batch-size 2 --steps 4 --warmup 1"
  T() { echo 150; }  # every step's limit in smoke mode (5-50 s each on a 2-vCPU machine under load 12)
  echo "SMOKE: every step on the CPU at a tiny shape" | tee "$OUT/gpu.txt"
else
  DEV=cuda
  MFU_SHAPE="--depth 24 --d-model 1024 --seq-len 2048 --batch-size 8 --steps 8 --warmup 3"
  MFU_FAST="--compile"
  # 200 steps of a ~120M model, bf16, the fused (chunked) cross-entropy on and off: curves within bf16 noise
  CURVE_SHAPE="--depth 12 --d-model 768 --seq-len 1024 --batch-size 8 --steps 200 --warmup 3"
  T() { echo "$1"; }
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
  $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
fi

# run N "what" LIMIT_S CMD...: runs CMD under `timeout`, output to $OUT/stepN.txt and the screen, one row
# for the summary (rc 124 = ran past its limit). The headline is the step's last line that starts with "|"
# or "loss curves" (a table row or the loss-curve comparison), else its last line.
run() {
  local n=$1 what=$2 limit=$3; shift 3
  echo "== $n. $what"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | grep -v Warning | tee "$OUT/step$n.txt"
  local rc=${PIPESTATUS[0]} secs=$((SECONDS - t0))
  local status=ok
  [[ $rc == 124 ]] && status="timeout ($limit s)"
  [[ $rc != 0 && $rc != 124 ]] && status="FAILED (rc $rc)"
  local head
  head=$(grep -E '^\||^loss curves|^[0-9]+ passed|collected|skipped|deselected' "$OUT/step$n.txt" | grep -v -- '---' | tail -1)
  [[ -z $head ]] && head=$(grep -v '^[[:space:]]*$' "$OUT/step$n.txt" | tail -1)
  printf '%s\t%s\t%s\t%s\t%s\n' "$n" "$what" "$status" "$secs" "${head//$'\t'/ }" >> "$OUT/summary.tsv"
}

if step 1; then
run 1 "MFU, ~350M llama+muon: plain+compile vs FSDP2(ws=1)+compile (seq 2048, bf16)" "$(T 200)" \
  $PY bench/mfu.py --device $DEV --config llama+muon $MFU_FAST $([[ $SMOKE == 1 ]] || echo --fsdp) $MFU_SHAPE \
  --json-out "$OUT/mfu_llama.json"
fi
if step 2; then
run 2 "MFU, the gpt2+adamw baseline of the same shape" "$(T 90)" \
  $PY bench/mfu.py --device $DEV --config gpt2+adamw $MFU_FAST $MFU_SHAPE --json-out "$OUT/mfu_gpt2.json"
fi
if step 3; then
  if [[ $SMOKE == 1 ]]; then  # on a CPU every CUDA test skips: collecting them is the check
    run 3 "CUDA-only tests (pinned-memory loader, bf16 Muon): collected" 150 \
      $PY -m pytest -q -p no:cacheprovider --collect-only tests/test_loader.py tests/test_optim.py -k cuda
  else
    run 3 "CUDA-only tests (pinned-memory loader, bf16 Muon)" 45 \
      $PY -m pytest -q -p no:cacheprovider tests/test_loader.py tests/test_optim.py -k cuda
  fi
fi
if step 4; then
  run 4 "engine throughput on the GPU (bf16)" "$(T 90)" \
    $PY bench/engine.py --device $DEV $([[ $SMOKE == 1 ]] && echo --smoke)
fi
if step 5; then
  run 5 "batch-1 decode of a ~1B bf16 model as a fraction of measured bandwidth (goal >= 75%)" "$(T 150)" \
    $PY bench/decode_bandwidth.py --device $DEV --json-out "$OUT/decode_bw.json" \
    $([[ $SMOKE == 1 ]] && echo --depth 2 --d-model 64 --vocab-size 256 --prompt-len 8 --max-tokens 8 --repeats 1 --copy-mib 8)
fi
if step 6; then
  # a trained target with a trained draft (goal >= 1.8x at batch 1); the smoke run trains 2 steps on a tiny corpus
  export sd=$OUT/sd PY DEV
  if [[ $SMOKE == 1 ]]; then
    export PREP="$sd/corpus.txt --vocab-size 300" TGT="--depth 1 --max-steps 2 --seq-len 32 --batch-size 2"
    export DRF=$TGT SPEC="--prompts 2 --prompt-len 8 --max-tokens 8 --k 2"
  else
    export PREP="" TGT="--depth 12 --max-steps 400" DRF="--depth 2 --max-steps 400" SPEC="--k 2 4 6"
  fi
  spec_step() {
    set -e
    rm -rf "$sd" && mkdir -p "$sd/draft"
    if [[ $SMOKE == 1 ]]; then
      $PY -c "import sys; open(sys.argv[1], 'w').write(''.join(f'line {i}: to be or not to be, that is the question.\n' for i in range(400)))" "$sd/corpus.txt"
    fi
    $PY -m muse prepare --out "$sd/target" $PREP >/dev/null
    $PY -m muse train "$sd/target" --device "$DEV" --eval-every 0 $TGT 2>&1 | tail -1
    ln -s ../target/data "$sd/draft/data"
    $PY -m muse train "$sd/draft" --device "$DEV" --eval-every 0 $DRF 2>&1 | tail -1
    $PY bench/spec_decode.py --target "$sd/target" --draft "$sd/draft" --device "$DEV" $SPEC --json-out "$OUT/spec_decode.json"
  }
  export -f spec_step
  export SMOKE OUT
  run 6 "speculative decoding at batch 1: a trained target with a trained draft (goal >= 1.8x)" "$(T 390)" bash -c spec_step
fi
if step 7; then
  # issue #20 part 4: the chunked cross-entropy (no (tokens, vocab) fp32 logits) on and off, same seed and
  # batches: tokens/s, MFU and peak memory of each, and the two bf16 loss curves (largest difference).
  run 7 "training, fused (chunked) cross-entropy off (0) vs on (8192 rows): speed, memory, loss curves" "$(T 300)" \
    $PY bench/mfu.py --device $DEV --config llama+muon $MFU_FAST $CURVE_SHAPE --loss-chunk 0 --loss-chunk 8192 \
    --compare-losses --json-out "$OUT/fused_ce.json"
fi

# issue #20 parts 1-3: the engine's GPU paths. The smoke run takes flex-eager (compiled flex is refused on a CPU)
if step 8; then
  run 8 "engine on the GPU, flex attention backend (compiled FlexAttention over the paged pool)" "$(T 150)" \
    $PY bench/engine.py --device $DEV $([[ $SMOKE == 1 ]] && echo --smoke --attention-backend flex-eager || echo --attention-backend flex)
fi
if step 9; then
  # -k cuda_graphs_replay, not -k cuda: the file's name holds "cuda" and would select all of it.
  # On a CPU the test skips and the suite runs the file's CPU tests anyway: collecting the selection is the check
  run 9 "CUDA graphs: capture + replay vs the eager static path, engine outputs vs the reference" "$(T 120)" \
    $PY -m pytest -q -p no:cacheprovider $([[ $SMOKE == 1 ]] && echo --collect-only) tests/test_cuda_graph.py -k cuda_graphs_replay
fi
if step 10; then
  run 10 "engine decode, CUDA graphs on vs off (outputs identical, exit 1 otherwise); host us per decode step at 1 and 32 vs a 1B step" "$(T 300)" \
    $PY bench/engine.py --device $DEV --skip-throughput --skip-prefix --decode-paths --host-cost 1 32 \
    $([[ $SMOKE == 1 ]] && echo --smoke || echo --concurrency 1 8 32 --num-requests 64 --output-len 64 128) \
    --json-out "$OUT/engine_graphs.json"
fi

[[ $SMOKE == 1 ]] && echo "== summary (SMOKE run on the CPU: tiny shapes, the numbers mean nothing)" || echo "== summary"
$PY - "$OUT/summary.tsv" <<'EOF' | tee "$OUT/summary.md"
import sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1]) if line.strip()]
print("| step | what | status | s | headline |")
print("|---:|---|---|---:|---|")
for n, what, status, secs, head in rows:
    print(f"| {n} | {what} | {status} | {secs} | {head.strip().strip('|').strip().replace('|', '/')} |")
EOF
echo "== done"
