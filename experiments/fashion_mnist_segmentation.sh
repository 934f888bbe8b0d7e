#!/usr/bin/env bash
# Segmentation transfer on the built-in Fashion-MNIST canvases: UperNet on the MAE-pretrained tiny ViT against
# the same network from scratch, same budget. Reuses the pretraining of experiments/fashion_mnist_transfer.sh
# (run here if missing). Each stage is skipped when its output exists, so a stopped run picks up where it was.
# Results: results/fashion_mnist_segmentation.md (python experiments/summarize_segmentation.py).
#   bash experiments/fashion_mnist_segmentation.sh [OUT_DIR] [TRAIN_CANVASES] [EPOCHS]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/fashion_mnist_segmentation}
CANVASES=${2:-20000}
EPOCHS=${3:-1}
PRETRAINED=${PRETRAINED:-runs/fashion_mnist_transfer/pretrain/final}
COMMON=(--working_directory "$OUT" --log_with none --max_samples "$CANVASES" --max_val_samples 2000 --epochs "$EPOCHS" --eval_every 250
        --resume_from_checkpoint latest --checkpointing_steps 250)

stage() {  # stage NAME DONE_FILE COMMAND...
  local name=$1 done_file=$2; shift 2
  if [ -e "$done_file" ]; then echo "== $name: done already"; return; fi
  echo "== $name: $*"
  local start=$(date +%s)
  "$@"
  echo "{\"stage\": \"$name\", \"seconds\": $(( $(date +%s) - start )), \"command\": \"$*\", \"machine\": \"$(nproc) CPU cores, $(uname -m), torch $(python -c 'import torch; print(torch.__version__)')\"}" >> "$OUT/stages.jsonl"
}

mkdir -p "$OUT"
if [ ! -e "$PRETRAINED/model.safetensors" ]; then
  bash experiments/fashion_mnist_transfer.sh  # its pretraining stage writes $PRETRAINED
fi
stage segmentation_mae "$OUT/segmentation_mae/results.json" \
  accelerate launch finetune_segmentation.py "${COMMON[@]}" --experiment_name segmentation_mae \
    --path_to_backbone_checkpoint "$PRETRAINED"
stage segmentation_scratch "$OUT/segmentation_scratch/results.json" \
  accelerate launch finetune_segmentation.py "${COMMON[@]}" --experiment_name segmentation_scratch --from_scratch
python experiments/summarize_segmentation.py "$OUT" --output results/fashion_mnist_segmentation.md \
  --picture docs/segmentation_predictions.png
