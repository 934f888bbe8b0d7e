"""Turn a pretrained MAE encoder into a classifier: fine-tuning, linear probing, frozen features + MLP, or
the same ViT from scratch (the baseline), with 🤗 Accelerate.

    accelerate launch finetune_classifier.py --path_to_pretrained_mae_weights work_dir/<run>/final
    accelerate launch finetune_classifier.py --path_to_pretrained_mae_weights work_dir/<run>/final --linear_probe
    accelerate launch finetune_classifier.py --from_scratch

Everything a run writes goes to <working_directory>/<experiment_name>/: checkpoints/, final/ (the
classifier, VisionTransformer.from_pretrained), metrics.jsonl, results.json and args.json.
"""
from __future__ import annotations

import argparse
import json
import logging

from engine import TrainConfig, Trainer
from engine.flags import add_data_args, add_data_on_device_arg, add_run_args, default_dataset
from engine.setup import leave_multiprocess_run, start_run
from models import MAE_PRESETS, encoder_config, mae_config
from models.weights import encoder_state, read_weights
from pipeline.transforms import timm_rand_augment
from tasks.classification import FROZEN_MODES, Classification
from utils.config import HelpFormatter, apply_recipe, parse_with_config
from utils.errors import UserError, run_cli

logger = logging.getLogger("finetune_classifier")

SMALL_DATASETS = ("fashion_mnist", "synthetic")  # their defaults: recipes/defaults/<mode>_builtin.yaml


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    mode = parser.add_argument_group("mode (default: fine-tune the whole ViT)")
    mode.add_argument("--linear_probe", action="store_true",
                      help="Frozen encoder, BatchNorm (no affine) + linear head, LARS, no weight decay.")
    mode.add_argument("--freeze_encoder", action="store_true", help="Frozen encoder + a small MLP head (AdamW).")
    mode.add_argument("--from_scratch", action="store_true",
                      help="No pretrained weights, the baseline (with --linear_probe / --freeze_encoder: a randomly "
                           "initialised, frozen encoder, the random-features baseline).")
    mode.add_argument("--eval_only", action="store_true",
                      help="Only evaluate the model (from --resume_from_checkpoint or the pretrained weights).")
    mode.add_argument("--cache_features", action=argparse.BooleanOptionalAction, default=None,
                      help="Frozen modes: train the head on features of one fixed view per image, computed once "
                           "(default on the built-in sets; elsewhere every epoch augments, as the official probe).")
    data = add_data_args(parser, "ImageNet-layout folder (train/ and val/ or validation/, one subfolder per class); "
                                 "a 🤗 dataset (--dataset hf:...) needs image and label columns.")
    data.add_argument("--num_classes", type=int, default=None, help="Number of classes (default: from the data).")
    data.add_argument("--max_val_samples", type=int, default=None, help="Evaluate on the first N validation images only.")
    add_data_on_device_arg(data)
    model = parser.add_argument_group("model")
    model.add_argument("--path_to_pretrained_mae_weights", type=str, default=None,
                       help="pretrain_mae.py output (its final/ folder, a checkpoints/step_* folder or a .safetensors "
                            "file); the encoder's sizes come from its config.json.")
    model.add_argument("--model", type=str, default=None, choices=sorted(MAE_PRESETS),
                       help="Encoder preset when there are no pretrained weights to read it from "
                            "(default: mae_vit_tiny_patch4 for the small built-in sets, else mae_vit_base_patch16).")
    model.add_argument("--img_size", type=int, default=None, help="Input resolution (default: the pretraining one).")
    model.add_argument("--input_channels", type=int, default=None, help="Image channels (default: the encoder's).")
    model.add_argument("--cls_token", action="store_true",
                       help="Classify from the cls token (default: global average pooling + norm when fine-tuning).")
    model.add_argument("--mean_pooling", action="store_true",
                       help="Linear probe / frozen features from the mean of the patch tokens (default: cls token).")
    model.add_argument("--drop_path", type=float, default=None, help="Stochastic depth rate (fine-tuning).")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--learning_rate", type=float, default=None,
                       help="Peak learning rate; default: --base_learning_rate x per_gpu_batch_size x processes / 256.")
    optim.add_argument("--base_learning_rate", type=float, default=None,
                       help="Base lr per 256 images (defaults per mode: 5e-4 fine-tune, 0.1 linear probe, 1e-3 MLP).")
    optim.add_argument("--min_learning_rate", type=float, default=1e-6, help="Floor of the cosine decay.")
    optim.add_argument("--layer_decay", type=float, default=None,
                       help="Layer-wise lr decay (0.75 ViT-B in the small-set recipe, 0.65 official ViT-B/L; 1 = off).")
    optim.add_argument("--max_bad_steps", type=int, default=20, help="Stop after this many non-finite steps in a row.")
    aug = parser.add_argument_group("augmentation (fine-tuning)")
    aug.add_argument("--auto_augment", type=str, default=None,
                     help="timm RandAugment policy, the official rand-m9-mstd0.5-inc1 on real data ('none': off).")
    aug.add_argument("--random_aug_magnitude", type=int, default=None,
                     help="torchvision's RandAugment at this magnitude instead of timm's (0 = off).")
    aug.add_argument("--random_aug_ops", type=int, default=2, help="torchvision RandAugment operations per image.")
    aug.add_argument("--mixup_alpha", type=float, default=None, help="Mixup alpha (0 = off).")
    aug.add_argument("--cutmix_alpha", type=float, default=None, help="CutMix alpha (0 = off).")
    aug.add_argument("--mixup_prob", type=float, default=1.0, help="Probability of mixing a batch at all.")
    aug.add_argument("--mixup_switch_prob", type=float, default=0.5, help="Probability of CutMix when both are on.")
    aug.add_argument("--label_smoothing", type=float, default=None, help="Label smoothing.")
    aug.add_argument("--random_erasing", type=float, default=None, help="Random-erasing probability.")
    aug.add_argument("--min_crop_scale", type=float, default=None, help="RandomResizedCrop's smallest area share.")
    aug.add_argument("--model_ema", action="store_true", help="Keep an EMA of the weights and evaluate it too.")
    aug.add_argument("--model_ema_decay", type=float, default=0.9999, help="EMA decay per optimizer step.")
    add_run_args(parser)
    parser.set_defaults(weight_decay=None)
    return parse_with_config(parser, argv)


def run_mode(args) -> str:
    if args.linear_probe and args.freeze_encoder:
        raise UserError("--linear_probe and --freeze_encoder are two different modes: pass one")
    # --from_scratch with a frozen mode probes a randomly initialised encoder: the random-features baseline.
    return "linear_probe" if args.linear_probe else "freeze_encoder" if args.freeze_encoder else "finetune"


def resolve_defaults(args) -> tuple[str, dict | None, dict | None]:
    """Fill mode- and data-dependent defaults; return (mode, encoder config, pretrained state or None)."""
    mode = run_mode(args)
    args.dataset = default_dataset(args)
    small = args.dataset in SMALL_DATASETS
    if mode == "finetune" and args.from_scratch and args.layer_decay is None:
        args.layer_decay = 1.0  # a transfer-learning device: random weights train every layer at the full rate
    asked_auto_augment = args.auto_augment not in (None, "none")
    if args.random_aug_magnitude is not None and args.auto_augment is None:
        args.auto_augment = "none"  # torchvision's RandAugment, asked for by name
    apply_recipe(args, f"defaults/{mode}_builtin" if small else f"defaults/{mode}")
    args.cache_features = bool(args.cache_features)
    if args.auto_augment == "none":
        args.auto_augment = None
    if args.auto_augment and args.random_aug_magnitude:
        raise UserError("--auto_augment and --random_aug_magnitude are two RandAugments: pass one of them")
    if mode in FROZEN_MODES:
        args.weight_decay = 0.0 if mode == "linear_probe" else (args.weight_decay or 0.0)
        args.drop_path = 0.0
    for flag in ("epochs", "per_gpu_batch_size", "max_train_steps", "num_classes", "img_size", "max_samples",
                 "max_val_samples"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise UserError(f"--{flag} must be positive, got {value}")
    if args.max_grad_norm is None:
        args.max_grad_norm = 0.0

    state = None
    if args.path_to_pretrained_mae_weights and not args.from_scratch:
        pretrained_config, weights = read_weights(args.path_to_pretrained_mae_weights, args.revision)  # any format
        config = encoder_config(pretrained_config)
        state = encoder_state(weights)
    elif not args.from_scratch and not args.eval_only:
        raise UserError("no pretrained weights: pass --path_to_pretrained_mae_weights DIR (a pretrain_mae.py final/ "
                        "folder), or --from_scratch for the baseline")
    else:
        args.model = args.model or ("mae_vit_tiny_patch4" if small else "mae_vit_base_patch16")
        config = encoder_config(mae_config(args.model))
        if args.dataset == "fashion_mnist":
            config["in_chans"] = 1
    if args.img_size:
        config["img_size"] = args.img_size
    if args.input_channels:
        config["in_chans"] = args.input_channels
    args.img_size, args.input_channels = config["img_size"], config["in_chans"]
    if args.auto_augment and args.input_channels not in (1, 3):  # timm's operations work on L and RGB pictures
        if asked_auto_augment:
            raise UserError(f"--auto_augment works on 1- or 3-channel images, not {args.input_channels}: drop it (or "
                            "use --random_aug_magnitude)")
        args.auto_augment = None
    if args.auto_augment:
        timm_rand_augment(args.auto_augment, args.img_size, (0.5,) * args.input_channels)  # a bad policy: one line now
    if args.experiment_name is None:
        source = "scratch" if args.from_scratch else "mae"
        args.experiment_name = f"{mode}_{source}_{args.dataset.replace('hf:', '').replace('/', '_')}"
    return mode, config, state


def main(argv=None) -> None:
    args = parse_args(argv)
    mode, config, pretrained_state = resolve_defaults(args)
    loop = TrainConfig.from_args(args)  # (checks the loop's settings before anything starts)
    run_dir, accelerator, args = start_run(args, fresh_start=not args.resume_from_checkpoint and not args.eval_only)
    try:
        task = Classification(args, mode, config, pretrained_state, run_dir)
        trainer = Trainer(loop, accelerator, run_dir, task)
        if not args.eval_only:
            trainer.fit()
            return
        result = trainer.evaluate_only()  # leaves the run's metrics.jsonl, args.json and results.json as they are
        if accelerator.is_main_process:
            run_dir.root.mkdir(parents=True, exist_ok=True)
            (run_dir.root / "eval_results.json").write_text(json.dumps(result, indent=2))
        logger.info("eval: top-1 %.2f%%, top-5 %.2f%%; written to %s", result["top1"], result["top5"],
                    run_dir.root / "eval_results.json")
    finally:
        accelerator.end_training()


if __name__ == "__main__":
    run_cli(main)
    leave_multiprocess_run()
