"""Pretrain a Masked Autoencoder with 🤗 Accelerate, from a laptop CPU to a multi-node GPU cluster.

    accelerate launch pretrain_mae.py                      # tiny MAE on Fashion-MNIST (the CPU demo)
    accelerate launch pretrain_mae.py --path_to_data /data/imagenet --model mae_vit_base_patch16 ...

Everything a run writes goes to <working_directory>/<experiment_name>/: checkpoints/, final/,
reconstructions/, metrics.jsonl and args.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from models import MAE_PRESETS, MaskedAutoencoder, mae_config
from models.losses import high_frequency_loss, uniformity_loss
from models.pca import TARGETS, PCABasis, eigenspace_errors, fit_pca, pca_target
from models.masking import MASK_STRATEGIES, curriculum_ratio, grid_cell, mask_noise
from models.weights import read_weights
from utils.checkpoint import resolve_checkpoint, resume_from, save_checkpoint
from utils.data import (
    Normalize, RandomResizedCropFlip, ResizeCenterCrop, SeededSamples, build_image_dataset,
    EpochChain, channel_stats, collate_skipping_bad, decodes_on_device,
)
from utils.training import (
    BadStepGuard, StepAverages, StopSignal, apply_speed_options, build_loader, guarded_optimizer_step, readable_batch,
    sync_context,
)
from utils.errors import UserError, run_cli
from utils.hub import push_run
from utils.metrics import reconstruction_metrics
from utils.optim import build_adamw, param_groups_weight_decay
from utils.run import (
    DeviceBatches, MetricsLog, RunDir, Throughput, add_data_args, add_run_args, default_dataset, save_args,
    save_final_weights, start_run,
)
from utils.schedule import scaled_learning_rate, set_learning_rate, warmup_cosine
from utils.shards import build_step_sampler
from utils.visualize import panels_to_picture, reconstruction_panels, save_picture

logger = logging.getLogger("pretrain_mae")

# Defaults that depend on the data: the paper's recipe for real image sets, a short, higher-lr schedule
# for the small built-in sets so that the CPU demo learns something in minutes. Explicit flags win.
PAPER_DEFAULTS = dict(epochs=800, warmup_epochs=40, per_gpu_batch_size=64, base_learning_rate=1.5e-4)
DEMO_DEFAULTS = dict(epochs=2, warmup_epochs=0.25, per_gpu_batch_size=128, base_learning_rate=1.5e-3)
SMALL_DATASETS = ("fashion_mnist", "synthetic")
# Seed 004's "improved MAE" (weights chosen here: the Laplacian term at about the pixel loss's scale on
# normalised pixels, the uniformity term small enough not to dominate early training).
IMPROVED = dict(mask_ratio_start=0.5, hf_loss_weight=0.5, uniformity_weight=0.05)
ORIGINAL = dict(hf_loss_weight=0.0, uniformity_weight=0.0)
SIZE_KEYS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "decoder_embed_dim",
             "decoder_depth", "decoder_num_heads", "decoder_mlp_ratio", "layer_norm_eps", "learned_pos_embed")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = add_data_args(parser, "Folder of images (ImageNet layout with train/ and val/, class subfolders, or loose "
                                 "images); for fashion_mnist, a folder with its IDX files.")
    data.add_argument("--decode", type=str, default="auto", choices=["auto", "cpu", "device"],
                      help="Where a folder's JPEGs are decoded: cpu (loader workers, libjpeg-turbo), device (the workers only "
                           "read the bytes and draw the crop; the batch is decoded on the training device with "
                           "torchvision's decode_jpeg, nvJPEG on a GPU, then cropped and resized there). auto: device "
                           "when training on a GPU. Both cut the same crops of the same samples (nvJPEG's pixels "
                           "differ from PIL's by about one level).")
    data.add_argument("--decode_ahead", action="store_true",
                      help="With JPEGs decoded on a GPU: decode the next batch in a thread, on a CUDA stream of its "
                           "own, while the current step trains (by default the decode runs between steps, behind "
                           "device-wide fences). Same batches; not yet measured on a GPU (bench/gpu_checks.sh step 8).")
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
    model.add_argument("--resume_from_pretrained", type=str, default=None,
                       help="Continue pretraining from these weights: a folder, file or 🤗 Hub repo in any format "
                            "from_pretrained reads (this project's, 🤗 ViTMAE, facebookresearch/mae .pth, timm); the "
                            "sizes come from it (size flags still override, e.g. --img_size). An encoder-only "
                            "checkpoint gets a fresh decoder.")
    model.add_argument("--mask_ratio", type=float, default=0.75, help="Share of patches hidden from the encoder.")
    model.add_argument("--mask_strategy", type=str, default="random", choices=MASK_STRATEGIES,
                       help="random (MAE), block (BEiT-style rectangles) or grid (keep one patch per s x s cell; "
                            "--mask_ratio must be 1 - 1/s^2, e.g. 0.75).")
    model.add_argument("--mask_ratio_start", type=float, default=None,
                       help="Curriculum masking: start at this ratio and move linearly to --mask_ratio over "
                            "--mask_curriculum_epochs (per optimizer step).")
    model.add_argument("--mask_curriculum_epochs", type=float, default=None,
                       help="Epochs of the mask-ratio curriculum (default 0: none; 'improved' recipe: a quarter of the run).")
    model.add_argument("--hf_loss_weight", type=float, default=None,
                       help="Weight of the Laplacian (high-frequency) loss on the masked patches (default 0; "
                            f"'improved': {IMPROVED['hf_loss_weight']}).")
    model.add_argument("--uniformity_weight", type=float, default=None,
                       help="Weight of the uniformity regulariser on the pooled visible-token embeddings (default 0; "
                            f"'improved': {IMPROVED['uniformity_weight']}).")
    model.add_argument("--uniformity_t", type=float, default=2.0, help="Temperature t of the uniformity loss.")
    model.add_argument("--target", type=str, default="pixels", choices=TARGETS,
                       help="What is reconstructed: pixels (MAE), or the PCA-filtered image: pca_bottom (the "
                            "lowest-variance components holding --pca_variance of the variance) or pca_top.")
    model.add_argument("--pca_variance", type=float, default=0.25,
                       help="Share of the pixel variance the PCA target keeps, in (0, 1).")
    model.add_argument("--pca_samples", type=int, default=2000,
                       help="Training images the PCA is fitted on (deterministic centre view, normalised).")
    model.add_argument("--pca_path", type=str, default=None,
                       help="Reuse a fitted PCA (a run's pca.safetensors) instead of fitting one.")
    model.add_argument("--eigenspace_metrics", action="store_true",
                       help="Also log val_error_top / val_error_bottom: the masked-pixel reconstruction error inside "
                            "the top eigenspace (components holding 1 - --pca_variance) and the bottom one (fits or "
                            "loads the PCA as --target pca_* does).")
    model.add_argument("--recipe", type=str, default="original", choices=["original", "improved"],
                       help="original: the plain MAE; improved: seed 004's variant (curriculum 0.5 -> --mask_ratio "
                            "over the first quarter of the epochs, Laplacian loss, uniformity); flags still override.")
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
                       help="Stop after this many consecutive steps with a non-finite loss (each is skipped); "
                            "counted on the device and checked at --log_every and at checkpoints.")
    add_run_args(parser)
    vis = parser.add_argument_group("pictures")
    vis.add_argument("--vis_every", type=int, default=1, help="Save a reconstruction grid every N epochs (0: only at the end).")
    vis.add_argument("--num_vis_images", type=int, default=8, help="Validation images in the reconstruction grid.")
    return parser.parse_args(argv)


def resolve_defaults(args: argparse.Namespace) -> dict:
    """Fill data-dependent defaults in ``args`` and return the model config (preset or --resume_from_pretrained,
    then flag overrides)."""
    explicit_sizes = dict(img_size=args.img_size, patch_size=args.patch_size, in_chans=args.input_channels,
                          embed_dim=args.encoder_embed_dim, depth=args.encoder_depth, num_heads=args.encoder_num_heads,
                          mlp_ratio=args.encoder_mlp_ratio, decoder_embed_dim=args.decoder_embed_dim,
                          decoder_depth=args.decoder_depth, decoder_num_heads=args.decoder_num_heads,
                          decoder_mlp_ratio=args.decoder_mlp_ratio)
    args.dataset = default_dataset(args)
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
    positive = ["epochs", "per_gpu_batch_size", "gradient_accumulation_steps", "log_every", "save_checkpoint_interval",
                "num_vis_images", "max_bad_steps", "max_train_steps", "checkpointing_steps", "max_samples", "img_size",
                "input_channels", "patch_size", "encoder_embed_dim", "encoder_depth", "encoder_num_heads",
                "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "encoder_mlp_ratio", "decoder_mlp_ratio"]
    for flag in positive:
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise UserError(f"--{flag} must be positive, got {value}")
    if not 0.0 < args.mask_ratio < 1.0:
        raise UserError(f"--mask_ratio must be between 0 and 1 (exclusive), got {args.mask_ratio}")
    variant = IMPROVED if args.recipe == "improved" else ORIGINAL
    for key, value in variant.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.mask_curriculum_epochs is None:
        args.mask_curriculum_epochs = args.epochs / 4 if args.recipe == "improved" else 0.0
    for flag in ("hf_loss_weight", "uniformity_weight", "mask_curriculum_epochs"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    if not 0.0 < args.pca_variance < 1.0:
        raise UserError(f"--pca_variance must be in (0, 1), got {args.pca_variance}")
    if args.mask_ratio_start is not None and not 0.0 <= args.mask_ratio_start < 1.0:
        raise UserError(f"--mask_ratio_start must be in [0, 1), got {args.mask_ratio_start}")
    if args.mask_strategy == "grid":
        grid_cell(args.mask_ratio)  # one line naming the ratios a grid can give
        if args.mask_ratio_start is not None and args.mask_curriculum_epochs > 0:
            raise UserError("--mask_strategy grid has one ratio per cell size: it cannot follow a curriculum "
                            "(use random or block with --mask_ratio_start)")
    config = mae_config(
        args.model, img_size=args.img_size, patch_size=args.patch_size, in_chans=args.input_channels,
        embed_dim=args.encoder_embed_dim, depth=args.encoder_depth, num_heads=args.encoder_num_heads,
        mlp_ratio=args.encoder_mlp_ratio, decoder_embed_dim=args.decoder_embed_dim, decoder_depth=args.decoder_depth,
        decoder_num_heads=args.decoder_num_heads, decoder_mlp_ratio=args.decoder_mlp_ratio,
        mask_ratio=args.mask_ratio, norm_pix_loss=args.norm_pix_loss, custom_weight_init=args.custom_weight_init,
        mask_strategy=args.mask_strategy,
    )
    if args.resume_from_pretrained:  # the checkpoint's sizes, then the size flags given explicitly
        pretrained, _ = read_weights(args.resume_from_pretrained)
        config.update({key: value for key, value in pretrained.items() if key in SIZE_KEYS})
        config.update({key: value for key, value in explicit_sizes.items() if value is not None})
    args.img_size, args.input_channels, args.patch_size = config["img_size"], config["in_chans"], config["patch_size"]
    return config


def pca_basis(args, run_dir: RunDir, normalize: Normalize, accelerator) -> PCABasis:
    """The run's PCA: its own pca.safetensors (a resumed run), --pca_path, or fitted now on --pca_samples training
    images (main process, saved with the run, then read by every process)."""
    path = run_dir.root / "pca.safetensors"
    source = path if path.exists() else Path(args.pca_path) if args.pca_path else None
    if source is None:
        if accelerator.is_main_process:
            base = build_image_dataset(args.dataset, args.path_to_data, "train", args.input_channels, args.img_size,
                                       args.pca_samples, args.image_column)
            view = ResizeCenterCrop(args.img_size)
            images = [view(item[0]) for item in (base[i] for i in range(len(base))) if item is not None]
            basis = fit_pca(normalize(torch.stack(images).to(accelerator.device)).cpu(), seed=args.seed)
            run_dir.root.mkdir(parents=True, exist_ok=True)
            basis.save(path)
            logger.info("PCA fitted on %d images: %d components kept for %s at %.0f%% of the variance", len(images),
                        basis.count_for_share(args.pca_variance if args.target == "pca_top" else 1 - args.pca_variance),
                        args.target, 100 * args.pca_variance)
        accelerator.wait_for_everyone()
        source = path
    elif not source.exists():
        raise UserError(f"--pca_path {source} does not exist: pass a run's pca.safetensors")
    basis = PCABasis.load(source)
    expected = (args.input_channels, args.img_size, args.img_size)
    if tuple(basis.shape) != expected:
        raise UserError(f"the PCA in {source} was fitted on {basis.shape} images, this run has {expected}: fit a new "
                        "one (drop --pca_path) or match --img_size / --input_channels")
    return basis.to(accelerator.device)


def extra_loss_terms(args, mae: MaskedAutoencoder, images: torch.Tensor, output) -> dict[str, torch.Tensor]:
    """The optional terms, unweighted: ``hf`` (Laplacian of the reconstruction vs the target's, masked pixels)
    and ``uniformity`` (of the mean visible-token embedding of each image in this process's micro-batch)."""
    terms = {}
    if args.hf_loss_weight > 0:
        target = mae.unpatchify(mae.target(images).float())  # pixels, or per-patch normalised pixels
        terms["hf"] = high_frequency_loss(mae.unpatchify(output.pred.float()), target, mae.pixel_mask(output.mask))
    if args.uniformity_weight > 0:
        terms["uniformity"] = uniformity_loss(output.latent[:, 1:].mean(dim=1), args.uniformity_t)
    return terms


def strategy_noise(args, grid_size: tuple[int, int]):
    """The per-sample mask noise of --mask_strategy (None: uniform noise, the plain MAE). Block masks are laid out
    for the largest ratio of the run: a lower curriculum ratio keeps their first blocks."""
    if args.mask_strategy == "random":
        return None
    ratio = max(args.mask_ratio, args.mask_ratio_start or 0.0)
    return partial(mask_noise, args.mask_strategy, grid_size, ratio)


def build_train_loader(args, num_patches: int, grid_size: tuple[int, int], accelerator):
    """Training loader: each process reads its own slice of every optimizer step (see StepBatchSampler)."""
    base = build_image_dataset(args.dataset, args.path_to_data, "train", args.input_channels, args.img_size,
                               args.max_samples, args.image_column,
                               encoded_jpeg=decodes_on_device(args.decode, accelerator.device))
    samples = SeededSamples(base, RandomResizedCropFlip(args.img_size), args.seed, num_patches,
                            strategy_noise(args, grid_size))
    sampler = build_step_sampler(base, args.per_gpu_batch_size, args.gradient_accumulation_steps,
                                 accelerator.num_processes, accelerator.process_index, args.seed,
                                 getattr(args, "shard_resume", None))
    loader = build_loader(samples, EpochChain(sampler), args.num_workers, accelerator.device)
    return loader, sampler


def fixed_vis_batch(args, num_patches: int, grid_size: tuple[int, int]) -> dict:
    """The same validation images and masks for every picture of the run."""
    base = build_image_dataset(args.dataset, args.path_to_data, "val", args.input_channels, args.img_size,
                               args.num_vis_images, args.image_column)
    samples = SeededSamples(base, ResizeCenterCrop(args.img_size), args.seed, num_patches,
                            strategy_noise(args, grid_size))
    return collate_skipping_bad([samples[(i, 0)] for i in range(min(args.num_vis_images, len(samples)))])


@torch.no_grad()
def eigenspace_row(model, mae: MaskedAutoencoder, images: torch.Tensor, noise: torch.Tensor, basis: PCABasis,
                   share: float) -> dict:
    was_training = model.training
    model.eval()
    output = model(images, noise=noise)
    model.train(was_training)
    reconstruction = mae.reconstruct(output.pred.float(), images.float())  # normalised space, as the PCA
    top, bottom = eigenspace_errors(reconstruction, images, mae.pixel_mask(output.mask), basis, share)
    return {"val_error_top": top, "val_error_bottom": bottom}


def save_reconstructions(accelerator, model, vis_batch: dict, normalize: Normalize, run_dir: RunDir,
                         metrics: MetricsLog, step: int, epoch: int, log_metrics: bool = True,
                         eigenspace: tuple[PCABasis, float] | None = None) -> Path:
    """Every process runs the forward (FSDP needs all of them); the main one writes and logs the picture and
    the reconstruction metrics (a metrics.jsonl row of its own)."""
    images = normalize(vis_batch["pixel_values"].to(accelerator.device))
    if log_metrics:
        noise = vis_batch["noise"].to(accelerator.device)
        row = {"step": step, **reconstruction_metrics(model, accelerator.unwrap_model(model), images, noise, normalize)}
        if eigenspace is not None:
            row.update(eigenspace_row(model, accelerator.unwrap_model(model), images, noise, *eigenspace))
        metrics.log(row)
    panels = reconstruction_panels(model, accelerator.unwrap_model(model), images,
                                   vis_batch["noise"].to(accelerator.device), normalize.inverse)
    path = run_dir.root / "reconstructions" / f"epoch_{epoch:04d}_step_{step:08d}.png"
    if accelerator.is_main_process:
        picture = panels_to_picture(panels)
        save_picture(picture, path)
        metrics.log_image("reconstructions", picture, step)
    return path


def main(argv=None) -> None:
    args = parse_args(argv)
    config = resolve_defaults(args)
    # (the seed it sets is the model init's; data order, augmentation and masks have their own seeds)
    run_dir, accelerator = start_run(args, fresh_start=not args.resume_from_checkpoint)
    if accelerator.is_main_process:
        save_args(args, run_dir)
    try:
        train(args, config, run_dir, accelerator)
    finally:
        accelerator.end_training()


def train(args, config: dict, run_dir: RunDir, accelerator) -> None:
    if args.resume_from_pretrained:
        model = MaskedAutoencoder.from_pretrained(args.resume_from_pretrained, **config)
        logger.info("continuing pretraining from %s", args.resume_from_pretrained)
    else:
        model = MaskedAutoencoder(**config)
    with accelerator.main_process_first():  # a Hub data set is downloaded once, then read from the cache
        loader, sampler = build_train_loader(args, model.num_patches, model.grid_size, accelerator)
        vis_batch = fixed_vis_batch(args, model.num_patches, model.grid_size)
    normalize = Normalize(*channel_stats(args.input_channels, args.dataset)).to(accelerator.device)
    needs_pca = args.target != "pixels" or args.eigenspace_metrics
    pca = pca_basis(args, run_dir, normalize, accelerator) if needs_pca else None
    eigenspace = (pca, args.pca_variance) if args.eigenspace_metrics else None

    steps_per_epoch = sampler.steps_per_epoch
    total_steps = args.max_train_steps or args.epochs * steps_per_epoch
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    peak_lr = scaled_learning_rate(args.base_learning_rate, args.per_gpu_batch_size, accelerator.num_processes)
    optimizer = build_adamw(param_groups_weight_decay(model, args.weight_decay), peak_lr, device=accelerator.device)
    apply_speed_options(model, args)
    model, optimizer = accelerator.prepare(model, optimizer)

    # What the run carries between steps; saved in every checkpoint so that a resumed run logs the same rows.
    state = {"step": 0, "steps_per_epoch": steps_per_epoch, "global_batch": sampler.global_batch,
             "num_processes": accelerator.num_processes,
             "log_loss_sum": 0.0, "log_steps": 0, "skipped_images": 0}
    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, run_dir.checkpoints) if args.resume_from_checkpoint else None
    if checkpoint is not None:
        state.update(resume_from(accelerator, checkpoint, run_dir.checkpoints, steps_per_epoch, sampler.global_batch))
        logger.info("resumed from %s at step %d (epoch %d)", checkpoint, state["step"], state["step"] // steps_per_epoch)
    elif args.resume_from_checkpoint in ("latest", "auto"):
        logger.info("no checkpoint under %s yet: starting fresh", run_dir.checkpoints)
    step = state["step"]
    metrics = MetricsLog(accelerator, run_dir.metrics, resume_step=step)
    logger.info("%d samples, %d steps/epoch, %d steps in all, global batch %d (micro-batch %d x %d accumulation x %d "
                "processes), peak lr %.3g, %s precision", len(loader.dataset), steps_per_epoch, total_steps,
                sampler.global_batch, sampler.micro_batch, args.gradient_accumulation_steps, accelerator.num_processes,
                peak_lr, accelerator.mixed_precision)

    def count_skipped() -> int:
        """Unreadable images so far, over all processes (a collective: call it on every process)."""
        nonlocal skipped_images
        skipped_images += int(accelerator.reduce(skipped_pending, reduction="sum"))
        skipped_pending.zero_()
        return skipped_images

    def checkpoint_now() -> None:
        guard.check(step)
        count_skipped()
        interval = averages.state()
        state.update(step=step, epoch=step // steps_per_epoch, log_loss_sum=interval["loss_sum"],
                     log_steps=interval["loss_steps"], log_term_sums=interval["term_sums"],
                     bad_steps_in_a_row=guard.in_a_row, skipped_images=skipped_images, **sampler.state_dict(step))
        save_checkpoint(accelerator, run_dir.checkpoints, step, state, args.keep_checkpoints, config)

    accumulation = args.gradient_accumulation_steps
    guard = BadStepGuard(args.max_bad_steps, "pretrain_mae.py", run_dir.checkpoints, accelerator.device,
                         state.get("bad_steps_in_a_row", 0))
    progress = tqdm(total=total_steps, initial=step, disable=not accelerator.is_main_process, desc="pretrain")
    throughput = Throughput()
    averages = StepAverages(accelerator.device, state["log_loss_sum"], state["log_steps"], state.get("log_term_sums"))
    skipped_images = state["skipped_images"]
    last_saved_step, last_batch = step, None
    skipped_pending = torch.zeros((), device=accelerator.device)
    loss_weights = {"hf": args.hf_loss_weight, "uniformity": args.uniformity_weight}
    extra_losses = any(weight > 0 for weight in loss_weights.values())
    plain_mae, last_vis_step = accelerator.unwrap_model(model), None
    model.train()
    stop, stopping = StopSignal(), False
    loader.batch_sampler.first_step = step  # (EpochChain) one iterator for the rest of the run, across epochs
    device_batches = DeviceBatches(loader, accelerator.device, ahead=args.decode_ahead)
    micro_batches = iter(device_batches) if step < total_steps else None  # (no workers for a finished run)
    while step < total_steps and not stopping:
        for _ in range(min(steps_per_epoch - step % steps_per_epoch, total_steps - step)):
            lr = warmup_cosine(step, total_steps, warmup_steps, peak_lr, args.min_learning_rate)
            set_learning_rate(optimizer, lr)
            mask_ratio = curriculum_ratio(step, steps_per_epoch, args.mask_ratio, args.mask_ratio_start,
                                          args.mask_curriculum_epochs)
            step_loss, step_terms = torch.zeros((), device=accelerator.device), {}
            for micro in range(accumulation):
                batch = next(micro_batches)  # on the device
                skipped_pending += batch["num_skipped"]
                batch, weight = readable_batch(batch, last_batch)
                last_batch = batch
                with sync_context(accelerator, model, micro, accumulation):
                    images = normalize(batch["pixel_values"])
                    targets = (pca_target(images, pca, args.target, args.pca_variance) if args.target != "pixels"
                               else None)
                    output = model(images, noise=batch["noise"], mask_ratio=mask_ratio, target_images=targets)
                    loss = output.loss
                    if extra_losses:
                        terms = extra_loss_terms(args, plain_mae, images if targets is None else targets, output)
                        loss = loss + sum(loss_weights[name] * value for name, value in terms.items())
                        for name, value in {"pixel": output.loss, **terms}.items():
                            step_terms[f"loss_{name}"] = step_terms.get(f"loss_{name}", 0.0) + value.detach() / accumulation
                    loss = loss * weight
                    accelerator.backward(loss / accumulation)
                step_loss += loss.detach() / accumulation
                throughput.add(batch["pixel_values"].shape[0] * accelerator.num_processes)
            # (nothing read back to the host until the next log: skipped steps are counted on the device)
            skipped, grad_norm, step_loss = guarded_optimizer_step(accelerator, model, optimizer, step_loss,
                                                                   args.max_grad_norm)
            step += 1
            progress.update(1)
            guard.update(skipped)
            averages.add({"loss": step_loss, **step_terms}, skipped)  # (terms: this process's; the loss: the mean)
            # A skipped step (its update not applied) gets no row (the next applied one logs its interval) and no
            # scheduled checkpoint.
            if (step % args.log_every == 0 or step == total_steps) and not guard.check(step):
                row = {"step": step, "epoch": round(step / steps_per_epoch, 4), **averages.read()[1],
                       "lr": lr, "mask_ratio": mask_ratio, "grad_norm": float(grad_norm),
                       "images_per_sec": round(throughput.rate(), 2),
                       "skipped_images": count_skipped()}
                metrics.log(row)
                progress.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{row['images_per_sec']:.0f}")
                averages.reset()
            if args.checkpointing_steps and step % args.checkpointing_steps == 0 and not guard.check(step):
                checkpoint_now()
                last_saved_step = step
            if stop.requested(accelerator):  # (the epoch-end work below still runs if this step ended an epoch)
                stopping = True
                break
        if step % steps_per_epoch == 0:  # an epoch ended
            finished_epochs = step // steps_per_epoch
            if args.vis_every and finished_epochs % args.vis_every == 0:
                save_reconstructions(accelerator, model, vis_batch, normalize, run_dir, metrics, step, finished_epochs,
                                     eigenspace=eigenspace)
                last_vis_step = step
            if finished_epochs % args.save_checkpoint_interval == 0 and last_saved_step != step:
                checkpoint_now()
                last_saved_step = step
    progress.close()
    device_batches.close()

    if last_saved_step != step:
        checkpoint_now()
    if stopping and step < total_steps:
        stop.exit_preempted(step, total_steps, run_dir.checkpoints)
    save_final_weights(accelerator, model, run_dir.final)
    picture = save_reconstructions(accelerator, model, vis_batch, normalize, run_dir, metrics, step,
                                   math.ceil(step / steps_per_epoch), log_metrics=last_vis_step != step,
                                   eigenspace=eigenspace)
    logger.info("done: %d steps; weights in %s, reconstructions in %s", step, run_dir.final, picture)
    if args.push_to_hub and accelerator.is_main_process:
        rows = run_dir.metrics.read_text().splitlines() if run_dir.metrics.exists() else []
        push_run(accelerator, args, run_dir.root, "pretraining", json.loads(rows[-1]) if rows else {}, picture)
    if skipped_images:
        logger.warning("%d unreadable images were skipped", skipped_images)


if __name__ == "__main__":
    run_cli(main)
