#!/usr/bin/env bash
# A few minutes on a GPU: is the CIFAR-10 recipe fast there, and does the command line work?
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#
# 1. `mocolab pretrain` end to end on the GPU (bundled shapes, 2 short epochs, a checkpoint, --resume);
# 2. the cifar10-colab recipe (CIFAR ResNet-18, batch 512, K 4096, split-BN 8, bf16 autocast) for 3 whole
#    epochs of 50,000 synthetic uint8 32x32 images kept on the GPU (no download needed), with a
#    CIFAR-sized kNN monitor at the end: images/s, augmentation ("data loading") share of the step,
#    peak GPU memory, projected time of 200 epochs;
# 3. the same step with channels_last, and with torch.compile.
# Each stage has its own time limit; the whole script stays under 5 minutes.
set -u
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-runs/gpu_check}}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
export MOCOLAB_QUIET=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
stage() {  # stage SECONDS NAME COMMAND...
    local limit="$1" name="$2"; shift 2
    echo "== $name"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v "^\s*$"
    local rc=${PIPESTATUS[0]}
    echo "-- $name: exit $rc after $((SECONDS - t0)) s"
    [ "$rc" -eq 0 ] || status=1
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"

stage 50 cli $PY -m mocolab pretrain --device cuda --data shapes --limit 4096 --epochs 2 --batch-size 256 \
    --knn-every 1 --out "$OUT/cli" --overwrite
stage 40 cli_resume $PY -m mocolab pretrain --device cuda --data shapes --limit 4096 --epochs 3 --batch-size 256 \
    --knn-every 1 --out "$OUT/cli" --resume
stage 90 recipe $PY benchmarks/throughput.py --device cuda --arch resnet18-cifar convnet --batch-size 512 \
    --epochs 3 --num-images 50000 --knn
stage 30 channels_last $PY benchmarks/throughput.py --device cuda --arch resnet18-cifar --batch-size 512 \
    --steps 30 --warmup 3 --channels-last
stage 80 compile $PY benchmarks/throughput.py --device cuda --arch resnet18-cifar --batch-size 512 \
    --steps 30 --warmup 5 --channels-last --compile
echo "gpu_check: $([ $status -eq 0 ] && echo all stages passed || echo SOME STAGES FAILED), logs in $OUT"
exit $status
