#!/usr/bin/env bash
# The prepared GPU run: what a session lent a GPU runs once, in under 5 minutes.
#
#   bash benchmarks/device_run.sh            # on the GPU: results under benchmarks/results/gpu/
#   bash benchmarks/device_run.sh --quick    # the same steps on the CPU with tiny models, in seconds
#
# Steps (each a benchmarks/throughput.py run, side by side in one process, medians of
# interleaved repeats, peak memory on CUDA):
#   1. inference at batch 256, fp16 and bf16, DeiT-S and DeiT-B: unpatched, EViT 0.7 / 0.5,
#      EViT w/o fusion, ToMe-style merging, DynamicViT and width pruning at EViT's MACs (0.7)
#   2. batch-1 latency, fp16, DeiT-S and DeiT-B: unpatched, EViT 0.7 / 0.5, and the token-count
#      bound at those counts (what any token method could gain there)
#   3. a training step (forward, backward, AdamW) at batch 128, bf16, DeiT-S, every method at 0.7
#   4. torch.compile with CUDA graphs (mode reduce-overhead), bf16, DeiT-S at batch 1, every
#      token method at 0.7 and DynamicViT, each beside its eager self, with its graph-break count
#   5. rotary-position ViTs (EVA-02-S, DINOv3-S) beside DeiT-S, bf16, batch 1 and 256, EViT at
#      0.7: the speed-up, its MAC ratio and what following the positions costs
#      (benchmarks/rotary_speed.py)
# --quick swaps in a 4-block DeiT-Tiny at 32 px, small batches, one repeat, and step 4 for
# ToMe-style merging alone in the default mode, and step 5 with 4-block models at 32 px, so CI
# can run it and it cannot rot.
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=0
OUT=benchmarks/results/gpu
for argument in "$@"; do
    case "$argument" in
        --quick) QUICK=1 ;;
        --out=*) OUT="${argument#--out=}" ;;
        *) echo "error: unknown argument $argument; use --quick and/or --out=FOLDER" >&2; exit 2 ;;
    esac
done
mkdir -p "$OUT"

if [ "$QUICK" = 1 ]; then
    SMALL=(--models deit_tiny_patch16_224 --model-kwargs '{"img_size": 32, "patch_size": 4, "depth": 4}' --layers 1 2 3)
    BASE=(--models deit_tiny_patch16_224 --model-kwargs '{"img_size": 32, "patch_size": 4, "depth": 4}' --layers 1 2 3)
    BIG_BATCH=4; TRAIN_BATCH=4; REPEATS=1; WARMUP=1; DTYPES=(bf16); DEVICE=cpu; LIMIT=300
    ROTARY=(--model-kwargs '{"img_size": 32, "patch_size": 4, "depth": 4}' --layers 1 2 3)
else
    SMALL=(--models deit_small_patch16_224)
    BASE=(--models deit_small_patch16_224 deit_base_patch16_224)
    BIG_BATCH=256; TRAIN_BATCH=128; REPEATS=10; WARMUP=3; DTYPES=(fp16 bf16); DEVICE=cuda; LIMIT=150
    ROTARY=()
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv"
fi
COMMON=(--device "$DEVICE" --repeats "$REPEATS" --warmup "$WARMUP")
ALL_METHODS=(evit evit-no-fusion tome dynamicvit width-pruning)
if [ "$QUICK" = 1 ]; then
    COMPILED=(--methods tome --compile-mode default)
else
    COMPILED=(--methods evit evit-no-fusion random tome evit-training-free dynamicvit --compile-mode reduce-overhead)
fi

step() {  # step NAME ARGS...: one throughput run, its tables under $OUT/NAME.*
    local name=$1
    shift
    echo "== $name"
    timeout "$LIMIT" python3 benchmarks/throughput.py "$@" "${COMMON[@]}" --out "$OUT/$name"
}

for dtype in "${DTYPES[@]}"; do
    step "inference_b${BIG_BATCH}_${dtype}" "${BASE[@]}" --batch-sizes "$BIG_BATCH" --dtype "$dtype" \
        --methods "${ALL_METHODS[@]}" --keep-rates 0.7
    step "inference_b${BIG_BATCH}_${dtype}_evit" "${BASE[@]}" --batch-sizes "$BIG_BATCH" --dtype "$dtype" \
        --keep-rates 0.7 0.5
done
step "latency_b1_${DTYPES[0]}" "${BASE[@]}" --batch-sizes 1 --dtype "${DTYPES[0]}" --keep-rates 0.7 0.5 --bound
step "train_b${TRAIN_BATCH}_bf16" "${SMALL[@]}" --train --batch-sizes "$TRAIN_BATCH" --dtype bf16 \
    --methods "${ALL_METHODS[@]}" --keep-rates 0.7
LIMIT=$((LIMIT * 2)) step "compiled_b1_bf16" "${SMALL[@]}" --compile --with-eager --batch-sizes 1 --dtype bf16 \
    --keep-rates 0.7 "${COMPILED[@]}"
echo "== rotary_b1_b${BIG_BATCH}_bf16"
timeout "$LIMIT" python3 benchmarks/rotary_speed.py "${ROTARY[@]}" --batch-sizes 1 "$BIG_BATCH" --dtype bf16 \
    --device "$DEVICE" --repeats "$REPEATS" --out "$OUT/rotary_b1_b${BIG_BATCH}_bf16"
echo "results in $OUT"
