"""Extra MAE objectives from the "improved MAE" recipe: a high-frequency (Laplacian) reconstruction loss on the
masked patches and the uniformity regulariser of Wang & Isola (2020) on the encoder's embeddings."""
from __future__ import annotations

import torch
import torch.nn.functional as F

LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def laplacian(images: torch.Tensor) -> torch.Tensor:
    """3x3 Laplacian of each channel, (B, C, H, W) -> (B, C, H, W) (replicate padding at the borders)."""
    channels = images.shape[1]
    kernel = LAPLACIAN.to(images.device, images.dtype).expand(channels, 1, 3, 3)
    return F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=channels)


def high_frequency_loss(reconstruction: torch.Tensor, target: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the Laplacians of the reconstruction and of the target over the pixels of the
    masked patches. The visible patches of the reconstruction are replaced by the target's first, so the loss
    cannot see them (it only judges what the model had to invent). All (B, C, H, W); ``pixel_mask`` 1 = masked."""
    reconstruction = torch.where(pixel_mask.bool(), reconstruction, target)
    error = (laplacian(reconstruction.float()) - laplacian(target.float())) ** 2
    return (error * pixel_mask).sum() / pixel_mask.sum().clamp(min=1)


def uniformity_loss(embeddings: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """log mean_{i<j} exp(-t ||z_i - z_j||^2) of L2-normalised embeddings (B, D): lower = more spread out."""
    z = F.normalize(embeddings.float(), dim=-1)
    return torch.pdist(z, p=2).pow(2).mul(-t).exp().mean().log()
