"""A run's start: its folder, the Accelerator (precision, trackers, CPU threads, GPU math), logging, the seed."""
from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import DistributedType, ProjectConfiguration

from utils.config import Settings, freeze, save_config
from utils.errors import UserError
from utils.hub import check_hub_args

from .checkpoint import agreed_checkpoint, complete_checkpoints, resumed_layout
from .preemption import PREEMPTED_MARKER


def refuse_to_overwrite(run_dir: "RunDir") -> None:
    """A fresh start must not mix with (and prune) the checkpoints of an earlier run in the same folder."""
    if complete_checkpoints(run_dir.checkpoints):
        raise UserError(f"{run_dir.root} already holds checkpoints of an earlier run: continue it with "
                        "--resume_from_checkpoint latest, or pick another --experiment_name (or delete the folder)")


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_num_workers(device: torch.device, processes: int | None = None) -> int:
    """Loader workers per process: none when training on the CPU (workers would steal the cores the model
    needs; the in-process loading costs a few percent), else this process's share of the cores less one for the
    process itself (at most 32): decoding ImageNet JPEGs for ViT-B on a fast GPU takes a dozen cores or more.
    ``processes``: how many share this machine's cores (default: the launch's local processes)."""
    if device.type == "cpu":
        return 0
    local_processes = processes or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(32, available_cores() // local_processes - 1))


WANDB_ID = "wandb_run_id.txt"


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
        init_kwargs = {}
        if "wandb" in trackers and accelerator.is_main_process:
            init_kwargs["wandb"] = {"name": args.wandb_run_name or args.experiment_name, "dir": str(run_dir.root),
                                    "entity": args.wandb_entity, "resume": "allow",
                                    "id": wandb_run_id(run_dir, resuming=bool(args.resume_from_checkpoint))}
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(args.wandb_project if "wandb" in trackers else args.experiment_name,
                                  config=config, init_kwargs=init_kwargs)
    return accelerator


def wandb_run_id(run_dir: RunDir, resuming: bool) -> str:
    """The run folder's wandb run id: a resumed or requeued run (``--resume_from_checkpoint``) continues the run's;
    a fresh start gets a new one."""
    path = run_dir.root / WANDB_ID
    if resuming and path.exists():
        return path.read_text().strip()
    import uuid

    run_dir.root.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id + "\n")
    return run_id


def save_args(args, run_dir: RunDir, **resolved) -> None:
    """args.json (every argument, defaults and ``resolved`` values filled in) and config.yaml (the flags, for
    ``--config``)."""
    run_dir.root.mkdir(parents=True, exist_ok=True)
    (run_dir.root / "args.json").write_text(json.dumps({**vars(args), **resolved}, indent=2, default=str))
    save_config(args, run_dir.root)


def cpu_has_native(precision: str) -> bool:
    """Whether this CPU computes ``precision`` (bf16/fp16) natively (AVX512-BF16, AMX, AVX512-FP16) for oneDNN,
    rather than emulating it; True when torch cannot tell."""
    check = {"bf16": "_is_mkldnn_bf16_supported", "fp16": "_is_mkldnn_fp16_supported"}[precision]
    try:
        return bool(getattr(torch.ops.mkldnn, check)())
    except (AttributeError, RuntimeError):
        return True


def bf16_is_native() -> bool:
    """Whether bf16 autocast runs at full speed here: on a GPU, or on a CPU that computes bf16 natively."""
    return torch.cuda.is_available() or cpu_has_native("bf16")


def leave_multiprocess_run() -> None:
    """A process of a multi-process launch whose work is done leaves without the interpreter's teardown, where
    gloo's threads now and then abort it ("terminate called without an active exception") and turn a finished run
    into a failed launch."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


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


def start_run(args, fresh_start: bool) -> tuple[RunDir, Accelerator, Settings]:
    """What every script does once its arguments are resolved: the run folder (a fresh start refuses to mix with an
    earlier run's checkpoints), the Accelerator, logging and the seed. Returns the run's settings with the loader
    workers and a resume's batch layout filled in, read-only from here on."""
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
    resolved = {"num_workers": default_num_workers(accelerator.device)} if args.num_workers is None else {}
    if args.resume_from_checkpoint:
        checkpoint = agreed_checkpoint(accelerator, args.resume_from_checkpoint, run_dir.checkpoints)
        resolved.update(resumed_layout(args, accelerator.num_processes, checkpoint))
        if accelerator.is_main_process and not getattr(args, "eval_only", False):  # "requeue me", until it restarts
            (run_dir.checkpoints / PREEMPTED_MARKER).unlink(missing_ok=True)
    set_seed(args.seed)
    return run_dir, accelerator, freeze(args, **resolved)
