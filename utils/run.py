"""What every script shares: run flags, the run folder, the Accelerator, metrics.jsonl and trackers."""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import DistributedType, ProjectConfiguration
from safetensors.torch import save_file

from .config import save_config
from .errors import UserError
from .hub import add_hub_args, check_hub_args


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
    return data


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


def refuse_to_overwrite(run_dir: "RunDir") -> None:
    """A fresh start must not mix with (and prune) the checkpoints of an earlier run in the same folder."""
    from .checkpoint import complete_checkpoints

    if complete_checkpoints(run_dir.checkpoints):
        raise UserError(f"{run_dir.root} already holds checkpoints of an earlier run: continue it with "
                        "--resume_from_checkpoint latest, or pick another --experiment_name (or delete the folder)")


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_num_workers(device: torch.device) -> int:
    """Loader workers per process: none when training on the CPU (workers would steal the cores the model
    needs; the in-process loading costs a few percent), else this process's share of the cores less one for the
    process itself (at most 32): decoding ImageNet JPEGs for ViT-B on a fast GPU takes a dozen cores or more."""
    if device.type == "cpu":
        return 0
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(32, available_cores() // local_processes - 1))


@dataclass
class RunDir:
    """The folder of one run: ``checkpoints/``, ``final/``, ``metrics.jsonl``, ``args.json`` and more."""

    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def final(self) -> Path:
        return self.root / "final"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    def subdir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path


def launched_on_cpu_only() -> bool:
    """True for several processes (torchrun / accelerate launch) on a machine without an accelerator:
    Accelerate then needs ``cpu=True`` to set up gloo instead of running each process alone."""
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not has_accelerator


def set_gpu_math(device: torch.device, tf32: bool) -> None:
    """On an NVIDIA GPU: fp32 matrix products and convolutions on TF32 tensor cores, or neither (``tf32``; PyTorch's
    default is off for matrix products, on for convolutions), and cuDNN's autotuner for the convolutions, whose shapes
    repeat (patch embedding, UperNet), as facebookresearch/mae sets it. The legacy flags, not ``fp32_precision``:
    torch.compile reads the precision through the legacy API, which raises once the two are mixed. A CPU is left as
    it is."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = True


def build_accelerator(args, run_dir: RunDir) -> Accelerator:
    """One Accelerator per run: precision from the flag or the accelerate config, trackers from --log_with."""
    check_hub_args(args)
    if args.per_gpu_batch_size % args.gradient_accumulation_steps:
        raise UserError(f"--per_gpu_batch_size {args.per_gpu_batch_size} is not divisible by "
                        f"--gradient_accumulation_steps {args.gradient_accumulation_steps}: choose a multiple")
    log_with = "wandb" if args.log_wandb else args.log_with
    trackers = {"none": None, "all": ["wandb", "tensorboard"]}.get(log_with, [log_with])
    for tracker in trackers or []:
        module = {"wandb": "wandb", "tensorboard": "torch.utils.tensorboard"}[tracker]
        try:
            __import__(module)
        except ImportError:
            raise UserError(f"--log_with {tracker} needs the {tracker} package: pip install {tracker}"
                            " (or pass --log_with none)") from None
    accelerator = Accelerator(
        cpu=launched_on_cpu_only(),
        mixed_precision=args.mixed_precision,
        log_with=trackers,
        project_config=ProjectConfiguration(project_dir=str(run_dir.root), logging_dir=str(run_dir.root / "logs")),
        # Buckets are all-reduced while the backward pass continues; no unused parameters to search for.
        kwargs_handlers=[DistributedDataParallelKwargs(gradient_as_bucket_view=True)],
    )
    set_gpu_math(accelerator.device, args.tf32)
    if accelerator.device.type == "cpu":
        # `accelerate launch` sets OMP_NUM_THREADS=1; on a CPU, give each process its share of the cores instead.
        # MAE_CPU_THREADS overrides, e.g. to run two jobs side by side without oversubscribing the cores.
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(int(os.environ.get("MAE_CPU_THREADS", max(1, available_cores() // local_processes))))
    if trackers:
        init_kwargs = {"wandb": {"name": args.wandb_run_name or args.experiment_name, "dir": str(run_dir.root)}}
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(args.wandb_project if "wandb" in trackers else args.experiment_name,
                                  config=config, init_kwargs=init_kwargs)
    return accelerator


def save_args(args, run_dir: RunDir) -> None:
    """args.json (every argument, defaults filled in) and config.yaml (the flags, for ``--config``)."""
    run_dir.root.mkdir(parents=True, exist_ok=True)
    (run_dir.root / "args.json").write_text(json.dumps(vars(args), indent=2, default=str))
    save_config(args, run_dir.root)


class MetricsLog:
    """Append rows to ``metrics.jsonl`` (main process) and the trackers. On resume, rows after the
    checkpoint's step (left by the interrupted run) are dropped, so the file reads as one run."""

    def __init__(self, accelerator: Accelerator, path: Path, resume_step: int | None = None):
        self.accelerator, self.path = accelerator, path
        if accelerator.is_main_process and path.exists():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            keep = [r for r in rows if resume_step is not None and r.get("step", 0) <= resume_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def log(self, row: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        clean = {k: (float(v) if isinstance(v, float) and math.isfinite(v) else v) for k, v in row.items()}
        with self.path.open("a") as handle:
            handle.write(json.dumps(clean) + "\n")
        self.accelerator.log({k: v for k, v in clean.items() if isinstance(v, (int, float)) and k != "step"},
                             step=row["step"])

    def log_image(self, name: str, image, step: int) -> None:
        """Log a (H, W, C) uint8 numpy picture to the trackers that take images."""
        if not self.accelerator.is_main_process:
            return
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image(name, image, step, dataformats="HWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({name: wandb.Image(image)}, step=step)


class Throughput:
    """Images per second between two calls of ``rate()``."""

    def __init__(self):
        self.start, self.images = time.perf_counter(), 0

    def add(self, images: int) -> None:
        self.images += images

    def rate(self) -> float:
        now = time.perf_counter()
        value = self.images / max(now - self.start, 1e-9)
        self.start, self.images = now, 0
        return value


def save_final_weights(accelerator: Accelerator, model, directory: Path) -> None:
    """Write ``config.json`` + ``model.safetensors`` (the ``from_pretrained`` format) from any process layout:
    the full state dict is gathered on every process (a collective under FSDP) and written by the main one."""
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, str(directory / "model.safetensors"),
                  metadata={"format": "pt"})
        (directory / "config.json").write_text(json.dumps(unwrapped._hub_mixin_config, indent=2, sort_keys=True))
    accelerator.wait_for_everyone()


def cpu_has_native(precision: str) -> bool:
    """Whether this CPU computes ``precision`` (bf16/fp16) natively (AVX512-BF16, AMX, AVX512-FP16) for oneDNN,
    rather than emulating it; True when torch cannot tell."""
    check = {"bf16": "_is_mkldnn_bf16_supported", "fp16": "_is_mkldnn_fp16_supported"}[precision]
    try:
        return bool(getattr(torch.ops.mkldnn, check)())
    except (AttributeError, RuntimeError):
        return True


def warn_if_precision_is_emulated(accelerator) -> None:
    """A GPU command's --mixed_precision bf16 copied to a CPU without native bf16 runs much slower than fp32 (the
    tiny MAE on this project's AVX2 machine: 13 against 195 images/s): say so, with the fix."""
    precision = accelerator.mixed_precision
    if (accelerator.is_main_process and accelerator.device.type == "cpu" and precision in ("bf16", "fp16")
            and not cpu_has_native(precision)):
        logging.getLogger(__name__).warning(
            "--mixed_precision %s on a CPU without native %s is emulated and much slower than fp32 (about 15x for the "
            "tiny MAE on an AVX2 CPU): leave --mixed_precision out on this machine", precision, precision)


def warn_if_fsdp_fell_back(accelerator) -> None:
    """accelerate runs FSDP only on GPUs: launched on a CPU, an FSDP config (accelerate_configs/fsdp.yaml) quietly
    trains with DDP or one process, each holding the whole model. Say so, rather than let a memory plan rest on it."""
    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"  # (as accelerate reads it)
    if accelerator.is_main_process and asked and accelerator.distributed_type != DistributedType.FSDP:
        ran = {DistributedType.NO: "one process", DistributedType.MULTI_CPU: "DDP over gloo"}.get(
            accelerator.distributed_type, accelerator.distributed_type.value)
        logging.getLogger(__name__).warning(
            "the accelerate config asks for FSDP, but accelerate runs FSDP only on GPUs: this run on %s is %s, "
            "each process holding the whole model and its optimizer state", accelerator.device.type, ran)


def start_run(args, fresh_start: bool) -> tuple[RunDir, Accelerator]:
    """What every script does once its arguments are resolved: the run folder (a fresh start refuses to mix with an
    earlier run's checkpoints), the Accelerator, logging, the loader workers and the seed."""
    from accelerate.utils import set_seed

    run_dir = RunDir(Path(args.working_directory) / args.experiment_name)
    if fresh_start:
        refuse_to_overwrite(run_dir)
    accelerator = build_accelerator(args, run_dir)
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file checkpoint messages drown the log
    warn_if_precision_is_emulated(accelerator)
    warn_if_fsdp_fell_back(accelerator)
    if args.num_workers is None:
        args.num_workers = default_num_workers(accelerator.device)
    if args.resume_from_checkpoint:
        from .checkpoint import keep_global_batch
        from .training import PREEMPTED_MARKER

        keep_global_batch(args, accelerator.num_processes, run_dir.checkpoints)  # before args.json is written
        if accelerator.is_main_process and not getattr(args, "eval_only", False):  # "requeue me", until it restarts
            (run_dir.checkpoints / PREEMPTED_MARKER).unlink(missing_ok=True)
    set_seed(args.seed)
    return run_dir, accelerator
