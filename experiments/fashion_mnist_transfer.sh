#!/usr/bin/env bash
# Pretrain the tiny MAE on Fashion-MNIST, then linear-probe it, fine-tune it, and train the same ViT from
# scratch with the same fine-tuning budget. Each stage is skipped when its output exists, so a stopped run
# picks up where it was. Results: results/fashion_mnist_transfer.md (python experiments/summarize_transfer.py).
#   bash experiments/fashion_mnist_transfer.sh [OUT_DIR] [PRETRAIN_EPOCHS] [FINETUNE_EPOCHS]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/fashion_mnist_transfer}
PRETRAIN_EPOCHS=${2:-5}
FINETUNE_EPOCHS=${3:-3}
COMMON=(--working_directory "$OUT" --log_with none)

stage() {  # stage NAME DONE_FILE COMMAND...
  local name=$1 done_file=$2; shift 2
  if [ -e "$done_file" ]; then echo "== $name: done already"; return; fi
  echo "== $name: $*"
  local start=$(date +%s)
  "$@"
  echo "{\"stage\": \"$name\", \"seconds\": $(( $(date +%s) - start )), \"command\": \"$*\", \"machine\": \"$(nproc) CPU cores, $(uname -m), torch $(python -c 'import torch; print(torch.__version__)')\"}" >> "$OUT/stages.jsonl"
}

mkdir -p "$OUT"
stage pretrain "$OUT/pretrain/final/model.safetensors" \
  accelerate launch pretrain_mae.py "${COMMON[@]}" --experiment_name pretrain --epochs "$PRETRAIN_EPOCHS" \
    --warmup_epochs 0.5 --norm_pix_loss --log_every 20 --vis_every 1 --resume_from_checkpoint latest
stage linear_probe "$OUT/linear_probe/results.json" \
  accelerate launch finetune_classifier.py "${COMMON[@]}" --experiment_name linear_probe --linear_probe \
    --path_to_pretrained_mae_weights "$OUT/pretrain/final" --resume_from_checkpoint latest
stage finetune_mae "$OUT/finetune_mae/results.json" \
  accelerate launch finetune_classifier.py "${COMMON[@]}" --experiment_name finetune_mae --epochs "$FINETUNE_EPOCHS" \
    --path_to_pretrained_mae_weights "$OUT/pretrain/final" --resume_from_checkpoint latest
stage finetune_scratch "$OUT/finetune_scratch/results.json" \
  accelerate launch finetune_classifier.py "${COMMON[@]}" --experiment_name finetune_scratch --epochs "$FINETUNE_EPOCHS" \
    --from_scratch --resume_from_checkpoint latest
python experiments/summarize_transfer.py "$OUT" --output results/fashion_mnist_transfer.md
