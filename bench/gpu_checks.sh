#!/usr/bin/env bash
# Issue 9's GPU measurements in one call, prepared for a session that has the device (not run yet; each command
# is capped at 240 s):
#   OUT=bench/gpu_out bash bench/gpu_checks.sh      # then, back here:
#   cat $OUT/results.jsonl >> bench/results.jsonl && python bench/summarize.py
# Each command is time-limited so that one failure leaves the others' rows.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/gpu_out}
mkdir -p "$OUT"
BENCH=(python bench/benchmark_pretrain.py --output "$OUT/results.jsonl")
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
run() { echo "== $*"; timeout 240 "${BENCH[@]}" "$@" 2>&1 | tail -3; }
run --model mae_vit_base_patch16 --batch_size 256 --precision bf16 --steps 10 --rounds 3             # eager vs eager
run --model mae_vit_base_patch16 --batch_size 256 --precision bf16 --steps 10 --rounds 3 --compile   # compiled vs compiled
run --model mae_vit_tiny_patch4 --batch_size 1024 --precision bf16 --steps 20 --rounds 3
run --mode memory --model mae_vit_base_patch16 --precision bf16 --memory_batches 128 256 512 1024
run --mode memory --model mae_vit_large_patch16 --precision bf16 --memory_batches 64 128 256 512
run --mode data --model mae_vit_base_patch16 --path_to_data /tmp/jpegs --make_jpegs 5000 --batch_size 256 \
    --num_workers 15 --steps 40 --warmup_steps 5
run --mode both --model mae_vit_base_patch16 --precision bf16 --compile --path_to_data /tmp/jpegs --batch_size 256 \
    --num_workers 15 --steps 30 --warmup_steps 5
# FSDP through the accelerate config (accelerate runs FSDP only on GPUs: on a CPU-only machine it falls back to
# DistributedType.NO), one process, a few steps on synthetic images: the path trains and saves loadable weights.
echo "== FSDP"
timeout 240 accelerate launch --config_file accelerate_configs/fsdp.yaml --num_processes 1 pretrain_mae.py \
    --dataset synthetic --model mae_vit_base_patch16 --per_gpu_batch_size 64 --max_train_steps 20 --log_every 5 \
    --vis_every 0 --log_with none --working_directory "$OUT" --experiment_name fsdp 2>&1 | tail -3
python -c "from models import MaskedAutoencoder; m = MaskedAutoencoder.from_pretrained('$OUT/fsdp/final'); print('FSDP weights load:', sum(p.numel() for p in m.parameters()))"
