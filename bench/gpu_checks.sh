#!/usr/bin/env bash
# Issue 9's GPU measurements in one call (about 7 minutes on an H100; every step has its own time limit, so one
# failure leaves the others' rows), most important first:
#   OUT=bench/gpu_out bash bench/gpu_checks.sh      # then, back here:
#   cat $OUT/results.jsonl >> bench/results.jsonl && python bench/summarize.py
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
BENCH=(python bench/benchmark_pretrain.py --output "$OUT/results.jsonl")
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, torchvision, transformers; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
nproc | tee -a "$OUT/gpu.txt"
run() { local limit=$1; shift; echo "== $*"; timeout "$limit" "${BENCH[@]}" "$@" 2>&1 | grep -v Warning | tail -4; }
# 1. ViT-B/16 pretraining step, bf16, ours vs 🤗 ViTMAEForPreTraining, eager: images/s, MFU, ratio
run 120 --model mae_vit_base_patch16 --batch_size 256 --precision bf16 --steps 20 --rounds 3
# 2. the input pipeline from JPEG (500x375, quality 90) alone: decoded by PIL in the workers, then on the GPU
run 100 --mode data --model mae_vit_base_patch16 --path_to_data /tmp/jpegs --make_jpegs 2000 --batch_size 256 \
    --decode cpu --steps 30 --warmup_steps 5
run 60 --mode data --model mae_vit_base_patch16 --path_to_data /tmp/jpegs --batch_size 256 --decode device \
    --steps 30 --warmup_steps 5
# 3. peak memory against micro-batch, with and without --gradient_checkpointing
run 80 --mode memory --model mae_vit_base_patch16 --precision bf16 --memory_batches 128 256 512 1024
run 80 --mode memory --model mae_vit_large_patch16 --precision bf16 --memory_batches 64 128 256 512
# 4. compiled vs compiled
run 150 --model mae_vit_base_patch16 --batch_size 256 --precision bf16 --steps 20 --rounds 3 --compile
# 5. the pipeline feeding the step (decode on the GPU): whichever is slower is the wall
run 80 --mode both --model mae_vit_base_patch16 --precision bf16 --path_to_data /tmp/jpegs --batch_size 256 \
    --steps 20 --warmup_steps 5
# 6. FSDP through the accelerate config (accelerate runs FSDP only on GPUs: on a CPU-only machine it falls back to
# DistributedType.NO), one process, a few steps on synthetic images: the path trains and saves loadable weights.
echo "== FSDP"
timeout 90 accelerate launch --config_file accelerate_configs/fsdp.yaml --num_processes 1 pretrain_mae.py \
    --dataset synthetic --model mae_vit_base_patch16 --per_gpu_batch_size 64 --max_train_steps 20 --log_every 5 \
    --vis_every 0 --log_with none --working_directory "$OUT" --experiment_name fsdp 2>&1 | grep -v Warning | tail -4
timeout 30 python -c "from models import MaskedAutoencoder; m = MaskedAutoencoder.from_pretrained('$OUT/fsdp/final'); print('FSDP weights load:', sum(p.numel() for p in m.parameters()))"
tail -3 "$OUT/fsdp/metrics.jsonl" 2>/dev/null
rm -rf "$OUT/fsdp"  # weights stay on the device machine; the log above is what comes back
