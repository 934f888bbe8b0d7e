"""Semantic segmentation with a pretrained MAE encoder: ViT + pyramid neck + UperNet (the MAE paper's ADE20K
transfer), with 🤗 Accelerate; without --path_to_data, on built-in Fashion-MNIST canvases (11 classes).

    accelerate launch finetune_segmentation.py --path_to_backbone_checkpoint work_dir/<pretraining run>/final
    accelerate launch finetune_segmentation.py --from_scratch                      # the baseline
    accelerate launch finetune_segmentation.py --path_to_data data/ADEChallengeData2016 \\
        --path_to_backbone_checkpoint <ViT-B/16 MAE>/final          # ADE20K, MMSegmentation's MAE recipe

Everything a run writes goes to <working_directory>/<experiment_name>/: checkpoints/, final/
(ViTUperNet.from_pretrained), predictions/ (overlays), metrics.jsonl, results.json and args.json.
"""
from __future__ import annotations

import argparse
import os

from engine import TrainConfig, Trainer
from engine.flags import add_data_args, add_run_args, default_dataset
from engine.setup import leave_multiprocess_run, start_run
from models import MAE_PRESETS, encoder_config, mae_config
from models.weights import encoder_state, read_weights
from pipeline.segmentation import ADE20K_NUM_CLASSES, FashionMNISTCanvases, default_zero_is_ignore
from tasks.segmentation import BUILT_IN, Segmentation
from utils.config import HelpFormatter, parse_with_config, read_config
from utils.errors import UserError, run_cli


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    data = add_data_args(parser, "ADEChallengeData2016/ (images/ and annotations/, {training,validation}), or a "
                                 "folder with images/{train,val}/ and same-named masks in annotations/{train,val}/.",
                         built_in=f"{BUILT_IN} (built in: Fashion-MNIST canvases)")
    data.add_argument("--mask_column", type=str, default=None, help="Mask column of a 🤗 dataset (default: guessed).")
    data.add_argument("--num_classes", type=int, default=None,
                      help="Classes (default: 11 for the canvases, 150 for ADE20K; needed for other data).")
    data.add_argument("--reduce_zero_label", action=argparse.BooleanOptionalAction, default=None,
                      help="Masks use 0 for 'no label' (ignored) and 1..K for the classes (default: on for ADE20K).")
    data.add_argument("--max_val_samples", type=int, default=None, help="Evaluate on the first N validation images only.")
    data.add_argument("--base_size", type=int, default=None,
                      help="Short side images are resized to before scale jitter / for evaluation (default: --img_size).")
    data.add_argument("--scale_range", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                      help="Random rescaling of the base size in training (default: 0.5 2.0; 0.75 1.5 for the canvases).")
    data.add_argument("--photometric", action=argparse.BooleanOptionalAction, default=True,
                      help="Brightness/contrast (and RGB saturation/hue) jitter on the training images.")
    model = parser.add_argument_group("model")
    model.add_argument("--path_to_backbone_checkpoint", type=str, default=None,
                       help="pretrain_mae.py output (final/ or checkpoints/step_* folder, or a .safetensors file), or "
                            "a finetune_classifier.py final/ folder; the ViT's sizes come from its config.json.")
    model.add_argument("--from_scratch", action="store_true", help="No pretrained weights: the baseline.")
    model.add_argument("--model", type=str, default=None, choices=sorted(MAE_PRESETS),
                       help="Backbone preset with --from_scratch (default: mae_vit_tiny_patch4 for the canvases, "
                            "else mae_vit_base_patch16).")
    model.add_argument("--img_size", type=int, default=None,
                       help="Training crop and sliding-window size (default: 512; 48 for the canvases).")
    model.add_argument("--input_channels", type=int, default=None, help="Image channels (default: the backbone's).")
    model.add_argument("--out_indices", type=int, nargs=4, default=None, metavar="BLOCK",
                       help="Blocks (0-based) whose outputs feed the pyramid (default: 3 5 7 11 for 12 blocks, "
                            "spread evenly otherwise).")
    model.add_argument("--decoder_channels", type=int, default=None,
                       help="UperNet channels (default: the ViT width, 768 for ViT-B; 64 for the canvases).")
    model.add_argument("--aux_channels", type=int, default=None, help="Auxiliary FCN head channels (0 = no aux head).")
    model.add_argument("--aux_loss_weight", type=float, default=0.4, help="Weight of the auxiliary head's loss.")
    model.add_argument("--drop_path", type=float, default=None, help="Stochastic depth rate of the backbone.")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--learning_rate", type=float, default=None,
                       help="Peak AdamW lr, not scaled by the batch (1e-4 for ADE20K's global batch of 16; 1e-3 for "
                            "the canvases).")
    optim.add_argument("--min_learning_rate", type=float, default=0.0, help="Floor of the decay.")
    optim.add_argument("--lr_schedule", type=str, default="poly", choices=["poly", "cosine"],
                       help="Decay after the warmup: poly (power 1, MMSegmentation) or cosine.")
    optim.add_argument("--warmup_steps", type=int, default=None,
                       help="Linear-warmup steps (default: 1500; 10%% of the run on the canvases).")
    optim.add_argument("--layer_decay", type=float, default=None, help="Layer-wise lr decay of the backbone (1 = off).")
    optim.add_argument("--max_bad_steps", type=int, default=20, help="Stop after this many non-finite steps in a row.")
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--eval_every", type=int, default=None,
                            help="Evaluate every N steps (default: every epoch; 16000 steps on real data) and at the end.")
    evaluation.add_argument("--eval_batch_size", type=int, default=None,
                            help="Validation images per forward (default 1: sizes vary; 64 for the canvases).")
    evaluation.add_argument("--slide_stride", type=int, default=None,
                            help="Sliding-window stride for images larger than the crop (default: 2/3 of it, 341 for 512).")
    evaluation.add_argument("--num_pictures", type=int, default=8, help="Validation images drawn with their prediction.")
    add_run_args(parser)
    return parse_with_config(parser, argv)


def resolve_defaults(args) -> tuple[dict, dict | None]:
    """Fill data-dependent defaults; return (backbone config, pretrained encoder state or None)."""
    args.dataset = default_dataset(args, BUILT_IN, shards=False)
    small = args.dataset == BUILT_IN
    defaults = read_config("defaults/segmentation_builtin" if small else "defaults/segmentation")
    if args.epochs is not None:
        defaults.pop("max_train_steps", None)  # an explicit --epochs sets the length
    # The recipes' batch of 16 is global: each process contributes its share.
    defaults["per_gpu_batch_size"] = max(1, defaults["per_gpu_batch_size"] // int(os.environ.get("WORLD_SIZE", "1")))
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            # Layer decay is a transfer-learning device: random weights train every layer at the full rate.
            setattr(args, key, 1.0 if key == "layer_decay" and args.from_scratch else value)
    for flag in ("epochs", "per_gpu_batch_size", "max_train_steps", "num_classes", "img_size", "max_samples",
                 "max_val_samples", "eval_every", "eval_batch_size", "slide_stride"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise UserError(f"--{flag} must be positive, got {value}")
    if args.max_grad_norm is None:
        args.max_grad_norm = 0.0
    if args.reduce_zero_label is None:
        args.reduce_zero_label = default_zero_is_ignore(args.dataset, args.path_to_data)
    if args.num_classes is None:
        if small:
            args.num_classes = len(FashionMNISTCanvases.classes)
        elif args.reduce_zero_label:
            args.num_classes = ADE20K_NUM_CLASSES
        else:
            raise UserError("--num_classes is needed for this data (the number of classes in the masks, "
                            "ignored pixels being 255)")

    state = None
    if args.from_scratch:
        args.model = args.model or ("mae_vit_tiny_patch4" if small else "mae_vit_base_patch16")
        config = encoder_config(mae_config(args.model))
        if small:
            config["in_chans"] = 1
    elif args.path_to_backbone_checkpoint:
        pretrained_config, weights = read_weights(args.path_to_backbone_checkpoint, args.revision)  # any format
        config = encoder_config(pretrained_config)
        state = encoder_state(weights)
    else:
        raise UserError("no backbone weights: pass --path_to_backbone_checkpoint DIR (a pretrain_mae.py final/ "
                        "folder), or --from_scratch for the baseline")
    config["img_size"] = args.img_size
    if args.input_channels:
        config["in_chans"] = args.input_channels
    args.input_channels = config["in_chans"]
    args.base_size = args.base_size or args.img_size
    args.slide_stride = args.slide_stride or max(1, round(args.img_size * 2 / 3))
    if args.experiment_name is None:
        source = "scratch" if args.from_scratch else "mae"
        args.experiment_name = f"segmentation_{source}_{args.dataset.replace('hf:', '').replace('/', '_')}"
    return config, state


def main(argv=None) -> None:
    args = parse_args(argv)
    config, pretrained_state = resolve_defaults(args)
    loop = TrainConfig.from_args(args)  # (checks the loop's settings before anything starts)
    run_dir, accelerator, args = start_run(args, fresh_start=not args.resume_from_checkpoint)
    try:
        task = Segmentation(args, config, pretrained_state, run_dir)
        Trainer(loop, accelerator, run_dir, task).fit()
    finally:
        accelerator.end_training()


if __name__ == "__main__":
    run_cli(main)
    leave_multiprocess_run()
