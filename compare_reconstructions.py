"""Compare the reconstructions of several pretrained MAEs on the same images with the same masks: one grid
(original | masked input | each model's reconstruction, visible patches pasted back) and each model's masked
PSNR and high-frequency error, as PNG and JSON.

    python compare_reconstructions.py --models work_dir/plain/final work_dir/improved/final --out work_dir/compare
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from engine.flags import hub_options
from models import MaskedAutoencoder
from pipeline.datasets import build_image_dataset
from pipeline.samples import SeededSamples, collate_skipping_bad
from pipeline.transforms import Normalize, ResizeCenterCrop, channel_stats
from utils.errors import UserError, run_cli
from utils.metrics import reconstruction_metrics
from utils.visualize import panels_to_picture, reconstruction_panels, save_picture


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", required=True,
                        help="MAE weights: pretrain_mae.py final/ folders (anything MaskedAutoencoder.from_pretrained reads).")
    parser.add_argument("--dataset", default="fashion_mnist", help="fashion_mnist, folder (--path_to_data) or hf:<name>.")
    parser.add_argument("--path_to_data", default=None, help="Image folder (its val/ split) for --dataset folder.")
    parser.add_argument("--image_column", default=None, help="Image column of a 🤗 dataset (default: guessed).")
    parser.add_argument("--num_images", type=int, default=8, help="Validation images the metrics are averaged over.")
    parser.add_argument("--grid_images", type=int, default=8, help="How many of them the picture shows (one row each).")
    parser.add_argument("--mask_ratio", type=float, default=None, help="Mask ratio for every model (default: the first's).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the masks.")
    parser.add_argument("--out", default="work_dir/compare_reconstructions", help="Output folder.")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    models = [MaskedAutoencoder.from_pretrained(path).eval() for path in args.models]
    first = models[0]
    for path, model in zip(args.models, models):
        if (model.encoder.patch_embed.img_size, model.patch_size, model.in_chans) != \
                (first.encoder.patch_embed.img_size, first.patch_size, first.in_chans):
            raise UserError(f"{path} sees {model.encoder.patch_embed.img_size} images in {model.patch_size}-pixel "
                            f"patches with {model.in_chans} channels, unlike {args.models[0]}: compare models of one size")
    img_size = first.encoder.patch_embed.img_size[0]
    base = build_image_dataset(args.dataset, args.path_to_data, "val", first.in_chans, img_size, args.num_images,
                               hub_options(args))
    samples = SeededSamples(base, ResizeCenterCrop(img_size), args.seed, first.num_patches)
    batch = collate_skipping_bad([samples[(i, 0)] for i in range(min(args.num_images, len(samples)))])
    normalize = Normalize(*channel_stats(first.in_chans, args.dataset))
    images, noise = normalize(batch["pixel_values"]), batch["noise"]
    ratio = args.mask_ratio if args.mask_ratio is not None else first.mask_ratio

    columns, report = [], {}
    for path, model in zip(args.models, models):
        model.mask_ratio = ratio  # the same masks for every model
        panels = reconstruction_panels(model, model, images, noise, normalize.inverse).view(len(images), 4,
                                                                                              *images.shape[1:])
        if not columns:
            columns += [panels[:, 0], panels[:, 1]]  # original, masked input
        columns.append(panels[:, 3])  # reconstruction with the visible patches pasted back
        report[str(path)] = reconstruction_metrics(model, model, images, noise, normalize, ratio)
    grid = torch.stack(columns, dim=1)[:args.grid_images].flatten(0, 1)  # (rows * (2 + models), C, H, W)
    out = Path(args.out)
    save_picture(panels_to_picture(grid, columns=len(columns)), out / "compare.png")
    (out / "metrics.json").write_text(json.dumps({"mask_ratio": ratio, "num_images": len(images),
                                                  "columns": ["original", "masked input", *map(str, args.models)],
                                                  "models": report}, indent=2))
    for path, metrics in report.items():
        print(f"{path}: masked PSNR {metrics['val_psnr_masked']:.2f} dB, HF error {metrics['val_hf_error']:.4f}, "
              f"loss {metrics['val_loss']:.4f}")
    print(f"grid and metrics in {out}")


if __name__ == "__main__":
    run_cli(main)
