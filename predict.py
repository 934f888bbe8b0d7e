"""Inference with saved weights (a run's final/ folder, a Hub repo id or another weights file this project reads):
a classifier's top-k labels, an encoder's features, or an MAE's reconstruction picture. Images are prepared as in
evaluation: resized, centre-cropped and normalised with the statistics saved with the weights.

    python predict.py work_dir/<classifier run>/final shirt.png boot.png --top_k 3
    python predict.py work_dir/<pretraining run>/final shirt.png --out reconstruction.png

In Python: ``model = load("work_dir/.../final")`` then ``predict(model, ["shirt.png", pil_image])``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models import MaskedAutoencoder, VisionTransformer
from models.convert import read_checkpoint
from pipeline.transforms import ResizeCenterCrop, channel_stats, to_channels
from utils.config import HelpFormatter
from utils.errors import UserError, run_cli
from utils.visualize import panels_to_picture, reconstruction_panels


def load(source: str, revision: str | None = None) -> MaskedAutoencoder | VisionTransformer:
    """An MAE if the weights have a decoder, else a VisionTransformer (a classifier when it has a head), in eval mode."""
    checkpoint = read_checkpoint(source, revision)
    cls = MaskedAutoencoder if checkpoint.has_decoder else VisionTransformer
    return cls.from_pretrained(source, revision=revision).eval()


def statistics(vit: VisionTransformer) -> tuple[list[float], list[float]]:
    """The normalisation saved with the weights; ImageNet's (RGB) or 0.5 / 0.5 for weights saved without it."""
    if vit.image_mean and vit.image_std:
        return list(vit.image_mean), list(vit.image_std)
    mean, std = channel_stats(vit.patch_embed.in_chans)
    return list(mean), list(std)


def prepare(model, images) -> torch.Tensor:
    """PIL images or paths -> the normalised batch (B, C, S, S) the model expects."""
    vit = model.encoder if isinstance(model, MaskedAutoencoder) else model
    size, channels = vit.patch_embed.img_size[0], vit.patch_embed.in_chans
    mean, std = statistics(vit)
    view = ResizeCenterCrop(size)
    batch = []
    for image in images:
        if not isinstance(image, Image.Image):
            try:
                image = Image.open(Path(image).expanduser())
            except (OSError, ValueError) as error:
                raise UserError(f"{image}: not a readable image ({error})") from None
        batch.append(view(to_channels(image, channels)))
    pixels = torch.stack(batch).float() / 255
    return (pixels - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


@torch.no_grad()
def predict(model, images, top_k: int = 5, seed: int = 0):
    """Per image: a classifier's top-k ``(class name, probability)`` pairs; an encoder's feature vector; for an MAE,
    one picture (original | masked input | reconstruction | reconstruction with the visible patches) per image."""
    pixels = prepare(model, images)
    if isinstance(model, MaskedAutoencoder):
        noise = torch.rand(len(pixels), model.num_patches, generator=torch.Generator().manual_seed(seed))
        mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in statistics(model.encoder))
        panels = reconstruction_panels(model, model, pixels, noise, lambda x: (x * std + mean).clamp(0, 1))
        return [Image.fromarray(panels_to_picture(panels[4 * i:4 * i + 4])) for i in range(len(pixels))]
    output = model(pixels)
    if isinstance(model.head, torch.nn.Identity):  # no head: the features
        return list(output)
    probabilities = output.softmax(dim=-1)
    names = model.class_names or [str(k) for k in range(probabilities.shape[-1])]
    top = probabilities.topk(min(top_k, probabilities.shape[-1]), dim=-1)
    return [[(names[k], float(p)) for p, k in zip(values, indices)] for values, indices in zip(*top)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("weights", help="A final/ folder, a weights file or a 🤗 Hub repo id.")
    parser.add_argument("images", nargs="+", help="Image files.")
    parser.add_argument("--revision", default=None, help="Branch, tag or commit of Hub weights.")
    parser.add_argument("--top_k", type=int, default=5, help="Classes to list per image (classifiers).")
    parser.add_argument("--out", default="reconstruction.png",
                        help="MAE: the picture of every image's reconstruction (one row each).")
    args = parser.parse_args(argv)
    model = load(args.weights, args.revision)
    results = predict(model, args.images, args.top_k)
    if isinstance(model, MaskedAutoencoder):
        Image.fromarray(np.concatenate([np.asarray(picture) for picture in results])).save(args.out)
        print(f"wrote {args.out}")
        return
    for image, result in zip(args.images, results):
        if isinstance(result, torch.Tensor):
            print(json.dumps({"image": image, "features": [round(v, 5) for v in result.tolist()]}))
        else:
            print(json.dumps({"image": image, "top_k": [{"label": n, "probability": round(p, 5)} for n, p in result]}))


if __name__ == "__main__":
    run_cli(main)
