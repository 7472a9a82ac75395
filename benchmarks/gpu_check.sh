#!/usr/bin/env bash
# Under 5 minutes on a fresh GPU machine: does the command line work there, and how long would the
# CIFAR-10 demo recipe (ResNet-18, batch 512, K 4096, 200 epochs) take end to end?
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]            # on a GPU machine
#   bash benchmarks/gpu_check.sh --dry-run [OUT_DIR]  # the same stages on the CPU at toy sizes (a smoke test)
#
# 1. `mocolab pretrain` on the GPU (bundled shapes, a kNN monitor, a checkpoint), then `--resume`;
# 2. the recipe on 50,000 synthetic uint8 32x32 images (+ 10,000 test images) kept on the GPU, no
#    download (benchmarks/throughput.py): images/s of the step (timed per epoch with CUDA events),
#    of the augmentation and of the kNN monitor, host syncs per step, a checkpoint write, and
#    epochs of fit with the kNN monitor and a checkpoint every epoch: the projected 200 epochs;
# 3. the same with channels_last and torch.compile (a cold compile takes minutes: up to 300 s, as much as
#    the budget leaves);
# 4. with channels_last alone, if time is left (optional).
# Each stage has its own time limit, and all of them together stay within $BUDGET seconds (default 285).
set -u
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT="${1:-${OUT:-runs/gpu_check}}"
mkdir -p "$OUT"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
export MOCOLAB_QUIET=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
BUDGET="${BUDGET:-285}"
status=0
stage() {  # stage SECONDS NAME COMMAND...: at most SECONDS, and never past the budget
    local limit="$1" name="$2"; shift 2
    local left=$((BUDGET - SECONDS))
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit} s)"
    if [ "$limit" -lt 20 ]; then
        echo "-- $name: skipped, the time budget is spent"
        [ "${OPTIONAL:-0}" -eq 1 ] || status=1
        return
    fi
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v '^\s*$'
    local rc=${PIPESTATUS[0]}
    echo "-- $name: exit $rc after $((SECONDS - t0)) s"
    [ "$rc" -eq 0 ] || status=1
}

if [ "$DRY" -eq 1 ]; then  # toy sizes on the CPU: checks that every stage's command runs
    DEV=cpu
    CLI=(--limit 256 --batch-size 32 --K 128 --arch convnet)
    TP=(--device cpu --arch convnet --width 8 --batch-size 32 --epochs 2 --num-images 128 --knn-bank 256
        --knn-queries 64 --reps 1 --threads 1)
else
    DEV=cuda
    CLI=(--limit 4096 --batch-size 256 --K 1024)
    TP=(--device cuda --arch resnet18-cifar --batch-size 512)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"

stage 60 cli "$PY" -m mocolab pretrain --device "$DEV" --data shapes "${CLI[@]}" --epochs 1 --knn-every 1 \
    --out "$OUT/cli" --overwrite
stage 45 cli_resume "$PY" -m mocolab pretrain --device "$DEV" --data shapes "${CLI[@]}" --epochs 2 --knn-every 1 \
    --out "$OUT/cli" --resume
if [ "$DRY" -eq 1 ]; then
    stage 60 recipe "$PY" benchmarks/throughput.py "${TP[@]}" --end-to-end --json "$OUT/recipe.json"
    stage 60 channels_last "$PY" benchmarks/throughput.py "${TP[@]}" --channels-last --no-syncs
    echo "== compile: not on the CPU (a cold compile takes minutes)"
else
    stage 100 recipe "$PY" benchmarks/throughput.py "${TP[@]}" --epochs 3 --num-images 50000 --end-to-end \
        --json "$OUT/recipe.json"
    stage 300 compile "$PY" benchmarks/throughput.py "${TP[@]}" --epochs 3 --num-images 20480 \
        --knn-bank 20000 --knn-queries 5000 --channels-last --compile --no-syncs
    OPTIONAL=1 stage 45 channels_last "$PY" benchmarks/throughput.py "${TP[@]}" --epochs 3 --num-images 20480 \
        --knn-bank 20000 --knn-queries 5000 --channels-last --no-syncs
fi
echo "gpu_check: $([ $status -eq 0 ] && echo all stages passed || echo SOME STAGES FAILED) in $SECONDS s, logs in $OUT"
exit $status
