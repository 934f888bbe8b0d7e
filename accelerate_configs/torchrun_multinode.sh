#!/bin/bash
# Multi-node MAE pretraining (the README's ViT-B/16 recipe) with plain torchrun, no accelerate config.
# Run this script once on every node, with the same variables except NODE_RANK:
#   node 0: MASTER_ADDR=<node 0's address> NODE_RANK=0 bash accelerate_configs/torchrun_multinode.sh
#   node 1: MASTER_ADDR=<node 0's address> NODE_RANK=1 bash accelerate_configs/torchrun_multinode.sh
# torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for each process; Accelerate reads them
# (NCCL on GPUs, gloo on machines without one). Precision comes from --mixed_precision: there is no accelerate config.
# The c10d rendezvous gathers the NNODES agents at MASTER_ADDR:MASTER_PORT under JOB_ID (use a new one for each
# job) and ranks the nodes in the order they join: it ignores --node_rank (only --rdzv_backend static uses it),
# so rank 0, which writes metrics.jsonl, may be on any node.
# --working_directory must be on a file system all nodes share: every process writes its part of each checkpoint.
# Preemption: on SIGTERM every process finishes its step, writes a checkpoint (and work_dir/<experiment_name>/
# checkpoints/PREEMPTED) and exits with 75, but torchrun reports any failed worker as exit code 1: requeue on the
# marker. Start the same command again: --resume_from_checkpoint auto continues from the newest complete checkpoint
# (and starts fresh when there is none). torchrun gives its workers 30 s after forwarding the signal.
set -euo pipefail

NNODES=${NNODES:-2}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NODE_RANK=${NODE_RANK:?set NODE_RANK to the index of this node, 0 .. NNODES-1}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR to the address of node 0, reachable from every node}
MASTER_PORT=${MASTER_PORT:-29500}
JOB_ID=${JOB_ID:-mae_vit_base_in1k}
# The paper's effective batch of 4096 = per_gpu_batch_size x NNODES x GPUS_PER_NODE (256 x 2 x 8);
# keep the product when the node or GPU count changes (the learning rate follows it).
PER_GPU_BATCH_SIZE=${PER_GPU_BATCH_SIZE:-256}

torchrun --nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE" --node_rank "$NODE_RANK" \
  --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$JOB_ID" \
  pretrain_mae.py \
    --experiment_name "MAEPretraining" \
    --wandb_run_name "pretrain_mae" \
    --path_to_data "<PATH_TO_IMAGENET>" \
    --working_directory "work_dir" \
    --img_size 224 \
    --input_channels 3 \
    --epochs 800 \
    --warmup_epochs 40 \
    --save_checkpoint_interval 10 \
    --checkpointing_steps 1000 \
    --per_gpu_batch_size "$PER_GPU_BATCH_SIZE" \
    --base_learning_rate 1.5e-4 \
    --weight_decay 0.05 \
    --encoder_embed_dim 768 \
    --encoder_depth 12 \
    --encoder_num_heads 12 \
    --encoder_mlp_ratio 4 \
    --decoder_embed_dim 512 \
    --decoder_depth 8 \
    --decoder_num_heads 16 \
    --decoder_mlp_ratio 4 \
    --num_workers 16 \
    --norm_pix_loss \
    --custom_weight_init \
    --mixed_precision bf16 \
    --resume_from_checkpoint auto \
    --log_wandb
