"""Pretrain a Masked Autoencoder with 🤗 Accelerate, from a laptop CPU to a multi-node GPU cluster.

    accelerate launch pretrain_mae.py                      # tiny MAE on Fashion-MNIST (the CPU demo)
    accelerate launch pretrain_mae.py --path_to_data /data/imagenet --model mae_vit_base_patch16 ...

Everything a run writes goes to <working_directory>/<experiment_name>/: checkpoints/, final/,
reconstructions/, metrics.jsonl and args.json.
"""
from __future__ import annotations

import argparse
import logging
import math
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from models import MAE_PRESETS, MaskedAutoencoder, mae_config
from utils.checkpoint import complete_checkpoints, load_checkpoint, resolve_checkpoint, save_checkpoint
from utils.data import (
    Normalize, RandomResizedCropFlip, ResizeCenterCrop, SeededSamples, StepBatchSampler, build_image_dataset,
    channel_stats, collate_skipping_bad,
)
from utils.errors import UserError, run_cli
from utils.optim import build_adamw, param_groups_weight_decay
from utils.run import (
    MetricsLog, RunDir, Throughput, add_run_args, build_accelerator, default_num_workers, move_to_device, save_args,
    save_final_weights,
)
from utils.schedule import scaled_learning_rate, set_learning_rate, warmup_cosine
from utils.visualize import panels_to_picture, reconstruction_panels, save_picture

logger = logging.getLogger("pretrain_mae")

# Defaults that depend on the data: the paper's recipe for real image sets, a short, higher-lr schedule
# for the small built-in sets so that the CPU demo learns something in minutes. Explicit flags win.
PAPER_DEFAULTS = dict(epochs=800, warmup_epochs=40, per_gpu_batch_size=64, base_learning_rate=1.5e-4)
DEMO_DEFAULTS = dict(epochs=2, warmup_epochs=0.25, per_gpu_batch_size=128, base_learning_rate=1.5e-3)
SMALL_DATASETS = ("fashion_mnist", "synthetic")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", type=str, default=None,
                      help="fashion_mnist (built in), synthetic, folder (--path_to_data) or hf:<hub name or path>. "
                           "Default: folder if --path_to_data is given, else fashion_mnist.")
    data.add_argument("--path_to_data", type=str, default=None,
                      help="Folder of images (ImageNet layout with train/ and val/, class subfolders, or loose images); "
                           "for fashion_mnist, a folder with its IDX files.")
    data.add_argument("--image_column", type=str, default=None, help="Image column of a 🤗 dataset (default: guessed).")
    model = parser.add_argument_group("model (a preset, overridable flag by flag)")
    model.add_argument("--model", type=str, default=None, choices=sorted(MAE_PRESETS),
                       help="Preset. Default: mae_vit_tiny_patch4 for fashion_mnist/synthetic, mae_vit_base_patch16 otherwise.")
    model.add_argument("--img_size", type=int, default=None, help="Input resolution (default: the preset's).")
    model.add_argument("--input_channels", type=int, default=None,
                       help="Image channels (default: 1 for fashion_mnist, else the preset's 3).")
    model.add_argument("--patch_size", type=int, default=None, help="Patch size (default: the preset's).")
    for part, name in (("encoder", "encoder"), ("decoder", "decoder")):
        model.add_argument(f"--{part}_embed_dim", type=int, default=None, help=f"Width of the {name} (default: the preset's).")
        model.add_argument(f"--{part}_depth", type=int, default=None, help=f"Blocks in the {name} (default: the preset's).")
        model.add_argument(f"--{part}_num_heads", type=int, default=None, help=f"Attention heads of the {name}.")
        model.add_argument(f"--{part}_mlp_ratio", type=float, default=None, help=f"MLP width / embed dim in the {name}.")
    model.add_argument("--mask_ratio", type=float, default=0.75, help="Share of patches hidden from the encoder.")
    model.add_argument("--norm_pix_loss", action="store_true",
                       help="Predict per-patch normalised pixels (the paper's better-features setting).")
    model.add_argument("--custom_weight_init", action=argparse.BooleanOptionalAction, default=True,
                       help="Official MAE initialisation (xavier-uniform linears, patch projection as a linear layer, "
                            "normal(0.02) tokens); --no-custom_weight_init keeps PyTorch's defaults.")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--base_learning_rate", type=float, default=None,
                       help="lr = base lr x per_gpu_batch_size x processes / 256 (default: 1.5e-4, 1.5e-3 for the demo sets).")
    optim.add_argument("--min_learning_rate", type=float, default=0.0, help="Floor of the cosine decay.")
    optim.add_argument("--max_bad_steps", type=int, default=20,
                       help="Stop after this many consecutive steps with a non-finite loss (each is skipped).")
    add_run_args(parser)
    vis = parser.add_argument_group("pictures")
    vis.add_argument("--vis_every", type=int, default=1, help="Save a reconstruction grid every N epochs (0: only at the end).")
    vis.add_argument("--num_vis_images", type=int, default=8, help="Validation images in the reconstruction grid.")
    return parser.parse_args(argv)


def resolve_defaults(args: argparse.Namespace) -> dict:
    """Fill data-dependent defaults in ``args`` and return the model config (preset + flag overrides)."""
    if args.dataset is None:
        args.dataset = "folder" if args.path_to_data else "fashion_mnist"
    if args.model is None:
        args.model = "mae_vit_tiny_patch4" if args.dataset in SMALL_DATASETS else "mae_vit_base_patch16"
    defaults = DEMO_DEFAULTS if args.dataset in SMALL_DATASETS else PAPER_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.input_channels is None and args.dataset == "fashion_mnist":
        args.input_channels = 1
    if args.experiment_name is None:
        args.experiment_name = f"{args.model}_{args.dataset.replace('hf:', '').replace('/', '_')}"
    if args.max_grad_norm is None:
        args.max_grad_norm = 0.0
    for flag in ("epochs", "per_gpu_batch_size", "gradient_accumulation_steps", "log_every"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    config = mae_config(
        args.model, img_size=args.img_size, patch_size=args.patch_size, in_chans=args.input_channels,
        embed_dim=args.encoder_embed_dim, depth=args.encoder_depth, num_heads=args.encoder_num_heads,
        mlp_ratio=args.encoder_mlp_ratio, decoder_embed_dim=args.decoder_embed_dim, decoder_depth=args.decoder_depth,
        decoder_num_heads=args.decoder_num_heads, decoder_mlp_ratio=args.decoder_mlp_ratio,
        mask_ratio=args.mask_ratio, norm_pix_loss=args.norm_pix_loss, custom_weight_init=args.custom_weight_init,
    )
    args.img_size, args.input_channels, args.patch_size = config["img_size"], config["in_chans"], config["patch_size"]
    return config


def build_train_loader(args, num_patches: int, accelerator) -> tuple[DataLoader, StepBatchSampler]:
    """Training loader: each process reads its own slice of every optimizer step (see StepBatchSampler)."""
    base = build_image_dataset(args.dataset, args.path_to_data, "train", args.input_channels, args.img_size,
                               args.max_samples, args.image_column)
    samples = SeededSamples(base, RandomResizedCropFlip(args.img_size), args.seed, num_patches)
    sampler = StepBatchSampler(len(samples), args.per_gpu_batch_size, args.gradient_accumulation_steps,
                               accelerator.num_processes, accelerator.process_index, args.seed)
    loader = DataLoader(samples, batch_sampler=sampler, num_workers=args.num_workers,
                        collate_fn=collate_skipping_bad, pin_memory=accelerator.device.type == "cuda",
                        persistent_workers=args.num_workers > 0)
    return loader, sampler


def fixed_vis_batch(args, num_patches: int) -> dict:
    """The same validation images and masks for every picture of the run."""
    base = build_image_dataset(args.dataset, args.path_to_data, "val", args.input_channels, args.img_size,
                               args.num_vis_images, args.image_column)
    samples = SeededSamples(base, ResizeCenterCrop(args.img_size), args.seed, num_patches)
    return collate_skipping_bad([samples[(i, 0)] for i in range(min(args.num_vis_images, len(samples)))])


def save_reconstructions(model, vis_batch: dict, normalize: Normalize, run_dir: RunDir, metrics: MetricsLog,
                         step: int, epoch: int, device) -> Path:
    images = normalize(vis_batch["pixel_values"].to(device))
    panels = reconstruction_panels(model, images, vis_batch["noise"].to(device), normalize.inverse)
    picture = panels_to_picture(panels)
    path = run_dir.subdir("reconstructions") / f"epoch_{epoch:04d}_step_{step:08d}.png"
    save_picture(picture, path)
    metrics.log_image("reconstructions", picture, step)
    return path


def main(argv=None) -> None:
    args = parse_args(argv)
    config = resolve_defaults(args)
    run_dir = RunDir(Path(args.working_directory) / args.experiment_name)
    accelerator = build_accelerator(args, run_dir)
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file checkpoint messages drown the log
    if args.num_workers is None:
        args.num_workers = default_num_workers(accelerator.device)
    if accelerator.is_main_process:
        save_args(args, run_dir)
    set_seed(args.seed)  # the model init; data order, augmentation and masks have their own seeds

    model = MaskedAutoencoder(**config)
    loader, sampler = build_train_loader(args, model.num_patches, accelerator)
    vis_batch = fixed_vis_batch(args, model.num_patches) if accelerator.is_main_process else None
    normalize = Normalize(*channel_stats(args.input_channels, args.dataset)).to(accelerator.device)

    steps_per_epoch = sampler.steps_per_epoch
    total_steps = args.max_train_steps or args.epochs * steps_per_epoch
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    peak_lr = scaled_learning_rate(args.base_learning_rate, args.per_gpu_batch_size, accelerator.num_processes)
    optimizer = build_adamw(param_groups_weight_decay(model, args.weight_decay), peak_lr, device=accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)

    step = 0
    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, run_dir.checkpoints) if args.resume_from_checkpoint else None
    if checkpoint is not None:
        state = load_checkpoint(accelerator, checkpoint)
        if state["steps_per_epoch"] != steps_per_epoch:
            raise UserError(f"checkpoint {checkpoint} was written with {state['steps_per_epoch']} steps per epoch, this run "
                            f"has {steps_per_epoch}: resume with the same data, batch size and number of processes")
        step = state["step"]
        logger.info("resumed from %s at step %d (epoch %d)", checkpoint, step, step // steps_per_epoch)
    elif args.resume_from_checkpoint == "latest":
        logger.info("no checkpoint under %s yet: starting fresh", run_dir.checkpoints)
    elif complete_checkpoints(run_dir.checkpoints):
        raise UserError(f"{run_dir.root} already holds checkpoints of an earlier run: continue it with "
                        "--resume_from_checkpoint latest, or pick another --experiment_name (or delete the folder)")
    metrics = MetricsLog(accelerator, run_dir.metrics, resume_step=step)
    logger.info("%d samples, %d steps/epoch, %d steps in all, global batch %d (micro-batch %d x %d accumulation x %d "
                "processes), peak lr %.3g, %s precision", len(loader.dataset), steps_per_epoch, total_steps,
                sampler.global_batch, sampler.micro_batch, args.gradient_accumulation_steps, accelerator.num_processes,
                peak_lr, accelerator.mixed_precision)

    def trainer_state() -> dict:
        return {"step": step, "epoch": step // steps_per_epoch, "steps_per_epoch": steps_per_epoch,
                "global_batch": sampler.global_batch}

    uses_scaler = accelerator.scaler is not None  # fp16: the GradScaler skips overflowing steps itself
    accumulation = args.gradient_accumulation_steps
    max_norm = args.max_grad_norm if args.max_grad_norm > 0 else float("inf")
    progress = tqdm(total=total_steps, initial=step, disable=not accelerator.is_main_process, desc="pretrain")
    throughput = Throughput()
    loss_sum = torch.zeros((), device=accelerator.device)
    logged_steps = bad_steps = skipped_images = 0
    last_saved_step = step
    model.train()
    while step < total_steps:
        epoch = step // steps_per_epoch
        sampler.set_epoch(epoch, start_step=step % steps_per_epoch)
        micro_batches = iter(loader)
        for _ in range(min(steps_per_epoch - step % steps_per_epoch, total_steps - step)):
            lr = warmup_cosine(step, total_steps, warmup_steps, peak_lr, args.min_learning_rate)
            set_learning_rate(optimizer, lr)
            step_loss = torch.zeros((), device=accelerator.device)
            for micro in range(accumulation):
                batch = move_to_device(next(micro_batches), accelerator.device)
                skipped_images += batch["num_skipped"]
                if "pixel_values" not in batch:
                    raise UserError(f"every image of a batch was unreadable (step {step}): check the files under --path_to_data")
                # Gradients are all-reduced on the last micro-batch only.
                with accelerator.no_sync(model) if micro < accumulation - 1 else nullcontext():
                    loss = model(normalize(batch["pixel_values"]), noise=batch["noise"]).loss
                    accelerator.backward(loss / accumulation)
                step_loss += loss.detach() / accumulation
                throughput.add(batch["pixel_values"].shape[0] * accelerator.num_processes)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
            step_loss = accelerator.reduce(step_loss, reduction="mean")
            if uses_scaler:
                optimizer.step()
                skipped = accelerator.optimizer_step_was_skipped
            else:  # one host-device sync per optimizer step: a non-finite step never reaches the weights
                skipped = not bool(torch.isfinite(step_loss) & torch.isfinite(grad_norm))
                if not skipped:
                    optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            progress.update(1)
            if skipped:
                bad_steps += 1
                logger.warning("step %d skipped: non-finite loss or gradients (%d in a row)", step, bad_steps)
                if bad_steps >= args.max_bad_steps:
                    raise SystemExit(f"pretrain_mae.py: stopping: {bad_steps} consecutive steps had a non-finite loss; "
                                     f"the last good checkpoint is under {run_dir.checkpoints}. Lower "
                                     "--base_learning_rate, set --max_grad_norm, or use bf16 instead of fp16.")
                continue
            bad_steps = 0
            loss_sum += step_loss
            logged_steps += 1
            if step % args.log_every == 0 or step == total_steps:
                row = {"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": (loss_sum / logged_steps).item(),
                       "lr": lr, "grad_norm": float(grad_norm), "images_per_sec": round(throughput.rate(), 2),
                       "skipped_images": skipped_images}
                metrics.log(row)
                progress.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{row['images_per_sec']:.0f}")
                loss_sum.zero_()
                logged_steps = 0
            if args.checkpointing_steps and step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, run_dir.checkpoints, step, trainer_state(), args.keep_checkpoints)
                last_saved_step = step
        if step % steps_per_epoch == 0:  # an epoch ended
            finished_epochs = step // steps_per_epoch
            if accelerator.is_main_process and args.vis_every and finished_epochs % args.vis_every == 0:
                save_reconstructions(accelerator.unwrap_model(model), vis_batch, normalize, run_dir, metrics, step,
                                     finished_epochs, accelerator.device)
            if finished_epochs % args.save_checkpoint_interval == 0 and last_saved_step != step:
                save_checkpoint(accelerator, run_dir.checkpoints, step, trainer_state(), args.keep_checkpoints)
                last_saved_step = step
    progress.close()

    if last_saved_step != step:
        save_checkpoint(accelerator, run_dir.checkpoints, step, trainer_state(), args.keep_checkpoints)
    save_final_weights(accelerator, model, run_dir.final)
    if accelerator.is_main_process:
        picture = save_reconstructions(accelerator.unwrap_model(model), vis_batch, normalize, run_dir, metrics, step,
                                       math.ceil(step / steps_per_epoch), accelerator.device)
        logger.info("done: %d steps; weights in %s, reconstructions in %s", step, run_dir.final, picture)
        if skipped_images:
            logger.warning("%d unreadable images were skipped", skipped_images)
    accelerator.end_training()


if __name__ == "__main__":
    run_cli(main)
