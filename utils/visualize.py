"""Pictures: MAE reconstructions (original | masked input | reconstruction | reconstruction + visible patches)
and segmentation overlays (image | ground truth | prediction)."""
from __future__ import annotations

from pathlib import Path

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
