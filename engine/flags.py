"""The flags every script shares: the run folder, batch and schedule, precision, logging, the data source."""
from __future__ import annotations

import argparse

from pipeline.sources import HubOptions
from utils.hub import add_hub_args


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """Flags with the same meaning in every script (run folder, batch, schedule, precision, logging)."""
    run = parser.add_argument_group("run")
    run.add_argument("--experiment_name", type=str, default=None,
                     help="Name of the run; everything it writes goes to <working_directory>/<experiment_name>/.")
    run.add_argument("--working_directory", type=str, default="work_dir", help="Parent folder of all runs.")
    run.add_argument("--wandb_run_name", type=str, default=None, help="Run name shown in wandb (default: experiment_name).")
    run.add_argument("--seed", type=int, default=0, help="Seed of the model init, data order, augmentation and masks.")
    run.add_argument("--epochs", type=int, default=None, help="Training epochs (a default suits each script's demo).")
    run.add_argument("--warmup_epochs", type=float, default=None, help="Epochs of linear learning-rate warmup.")
    run.add_argument("--max_train_steps", type=int, default=None,
                     help="Total optimizer steps; overrides --epochs (the schedule spans these steps).")
    run.add_argument("--per_gpu_batch_size", type=int, default=None,
                     help="Samples each process contributes to one optimizer step; the loader's micro-batch is "
                          "per_gpu_batch_size // gradient_accumulation_steps.")
    run.add_argument("--gradient_accumulation_steps", type=int, default=1,
                     help="Micro-batches per optimizer step (gradients are all-reduced on the last one only).")
    run.add_argument("--weight_decay", type=float, default=0.05, help="AdamW weight decay (not on norms, biases, tokens).")
    run.add_argument("--max_grad_norm", type=float, default=None,
                     help="Clip the global gradient norm to this value (0 or unset: no clipping).")
    run.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                     help="Mixed precision; default: whatever the accelerate config says.")
    run.add_argument("--compile", action="store_true",
                     help="torch.compile by regions: each transformer block and, in pretraining, the MAE's patch "
                          "embedding with the masking, decoder input, and prediction with the loss (a mask-ratio "
                          "curriculum recompiles once, then the shapes are dynamic); the first steps are slow.")
    run.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                     help="On an NVIDIA GPU (Ampere or newer), run fp32 matrix products and convolutions on TF32 tensor "
                          "cores (all of them with --mixed_precision no; the few outside autocast otherwise), as timm's "
                          "train.py does; --no-tf32: full fp32 for both (PyTorch's default is full fp32 for matrix "
                          "products, TF32 for convolutions). Either way cuDNN's autotuner is on. No effect on a CPU.")
    run.add_argument("--gradient_checkpointing", action="store_true",
                     help="Recompute each block's activations in the backward pass instead of storing them: much "
                          "less memory for large micro-batches, about a third more compute.")
    run.add_argument("--num_workers", type=int, default=None,
                     help="Data-loading worker processes per process (default: 0 on a CPU, else min(32, cores per process - 1)).")
    run.add_argument("--max_samples", type=int, default=None, help="Use only the first N training samples (quick runs).")
    run.add_argument("--checkpointing_steps", type=int, default=None,
                     help="Also save a resumable checkpoint every N optimizer steps.")
    run.add_argument("--save_checkpoint_interval", type=int, default=1,
                     help="Save a resumable checkpoint every N epochs (and always at the end).")
    run.add_argument("--keep_checkpoints", type=int, default=2,
                     help="Keep the newest K checkpoints (0 keeps all); the newest complete one is never deleted.")
    run.add_argument("--resume_from_checkpoint", type=str, default=None,
                     help="A checkpoint folder (checkpoints/step_*), or 'latest' / 'auto': this run's newest complete "
                          "checkpoint, a fresh start if there is none (the same command can be requeued forever).")
    run.add_argument("--log_every", type=int, default=10,
                     help="Optimizer steps between metrics.jsonl rows / tracker points (1 = every step).")
    run.add_argument("--log_with", type=str, default="tensorboard", choices=["wandb", "tensorboard", "all", "none"],
                     help="Experiment tracker (metrics.jsonl is always written).")
    run.add_argument("--log_wandb", action="store_true", help="Shorthand for --log_with wandb.")
    run.add_argument("--wandb_project", type=str, default="mae-accelerate", help="wandb project name.")
    run.add_argument("--wandb_entity", type=str, default=None, help="wandb team or user (default: your default entity).")
    add_hub_args(parser)


def add_data_args(parser: argparse.ArgumentParser, folder_help: str, built_in: str = "fashion_mnist (built in), "
                  "synthetic") -> argparse._ArgumentGroup:
    """``--dataset``, ``--path_to_data`` and ``--image_column``, the same in every script."""
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", type=str, default=None,
                      help=f"{built_in}, folder (--path_to_data), shards (tar shards with a shards.json under --path_to_data, "
                           "a folder or fsspec URL: make_shards.py), cache (decoded pixels with a cache.json under "
                           "--path_to_data: make_pixel_cache.py) or hf:<hub name or path>. Default: shards, cache or "
                           f"folder if --path_to_data is given, else {built_in.split()[0]}.")
    data.add_argument("--path_to_data", type=str, default=None, help=folder_help)
    data.add_argument("--image_column", type=str, default=None, help="Image column of a 🤗 dataset (default: guessed).")
    data.add_argument("--label_column", type=str, default=None, help="Label column of a 🤗 dataset (default: guessed).")
    data.add_argument("--dataset_config", type=str, default=None, help="Configuration (subset) of a 🤗 dataset.")
    data.add_argument("--train_split", type=str, default=None, help="Training split of a 🤗 dataset (default: train).")
    data.add_argument("--val_split", type=str, default=None,
                      help="Held-out split of a 🤗 dataset (default: validation, val or test).")
    data.add_argument("--dataset_revision", type=str, default=None, help="Branch, tag or commit of a 🤗 Hub dataset.")
    return data


def add_data_on_device_arg(group) -> None:
    """``--data_on_device``, for the scripts whose training views can be made in batches (pipeline/resident.py)."""
    group.add_argument("--data_on_device", type=str, default="auto", choices=["auto", "on", "off"],
                       help="Hold the training images in device memory and make each batch's crops, flips and masks "
                            "there, without loader workers; auto: on a GPU, for an in-memory or cached set of one "
                            "image size under 4 GiB.")


def hub_options(args) -> HubOptions:
    """How the run reads a 🤗 dataset, from its data flags (a script without one of them takes the default)."""
    names = {"config": "dataset_config", "train_split": "train_split", "val_split": "val_split",
             "image_column": "image_column", "label_column": "label_column", "revision": "dataset_revision"}
    return HubOptions(**{field: getattr(args, flag, None) for field, flag in names.items()})


def default_dataset(args, built_in: str = "fashion_mnist", shards: bool = True) -> str:
    """--dataset, else: shards for a folder or URL holding tar shards (shards.json), cache for a pixel cache
    (cache.json) in the scripts that read them, folder for another --path_to_data, the built-in data set without one."""
    if args.dataset:
        return args.dataset
    if not args.path_to_data or not shards:
        return built_in if not args.path_to_data else "folder"
    from pipeline.pixel_cache import is_pixel_cache
    from pipeline.shards import is_sharded

    if "://" in args.path_to_data or is_sharded(args.path_to_data):
        return "shards"
    return "cache" if is_pixel_cache(args.path_to_data) else "folder"
