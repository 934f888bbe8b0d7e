#!/usr/bin/env bash
# The GPU measurements, each step with its own time limit so one failure leaves the others' rows; STEPS picks some
# (default: 1-21; 22-24 run when named). Wall times on one H100/H200: steps 1-6 about 7 minutes together; 16 14 15 18 19 17 about 5 (16: the
# compiled step's profile, 14: JPEG decode routes, 15: attention backends, 18: the tiny preset, 19: the pixel cache,
# 17: micro-batch 512); 20 about 1.5; 21 over 5 (GEMM autotuning; cuBLAS won every shape it printed); 12 about 1.5;
# 8 9 about 6; 7 about 2.5; 10 about 3; 11 about 2.5; 13 about 4; 22 (not run yet) under 8, most of it compilation;
# 23 (not run yet) about 8 by its time limits, less where DALI is missing; 24 (not run yet) about 8.
#   OUT=bench/gpu_out STEPS="16 14 15 18 19 17" bash bench/gpu_checks.sh      # then, back here:
#   cat $OUT/results.jsonl >> bench/results.jsonl && python bench/summarize.py
# Step 14's nvImageCodec rows need the nvidia-nvimgcodec-cu13 and nvidia-nvjpeg wheels installed (they skip without).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
BENCH=(python bench/benchmark_pretrain.py --output "$OUT/results.jsonl")
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, torchvision, transformers, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'transformers', transformers.__version__, 'timm', timm.__version__)" | tee -a "$OUT/gpu.txt"
nproc | tee -a "$OUT/gpu.txt"
STEPS=" ${STEPS:-1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21} "
step() { [[ "$STEPS" == *" $1 "* ]]; }
run() { local limit=$1; shift; echo "== $*"; timeout "$limit" "${BENCH[@]}" "$@" 2>&1 | grep -v Warning | tail -40; }
# 1. ViT-B/16 pretraining step, bf16, ours vs 🤗 ViTMAEForPreTraining, eager: images/s, MFU, ratio
step 1 && run 120 --model mae_vit_base_patch16 --batch_size 256 --precision bf16 --steps 20 --rounds 3
# 2. the input pipeline from JPEG (500x375, quality 90) alone: decoded by PIL in the workers, then on the GPU
step 2 && run 100 --mode data --model mae_vit_base_patch16 --path_to_data /tmp/jpegs --make_jpegs 2000 --batch_size 256 \
    --decode cpu --steps 30 --warmup_steps 5
step 2 && run 60 --mode data --model mae_vit_base_patch16 --path_to_data /tmp/jpegs --batch_size 256 --decode device \
    --steps 30 --warmup_steps 5
# 3. peak memory against micro-batch, with and without --gradient_checkpointing
step 3 && run 80 --mode memory --model mae_vit_base_patch16 --precision bf16 --memory_batches 128 256 512 1024
step 3 && run 80 --mode memory --model mae_vit_large_patch16 --precision bf16 --memory_batches 64 128 256 512
# 4. compiled vs compiled
step 4 && run 150 --model mae_vit_base_patch16 --batch_size 256 --precision bf16 --steps 20 --rounds 3 --compile
# 5. the pipeline feeding the step (decode on the GPU): whichever is slower is the wall
step 5 && run 80 --mode both --model mae_vit_base_patch16 --precision bf16 --path_to_data /tmp/jpegs --batch_size 256 \
    --steps 20 --warmup_steps 5
# 6. FSDP through the accelerate config (accelerate runs FSDP only on GPUs: on a CPU-only machine it falls back to
# DistributedType.NO), one process, a few steps on synthetic images: the path trains and saves loadable weights.
step 6 && echo "== FSDP"
step 6 && timeout 90 accelerate launch --config_file accelerate_configs/fsdp.yaml --num_processes 1 pretrain_mae.py \
    --dataset synthetic --model mae_vit_base_patch16 --per_gpu_batch_size 64 --max_train_steps 20 --log_every 5 \
    --vis_every 0 --log_with none --working_directory "$OUT" --experiment_name fsdp 2>&1 | grep -v Warning | tail -4
step 6 && timeout 30 python -c "from models import MaskedAutoencoder; m = MaskedAutoencoder.from_pretrained('$OUT/fsdp/final'); print('FSDP weights load:', sum(p.numel() for p in m.parameters()))"
step 6 && tail -3 "$OUT/fsdp/metrics.jsonl" 2>/dev/null
step 6 && rm -rf "$OUT/fsdp"  # weights stay on the device machine; the log above is what comes back
# 7. for the next session (not run yet): the MFU at a larger micro-batch, and where the compiled step's time goes
step 7 && run 150 --model mae_vit_base_patch16 --batch_size 512 --precision bf16 --steps 10 --rounds 3 --compile --profile 15
step 7 && run 60 --mode optimizer --model mae_vit_base_patch16 --steps 10 --rounds 3  # fused vs foreach AdamW on CUDA
# 8. the pipeline feeding the compiled step on more data (3,000 JPEGs, 40 steps), decoded on the GPU (ahead of the
# step in a thread on its own stream, then between steps behind fences) and in the workers
step 8 && run 120 --mode both --model mae_vit_base_patch16 --precision bf16 --compile --path_to_data /tmp/jpegs --make_jpegs 3000 \
    --batch_size 256 --steps 40 --warmup_steps 5 --decode_ahead
step 8 && run 120 --mode both --model mae_vit_base_patch16 --precision bf16 --compile --path_to_data /tmp/jpegs \
    --batch_size 256 --steps 40 --warmup_steps 5
step 8 && run 120 --mode both --model mae_vit_base_patch16 --precision bf16 --compile --path_to_data /tmp/jpegs --batch_size 256 \
    --decode cpu --steps 40 --warmup_steps 5
# 9. the same JPEGs decoded once into a pixel cache (make_pixel_cache.py): the loader alone, then feeding the
# compiled step (the cache rows need step 8's JPEGs: --make_jpegs writes them if step 8 did not run)
if step 9; then
    [ -d /tmp/jpegs/train ] || timeout 60 python -c "from pathlib import Path; from bench.benchmark_pretrain import make_jpegs; make_jpegs(Path('/tmp/jpegs'), 3000)"
    echo "== make_pixel_cache ($(ls /tmp/jpegs/train/synthetic | wc -l) JPEGs)"
    timeout 60 python make_pixel_cache.py --path_to_data /tmp/jpegs --output_dir /tmp/jpegs_cache 2>&1 | tail -2
    run 45 --mode data --model mae_vit_base_patch16 --path_to_data /tmp/jpegs_cache --batch_size 256 --steps 40 \
        --warmup_steps 5
    run 120 --mode both --model mae_vit_base_patch16 --precision bf16 --compile --path_to_data /tmp/jpegs_cache \
        --batch_size 256 --steps 40 --warmup_steps 5
fi
# 10. pretrain_mae.py itself, end to end (the images/s its metrics.jsonl reports: loader, step, logging, the
# device-side finite-loss check), compiled ViT-B, bf16, micro-batch 256, from the JPEGs (default --decode auto) and
# from the pixel cache (needs step 9's cache); the first 10 steps' row includes compilation
if step 10; then
    [ -d /tmp/jpegs/train ] || timeout 60 python -c "from pathlib import Path; from bench.benchmark_pretrain import make_jpegs; make_jpegs(Path('/tmp/jpegs'), 3000)"
    for data in /tmp/jpegs /tmp/jpegs_cache; do
        [ -d "$data" ] || continue
        echo "== pretrain_mae.py on $data"
        timeout 150 python pretrain_mae.py --path_to_data "$data" --model mae_vit_base_patch16 --mixed_precision bf16 \
            --compile --per_gpu_batch_size 256 --max_train_steps 60 --log_every 10 --vis_every 0 --log_with none \
            --save_checkpoint_interval 1000 --working_directory "$OUT/e2e" --experiment_name "$(basename "$data")" \
            2>&1 | tr "\r" "\n" | grep -v Warning | tail -2
        grep -o '"step": [0-9]*\|"images_per_sec": [0-9.]*' "$OUT/e2e/$(basename "$data")/metrics.jsonl" | paste - - | tail -6
        rm -rf "$OUT/e2e/$(basename "$data")/final" "$OUT/e2e/$(basename "$data")/checkpoints"
    done
fi
# 11. where pretrain_mae.py's and finetune_classifier.py's loops wait for the GPU (bench/count_syncs.py: CUDA's sync
# debug mode): with the fused AdamW skipping non-finite steps on the device, a line counted 60 times or more is a
# per-step synchronisation left (the classifier's evaluation, every 16 steps, counts per evaluation batch)
if step 11; then
    echo "== synchronisations in 60 steps of pretrain_mae.py (eager, synthetic images, log every 20)"
    timeout 120 python bench/count_syncs.py pretrain_mae.py --dataset synthetic --model mae_vit_base_patch16 \
        --mixed_precision bf16 --per_gpu_batch_size 128 --max_train_steps 60 --log_every 20 --vis_every 0 \
        --log_with none --save_checkpoint_interval 1000 --working_directory "$OUT/syncs" 2>&1 | tr "\r" "\n" \
        | grep -v Warning | tail -18
    echo "== synchronisations in 60 steps of finetune_classifier.py --model_ema (tiny ViT, synthetic, eval every 16 steps)"
    timeout 90 python bench/count_syncs.py finetune_classifier.py --dataset synthetic --from_scratch --model_ema \
        --max_train_steps 60 --log_every 20 --log_with none --working_directory "$OUT/syncs" 2>&1 | tr "\r" "\n" \
        | grep -v Warning | tail -18
    rm -rf "$OUT/syncs"
fi
# 12. what --compile's regions add over the blocks alone, and the whole model in one graph (--mode scope)
step 12 && run 240 --mode scope --model mae_vit_base_patch16 --batch_size 256 --precision bf16 --steps 10 --rounds 4
# 13. the fine-tuning step, ViT-B/16, bf16, batch 256: ours against timm's VisionTransformer, eager then compiled
step 13 && run 120 --mode finetune --model mae_vit_base_patch16 --batch_size 256 --precision bf16 --steps 10 --rounds 3
step 13 && run 180 --mode finetune --model mae_vit_base_patch16 --batch_size 256 --precision bf16 --steps 10 --rounds 3 --compile
# 16. where the compiled ViT-B step's time goes: our step alone, the top operators and kernels by device time
step 16 && run 150 --model mae_vit_base_patch16 --impl ours --batch_size 256 --precision bf16 --steps 10 --rounds 3 \
    --compile --profile 30
# 14. JPEG decode routes (500x375, quality 90) to 224x224 training crops: PIL and torchvision on one CPU thread, torchvision
# on the GPU per image and batched, nvImageCodec batched (any backend, hardware engines only, region-of-interest
# decode); nvImageCodec comes as carried wheels (NVIMGCODEC_SITE: where they were installed)
step 14 && echo "== decode routes" && timeout 150 python bench/benchmark_decode.py --make_jpegs 1536 --path_to_data /tmp/jpegs \
    --batch_size 256 --batches 5 --output "$OUT/results.jsonl" 2>&1 | grep -v "Warning\|nvjpeg2k\|nvtiff\|nvJPEG2000\|nvTIFF"
# 15. attention backends on ViT-B's encoder and decoder shapes, bf16, batch 256
step 15 && echo "== attention backends" && timeout 60 python bench/benchmark_attention.py --model mae_vit_base_patch16 \
    --batch_size 256 --precision bf16 --output "$OUT/results.jsonl" 2>&1 | grep -v Warning
# 18. the tiny preset (28x28 images, about 0.3 GFLOP per trained image) compiled on synthetic images on the device
step 18 && run 120 --model mae_vit_tiny_patch4 --impl ours --batch_size 8192 --precision bf16 --steps 20 --rounds 3 --compile
# 19. the pixel cache of step 14's JPEGs, the loader alone
if step 19; then
    echo "== make_pixel_cache ($(ls /tmp/jpegs/train/synthetic | wc -l) JPEGs)"
    timeout 60 python make_pixel_cache.py --path_to_data /tmp/jpegs --output_dir /tmp/jpegs_cache 2>&1 | tail -2
    run 45 --mode data --model mae_vit_base_patch16 --path_to_data /tmp/jpegs_cache --batch_size 256 --steps 40 \
        --warmup_steps 5
fi
# 17. a larger micro-batch: ViT-B compiled at 512, ours against 🤗
step 17 && run 130 --model mae_vit_base_patch16 --batch_size 512 --precision bf16 --steps 10 --rounds 3 --compile
# 20. the compiled ViT-B step with the patch embedding as one matmul on the unfolded patches (the convolution's
# weight-gradient kernel was 3% of the step)
step 20 && run 150 --model mae_vit_base_patch16 --impl ours --batch_size 256 --precision bf16 --steps 10 --rounds 3 \
    --compile --patch_embed linear
# 21. the same with Inductor's GEMM autotuning: Triton matmul templates may take the bias and GELU into their epilogue
step 21 && run 330 --model mae_vit_base_patch16 --impl ours --batch_size 256 --precision bf16 --steps 10 --rounds 3 \
    --compile --patch_embed linear --inductor max_autotune=True
# 22. Fashion-MNIST held on the device (--data_on_device on): the views alone, then feeding the compiled tiny preset at
# batch 8192, then pretrain_mae.py itself (compiled, 3 epochs at 4096 per step; its rows' images/s). The IDX files:
# FASHION_MNIST, else Debian's folder, else data/fashion-mnist (carried: the device machine has no internet)
if step 22; then
    FASHION=${FASHION_MNIST:-/usr/share/datasets/fashion-mnist}
    [ -f "$FASHION/train-images-idx3-ubyte.gz" ] || FASHION=data/fashion-mnist
    TINY=(--dataset fashion_mnist --path_to_data "$FASHION" --model mae_vit_tiny_patch4 --data_on_device on)
    echo "== the views made on the GPU against the loader's on the CPU"
    timeout 60 python bench/check_resident.py --output "$OUT/results.jsonl" 2>&1 | grep -v Warning
    run 60 --mode data "${TINY[@]}" --batch_size 8192 --steps 40 --warmup_steps 5
    run 180 --mode both "${TINY[@]}" --batch_size 8192 --precision bf16 --compile --steps 30 --warmup_steps 5
    run 150 --mode both "${TINY[@]}" --batch_size 8192 --precision bf16 --compile --steps 30 --warmup_steps 5 \
        --data_on_device off
    echo "== pretrain_mae.py, Fashion-MNIST held on the device, compiled"
    timeout 240 python pretrain_mae.py "${TINY[@]}" --mixed_precision bf16 --compile --per_gpu_batch_size 4096 \
        --epochs 3 --log_every 5 --vis_every 0 --log_with none --working_directory "$OUT/tiny" --experiment_name held \
        2>&1 | tr "\r" "\n" | grep -v Warning | tail -3
    grep -o '"step": [0-9]*\|"loss": [0-9.]*\|"images_per_sec": [0-9.]*' "$OUT/tiny/held/metrics.jsonl" \
        | paste - - - | tail -8
    rm -rf "$OUT/tiny"
fi
# 23. the JPEG path at the step's speed (ViT-B, 500x375 JPEGs, batch 256): decode routes, torchvision's batched
# nvJPEG (crops resized one by one, then together) against DALI (hardware engines, each window only); the loader
# alone with each, decoding ahead of the step; the compiled step alone; the compiled step fed by --decode dali.
# DALI's wheels: bench/dali_wheels.sh (the parts in .dali/, installed there by `bash bench/dali_wheels.sh install`);
# without them the DALI rows say "not run".
if step 23; then
    [ -d .dali/site ] && export PYTHONPATH="$PWD/.dali/site${PYTHONPATH:+:$PYTHONPATH}"
    echo "== decode routes: batched nvJPEG against DALI"
    timeout 120 python bench/benchmark_decode.py --make_jpegs 3000 --path_to_data /tmp/jpegs --routes tv_cuda_batched \
        tv_cuda_windows dali --hw_decoder_load 0.65 0.9 --batch_size 256 --batches 8 --output "$OUT/results.jsonl" \
        2>&1 | grep -v "Warning"
    for decode in dali device; do
        run 90 --mode data --model mae_vit_base_patch16 --path_to_data /tmp/jpegs --batch_size 256 --decode $decode \
            --decode_ahead --steps 40 --warmup_steps 5
    done
    run 150 --model mae_vit_base_patch16 --impl ours --batch_size 256 --precision bf16 --steps 20 --rounds 3 --compile
    run 180 --mode both --model mae_vit_base_patch16 --precision bf16 --compile --path_to_data /tmp/jpegs \
        --batch_size 256 --decode dali --decode_ahead --steps 60 --warmup_steps 10
fi
# 24. step variants of the compiled ViT-B step (bf16, batch 256), each against 🤗 ViTMAE compiled in the same run:
# SDPA on cuDNN's attention alone, Inductor's CUDA graphs, the residual stream in bf16
step 24 && run 180 --model mae_vit_base_patch16 --batch_size 256 --precision bf16 --steps 20 --rounds 3 --compile \
    --sdpa_backend cudnn
step 24 && run 180 --model mae_vit_base_patch16 --batch_size 256 --precision bf16 --steps 20 --rounds 3 --compile \
    --inductor triton.cudagraphs=True
step 24 && run 180 --model mae_vit_base_patch16 --batch_size 256 --precision bf16 --steps 20 --rounds 3 --compile \
    --residual_dtype autocast
exit 0  # (each step's failure shows in its output; the rows that came back are what counts)
