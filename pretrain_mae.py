"""Pretrain a Masked Autoencoder with 🤗 Accelerate, from a laptop CPU to a multi-node GPU cluster.

    accelerate launch pretrain_mae.py                      # tiny MAE on Fashion-MNIST (the CPU demo)
    accelerate launch pretrain_mae.py --path_to_data /data/imagenet --model mae_vit_base_patch16 ...

Everything a run writes goes to <working_directory>/<experiment_name>/: checkpoints/, final/,
reconstructions/, metrics.jsonl and args.json.
"""
from __future__ import annotations

import argparse

from engine import TrainConfig, Trainer
from engine.flags import add_data_args, add_data_on_device_arg, add_run_args, default_dataset
from engine.setup import leave_multiprocess_run, save_args, start_run
from models import MAE_PRESETS, mae_config
from models.masking import MASK_STRATEGIES, grid_cell
from models.pca import TARGETS
from models.weights import read_weights
from pipeline.transforms import channel_stats
from tasks.pretraining import Pretraining
from utils.config import HelpFormatter, apply_recipe, parse_with_config
from utils.errors import UserError, run_cli

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
    data.add_argument("--decode", type=str, default="auto", choices=["auto", "cpu", "device", "dali"],
                      help="Where a folder's JPEGs are decoded: cpu (loader workers), device (decode_jpeg on the "
                           "training device, nvJPEG on a GPU), dali (NVIDIA DALI, partly on the GPU's hardware JPEG "
                           "decoder, each crop's window only: pip install nvidia-dali-cuda130) or auto (device when "
                           "training on a GPU); all cut the same crops, with pixels within about two levels of each "
                           "other.")
    data.add_argument("--decode_ahead", action="store_true",
                      help="With JPEGs decoded on a GPU, decode the next batch on its own CUDA stream while the "
                           "current step trains (same batches; by default the decode runs between steps).")
    add_data_on_device_arg(data)
    data.add_argument("--streaming", action="store_true",
                      help="Stream the 🤗 dataset (hf:NAME) instead of downloading it: each process and loader worker "
                           "reads its own data files; epochs of --max_samples images or the split's row count.")
    data.add_argument("--shuffle_buffer", type=int, default=10_000, help="--streaming: images in the shuffle buffer.")
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
    if args.streaming and not args.dataset.startswith("hf:"):
        raise UserError(f"--streaming reads a 🤗 dataset: pass --dataset hf:NAME (this run reads {args.dataset})")
    if args.model is None:
        args.model = "mae_vit_tiny_patch4" if args.dataset in SMALL_DATASETS else "mae_vit_base_patch16"
    apply_recipe(args, "defaults/pretrain_builtin" if args.dataset in SMALL_DATASETS else "defaults/pretrain")
    if args.input_channels is None and args.dataset == "fashion_mnist":
        args.input_channels = 1
    if args.experiment_name is None:
        args.experiment_name = f"{args.model}_{args.dataset.replace('hf:', '').replace('/', '_')}"
    if args.max_grad_norm is None:
        args.max_grad_norm = 0.0
    positive = ["epochs", "per_gpu_batch_size", "num_vis_images", "max_train_steps", "checkpointing_steps", "max_samples",
                "img_size", "input_channels", "patch_size", "encoder_embed_dim", "encoder_depth", "encoder_num_heads",
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
        pretrained, _ = read_weights(args.resume_from_pretrained, args.revision)
        config.update({key: value for key, value in pretrained.items() if key in SIZE_KEYS})
        config.update({key: value for key, value in explicit_sizes.items() if value is not None})
    args.img_size, args.input_channels, args.patch_size = config["img_size"], config["in_chans"], config["patch_size"]
    mean, std = channel_stats(config["in_chans"], args.dataset)
    config.update(image_mean=list(mean), image_std=list(std))  # saved with the weights, for inference
    return config


def main(argv=None) -> None:
    args = parse_args(argv)
    config = resolve_defaults(args)
    loop = TrainConfig.from_args(args)  # (checks the loop's settings before anything starts)
    # (the seed it sets is the model init's; data order, augmentation and masks have their own seeds)
    run_dir, accelerator, args = start_run(args, fresh_start=not args.resume_from_checkpoint)
    if accelerator.is_main_process:
        save_args(args, run_dir)
    try:
        Trainer(loop, accelerator, run_dir, Pretraining(args, config, run_dir)).fit()
    finally:
        accelerator.end_training()


if __name__ == "__main__":
    run_cli(main)
    leave_multiprocess_run()
