"""Pictures: MAE reconstructions (original | masked input | reconstruction | reconstruction + visible patches),
segmentation overlays (image | ground truth | prediction) and a run's curves."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.utils import make_grid


@torch.no_grad()
def reconstruction_panels(model, mae, images: torch.Tensor, noise: torch.Tensor, denormalize) -> torch.Tensor:
    """Four [0, 1] pictures per image, (B * 4, C, H, W): original, masked input (masked patches grey), reconstruction
    (de-normalised per patch under norm_pix_loss), and it with the visible patches pasted back; ``noise`` fixes the
    masks across epochs; ``model`` (maybe DDP/FSDP-wrapped) runs the forward, ``mae`` is the plain MaskedAutoencoder."""
    was_training = model.training
    model.eval()
    output = model(images, noise=noise)
    model.train(was_training)
    pixel_mask = mae.unpatchify(output.mask.unsqueeze(-1).expand_as(output.pred).to(images.dtype))  # 1 = masked
    reconstruction = mae.reconstruct(output.pred.float(), images.float())
    original = denormalize(images)
    recon = denormalize(reconstruction)
    masked_input = original * (1 - pixel_mask) + 0.5 * pixel_mask
    pasted = original * (1 - pixel_mask) + recon * pixel_mask
    panels = torch.stack([original, masked_input, recon, pasted], dim=1)  # (B, 4, C, H, W)
    return panels.flatten(0, 1).float().cpu()


def panels_to_picture(panels: torch.Tensor, min_side: int = 112, columns: int = 4) -> np.ndarray:
    """(N * columns, C, H, W) in [0, 1] -> a uint8 (H, W, 3) grid, one image per row; small images are enlarged
    (nearest neighbour) so that 28-pixel Fashion-MNIST panels stay readable."""
    scale = max(1, min_side // panels.shape[-1])
    if scale > 1:
        panels = F.interpolate(panels, scale_factor=scale, mode="nearest")
    if panels.shape[1] == 1:
        panels = panels.expand(-1, 3, -1, -1)
    elif panels.shape[1] != 3:
        panels = panels[:, :3] if panels.shape[1] > 3 else panels.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
    grid = make_grid(panels, nrow=columns, padding=2, pad_value=1.0)
    return (grid.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def save_picture(picture: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(path)


def class_palette(num_classes: int) -> torch.Tensor:
    """(K, 3) distinct colours in [0, 1]: hues spaced by the golden ratio, so neighbouring ids differ."""
    import colorsys

    return torch.tensor([colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.75, 0.95) for k in range(num_classes)])


def segmentation_panels(images: torch.Tensor, masks: torch.Tensor, predictions: torch.Tensor, num_classes: int,
                        ignore_index: int, alpha: float = 0.6) -> torch.Tensor:
    """Three [0, 1] RGB pictures per image, (B * 3, 3, H, W): the image, the ground truth and the prediction as
    colour overlays on it (ignored pixels show the bare image). ``images`` (B, C, H, W) in [0, 1]."""
    rgb = images.float().cpu()
    rgb = rgb.expand(-1, 3, -1, -1) if rgb.shape[1] == 1 else rgb[:, :3]
    palette = class_palette(num_classes)

    def overlay(labels: torch.Tensor) -> torch.Tensor:
        labels = labels.cpu()
        known = (labels != ignore_index).unsqueeze(1)
        colours = palette[labels.clamp(0, num_classes - 1)].permute(0, 3, 1, 2)
        return torch.where(known, (1 - alpha) * rgb + alpha * colours, rgb)

    return torch.stack([rgb, overlay(masks), overlay(predictions)], dim=1).flatten(0, 1)


def curves_picture(rows: list[dict], keys: Sequence[str], width: int = 480, height: int = 200) -> Image.Image:
    """One panel per metric in ``keys`` (a line over ``step``, its range on the left, the steps below) from
    metrics.jsonl rows; metrics no row has are left out. Drawn with PIL alone."""
    from PIL import ImageDraw

    panels = []
    for key in keys:
        points = [(row["step"], row[key]) for row in rows
                  if isinstance(row.get(key), (int, float)) and np.isfinite(row[key]) and "step" in row]
        if not points:
            continue
        panel = Image.new("RGB", (width, height), "white")
        draw = ImageDraw.Draw(panel)
        left, top, right, bottom = 64, 18, width - 10, height - 24
        draw.rectangle((left, top, right, bottom), outline=(160, 160, 160))
        (x0, x1), (y0, y1) = ((min(values), max(values)) for values in zip(*points))
        x_span, y_span = (x1 - x0) or 1, (y1 - y0) or 1
        line = [(left + (x - x0) / x_span * (right - left), bottom - (y - y0) / y_span * (bottom - top))
                for x, y in points]
        draw.line(line, fill=(31, 119, 180), width=2) if len(line) > 1 else draw.point(line, fill=(31, 119, 180))
        draw.text((left, 2), key, fill="black")
        draw.text((2, top), f"{y1:.4g}", fill="black")
        draw.text((2, bottom - 10), f"{y0:.4g}", fill="black")
        draw.text((left, bottom + 6), f"step {x0}", fill="black")
        draw.text((right - 70, bottom + 6), f"step {x1}", fill="black")
        panels.append(panel)
    picture = Image.new("RGB", (width, max(1, height * len(panels))), "white")
    for index, panel in enumerate(panels):
        picture.paste(panel, (0, index * height))
    return picture


CURVES = ("loss", "train_loss", "val_loss", "top1", "mIoU", "lr")  # whichever a run logs


def save_curves(metrics: Path, path: Path, keys: Sequence[str] = CURVES) -> Path | None:
    """``path`` (a PNG) with the curves of ``keys`` from a metrics.jsonl file; None if it has none of them."""
    import json

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
    picture = curves_picture(rows, keys)
    if picture.height <= 1:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path
