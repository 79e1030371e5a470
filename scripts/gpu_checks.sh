#!/usr/bin/env bash
# The GPU checks of issue 16 on a lent GPU machine (the `device` tool's `run`), in two calls
# that each fit its 10-minute limit (a session has 15 minutes of device time in all):
#
#   run(command="bash scripts/gpu_checks.sh kernels", timeout_s=300)   # steps 1-2
#   run(command="bash scripts/gpu_checks.sh scale", timeout_s=590)     # step 3
#
# 1. the kernel tests on CUDA (each Triton kernel against its torch twin) and the dtype tests;
# 2. scripts/bench_kernels.py (Llama-3-8B shapes, Triton vs torch, ratios in one run);
# 3. a Llama-3-8B-shaped random checkpoint (32 layers, hidden 4096, intermediate 14336, 8 KV
#    heads, bf16) compressed from disk with 128 windows of 2048 tokens, Wanda then SparseGPT,
#    each in a fresh process: end-to-end time and peak GPU memory (bounds: Wanda < 1 min,
#    SparseGPT < 5 min).
#
# Everything goes to $OUT (gpu_checks.log, scale.json), which the tool brings back;
# record device, shapes and ratios in docs/benchmarks.md. Nothing is installed: the machine's
# image has torch, triton, transformers, safetensors, numpy, scipy, matplotlib, tqdm and pyyaml,
# and polyprune runs from the checkout. Gemma 3 270M is not run there: its package (240 MB) is
# larger than what a call may carry (64 MiB) and that machine reaches no registry.
#
# GPU_CHECKS_SMALL=1 runs the same steps at toy sizes on whatever device is there (the CPU
# here), to check the script itself before spending device time.
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${1:-all}
case "$PART" in all|kernels|scale) ;; *) echo "part $PART: allowed all, kernels, scale" >&2; exit 2;; esac
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3}
LOG="$OUT/gpu_checks.log"
status=0

step() {  # step NAME SECONDS CMD...: run with a time limit, log everything, remember failures
    local name=$1 limit=$2
    shift 2
    echo "== $(date +%T) $name" | tee -a "$LOG"
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "== $(date +%T) $name: exit $rc" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || status=1
}

if [ "${GPU_CHECKS_SMALL:-0}" = 1 ]; then
    DEVICE=cpu TOKENS="256" LAYERS=2 HIDDEN=256 INTER=512 HEADS=4 KV=2 VOCAB=1000 N=4 SEQ=64
    TEST_LIMIT=1200  # the Triton interpreter is slow
    export TRITON_INTERPRET=1
else
    DEVICE=cuda TOKENS="16384 65536" LAYERS=32 HIDDEN=4096 INTER=14336 HEADS=32 KV=8
    VOCAB=128256 N=128 SEQ=2048 TEST_LIMIT=180
fi

step "device" 60 "$PY" -c "
import torch, transformers, triton
print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)
print('cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-')"
if [ "$PART" != scale ]; then
    step "kernel tests" "$TEST_LIMIT" "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py \
        tests/test_dtype.py tests/test_langstats.py
    if [ "$DEVICE" = cuda ]; then
        step "bench_kernels" 100 "$PY" scripts/bench_kernels.py --tokens $TOKENS
    fi
fi
[ "$PART" = kernels ] && exit $status
step "8B-shaped Wanda + SparseGPT" 500 "$PY" scripts/bench_scale.py --layers $LAYERS \
    --hidden $HIDDEN --intermediate $INTER --heads $HEADS --kv-heads $KV --vocab $VOCAB \
    --nsamples $N --seqlen $SEQ --method wanda,sparsegpt --device $DEVICE --shard-size 4GB \
    --dir /tmp/gpu_checks_ckpt --json "$OUT/scale.json"
exit $status
