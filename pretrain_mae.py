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

from engine import Task, TrainConfig, Trainer
from engine.flags import add_data_args, add_run_args, default_dataset
from engine.optim import build_adamw, param_groups_weight_decay
from engine.records import MetricsLog
from engine.schedule import scaled_learning_rate, warmup_cosine
from engine.setup import RunDir, save_args, start_run
from models import MAE_PRESETS, MaskedAutoencoder, mae_config
from models.losses import high_frequency_loss, uniformity_loss
from models.masking import MASK_STRATEGIES, curriculum_ratio, grid_cell, mask_noise
from models.pca import TARGETS, PCABasis, eigenspace_errors, fit_pca, pca_target
from models.weights import read_weights
from pipeline.datasets import build_image_dataset
from pipeline.device_decode import decodes_on_device
from pipeline.loading import build_loader
from pipeline.samples import SeededSamples, collate_skipping_bad
from pipeline.sampling import EpochChain
from pipeline.shards import build_step_sampler
from pipeline.transforms import Normalize, RandomResizedCropFlip, ResizeCenterCrop, channel_stats
from utils.config import HelpFormatter, apply_recipe, parse_with_config
from utils.errors import UserError, run_cli
from utils.hub import push_run
from utils.metrics import reconstruction_metrics
from utils.visualize import panels_to_picture, reconstruction_panels, save_picture

logger = logging.getLogger("pretrain_mae")

SMALL_DATASETS = ("fashion_mnist", "synthetic")  # their defaults: recipes/defaults/pretrain_builtin.yaml
# The "improved MAE" recipe (weights chosen here: the Laplacian term at about the pixel loss's scale on
# normalised pixels, the uniformity term small enough not to dominate early training).
IMPROVED = dict(mask_ratio_start=0.5, hf_loss_weight=0.5, uniformity_weight=0.05)
ORIGINAL = dict(hf_loss_weight=0.0, uniformity_weight=0.0)
SIZE_KEYS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "decoder_embed_dim",
             "decoder_depth", "decoder_num_heads", "decoder_mlp_ratio", "layer_norm_eps", "learned_pos_embed")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    data = add_data_args(parser, "Folder of images (ImageNet layout with train/ and val/, class subfolders, or loose "
                                 "images); for fashion_mnist, a folder with its IDX files.")
    data.add_argument("--decode", type=str, default="auto", choices=["auto", "cpu", "device"],
                      help="Where a folder's JPEGs are decoded: cpu (loader workers), device (decode_jpeg on the "
                           "training device, nvJPEG on a GPU) or auto (device when training on a GPU); both cut the "
                           "same crops, with pixels within about one level of each other.")
    data.add_argument("--decode_ahead", action="store_true",
                      help="With JPEGs decoded on a GPU, decode the next batch on its own CUDA stream while the "
                           "current step trains (same batches; by default the decode runs between steps).")
    model = parser.add_argument_group("model (a preset, overridable flag by flag)")
    model.add_argument("--model", type=str, default=None, choices=sorted(MAE_PRESETS),
                       help="Preset (default: mae_vit_tiny_patch4 for fashion_mnist/synthetic, "
                            "else mae_vit_base_patch16).")
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
                       help="Continue pretraining from these weights: a folder, file or 🤗 Hub repo (this project's, "
                            "🤗 ViTMAE, facebookresearch/mae .pth or timm) whose sizes apply unless size flags "
                            "override; an encoder-only checkpoint gets a fresh decoder.")
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
                       help="original: the plain MAE; improved: curriculum masking 0.5 -> --mask_ratio over the first "
                            "quarter of the epochs, Laplacian loss and uniformity; flags still override.")
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
    return parse_with_config(parser, argv)


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
    apply_recipe(args, "defaults/pretrain_builtin" if args.dataset in SMALL_DATASETS else "defaults/pretrain")
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


class Pretraining(Task):
    """The MAE objective: masked-patch reconstruction (pixels or a PCA-filtered target), the optional Laplacian and
    uniformity terms, curriculum masking; reconstruction grids as its evaluation."""

    name, script = "pretrain", "pretrain_mae.py"

    def __init__(self, args, config: dict, run_dir: RunDir):
        self.args, self.config, self.run_dir, self.model_config = args, config, run_dir, config
        self.loss_weights = {"hf": args.hf_loss_weight, "uniformity": args.uniformity_weight}
        self.picture = None

    def build(self, accelerator):
        args = self.args
        if args.resume_from_pretrained:
            model = MaskedAutoencoder.from_pretrained(args.resume_from_pretrained, **self.config)
            logger.info("continuing pretraining from %s", args.resume_from_pretrained)
        else:
            model = MaskedAutoencoder(**self.config)
        with accelerator.main_process_first():  # a Hub data set is downloaded once, then read from the cache
            loader, sampler = build_train_loader(args, model.num_patches, model.grid_size, accelerator)
            self.vis_batch = fixed_vis_batch(args, model.num_patches, model.grid_size)
        self.accelerator = accelerator
        self.normalize = Normalize(*channel_stats(args.input_channels, args.dataset)).to(accelerator.device)
        needs_pca = args.target != "pixels" or args.eigenspace_metrics
        self.pca = pca_basis(args, self.run_dir, self.normalize, accelerator) if needs_pca else None
        self.eigenspace = (self.pca, args.pca_variance) if args.eigenspace_metrics else None
        self.peak_lr = scaled_learning_rate(args.base_learning_rate, args.per_gpu_batch_size, accelerator.num_processes)
        optimizer = build_adamw(param_groups_weight_decay(model, args.weight_decay), self.peak_lr,
                                device=accelerator.device)
        return model, optimizer, sampler, loader

    def prepared(self, model, accelerator) -> None:
        self.plain_mae = accelerator.unwrap_model(model)

    def started(self) -> None:
        trainer, args, accelerator = self.trainer, self.args, self.accelerator
        logger.info("%d samples, %d steps/epoch, %d steps in all, global batch %d (micro-batch %d x %d accumulation x "
                    "%d processes), peak lr %.3g, %s precision", len(trainer.loader.dataset), trainer.steps_per_epoch,
                    trainer.total_steps, trainer.sampler.global_batch, trainer.sampler.micro_batch,
                    args.gradient_accumulation_steps, accelerator.num_processes, self.peak_lr,
                    accelerator.mixed_precision)

    def learning_rate(self, step: int, total_steps: int, steps_per_epoch: int) -> float:
        warmup = round(self.args.warmup_epochs * steps_per_epoch)
        return warmup_cosine(step, total_steps, warmup, self.peak_lr, self.args.min_learning_rate)

    def step_values(self, step: int, steps_per_epoch: int) -> dict:
        args = self.args
        return {"mask_ratio": curriculum_ratio(step, steps_per_epoch, args.mask_ratio, args.mask_ratio_start,
                                               args.mask_curriculum_epochs)}

    def loss(self, model, batch: dict, values: dict):
        args = self.args
        images = self.normalize(batch["pixel_values"])
        targets = pca_target(images, self.pca, args.target, args.pca_variance) if args.target != "pixels" else None
        output = model(images, noise=batch["noise"], mask_ratio=values["mask_ratio"], target_images=targets)
        if not any(weight > 0 for weight in self.loss_weights.values()):
            return output.loss, {}
        terms = extra_loss_terms(args, self.plain_mae, images if targets is None else targets, output)
        loss = output.loss + sum(self.loss_weights[name] * value for name, value in terms.items())
        return loss, {f"loss_{name}": value for name, value in {"pixel": output.loss, **terms}.items()}

    def eval_every(self, steps_per_epoch: int) -> int:
        return self.args.vis_every * steps_per_epoch

    def evaluate(self, model, step: int) -> dict:
        self.picture = save_reconstructions(self.accelerator, model, self.vis_batch, self.normalize, self.run_dir,
                                            self.trainer.metrics, step,
                                            math.ceil(step / self.trainer.steps_per_epoch), eigenspace=self.eigenspace)
        return {}

    def finish(self, model, step: int, result: dict) -> None:
        args, run_dir = self.args, self.run_dir
        logger.info("done: %d steps; weights in %s, reconstructions in %s", step, run_dir.final, self.picture)
        if args.push_to_hub and self.accelerator.is_main_process:
            rows = run_dir.metrics.read_text().splitlines() if run_dir.metrics.exists() else []
            push_run(self.accelerator, args, run_dir.root, "pretraining", json.loads(rows[-1]) if rows else {},
                     self.picture)


def main(argv=None) -> None:
    args = parse_args(argv)
    config = resolve_defaults(args)
    # (the seed it sets is the model init's; data order, augmentation and masks have their own seeds)
    run_dir, accelerator = start_run(args, fresh_start=not args.resume_from_checkpoint)
    if accelerator.is_main_process:
        save_args(args, run_dir)
    try:
        Trainer(TrainConfig.from_args(args), accelerator, run_dir, Pretraining(args, config, run_dir)).fit()
    finally:
        accelerator.end_training()


if __name__ == "__main__":
    run_cli(main)
