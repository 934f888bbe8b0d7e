"""PCA-filtered reconstruction targets (Balestriero & LeCun, "Learning by Reconstruction Produces Uninformative
Features For Perception"): the high- (``pca_top``) or low-variance (``pca_bottom``) part of each image. Only top
components are computed (the bottom target is the residual after those holding the rest), so no D x D matrix is formed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TARGETS = ("pixels", "pca_bottom", "pca_top")
EXACT_MAX_DIM = 4096  # up to this many pixel values per image, an exact SVD is cheap


@dataclass
class PCABasis:
    mean: torch.Tensor  # (D,) mean image, flattened (C*H*W)
    components: torch.Tensor  # (K, D) orthonormal rows, by decreasing variance
    variances: torch.Tensor  # (K,) variance along each component
    total_variance: float  # of the data, over all D dimensions
    shape: tuple[int, int, int]  # (C, H, W) the basis was fitted at

    def save(self, path: Path) -> None:
        save_file({"mean": self.mean.contiguous(), "components": self.components.contiguous(),
                   "variances": self.variances.contiguous()}, str(path),
                  metadata={"total_variance": repr(self.total_variance), "shape": ",".join(map(str, self.shape))})

    @classmethod
    def load(cls, path: Path) -> "PCABasis":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata()
        tensors = load_file(str(path))
        return cls(tensors["mean"], tensors["components"], tensors["variances"], float(metadata["total_variance"]),
                   tuple(int(v) for v in metadata["shape"].split(",")))

    def to(self, device) -> "PCABasis":
        return PCABasis(self.mean.to(device), self.components.to(device), self.variances.to(device),
                        self.total_variance, self.shape)

    def count_for_share(self, share: float) -> int:
        """The fewest top components whose variance reaches ``share`` of the total (capped at those computed)."""
        cumulative = torch.cumsum(self.variances, 0) / self.total_variance
        return min(int((cumulative < share - 1e-9).sum()) + 1, len(self.variances))


def fit_pca(images: torch.Tensor, num_components: int | None = None, randomized: bool | None = None,
            seed: int = 0) -> PCABasis:
    """PCA of (N, C, H, W) images. Exact (all min(N, D) components) for small inputs; otherwise the top
    ``num_components`` by randomized SVD (Halko et al., ``torch.svd_lowrank``)."""
    data = images.flatten(1).double()
    mean = data.mean(0)
    centred = data - mean
    total_variance = float(centred.pow(2).sum() / (len(data) - 1))
    randomized = data.shape[1] > EXACT_MAX_DIM if randomized is None else randomized
    if randomized:
        rank = min(num_components or 256, *data.shape)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _, singular, vectors = torch.svd_lowrank(centred, q=min(rank + 10, *data.shape), niter=6)
        components, singular = vectors.T[:rank], singular[:rank]
    else:
        _, singular, components = torch.linalg.svd(centred, full_matrices=False)
        if num_components:
            components, singular = components[:num_components], singular[:num_components]
    return PCABasis(mean.float(), components.float(), (singular.pow(2) / (len(data) - 1)).float(), total_variance,
                    tuple(images.shape[1:]))


def pca_target(images: torch.Tensor, basis: PCABasis, target: str, share: float) -> torch.Tensor:
    """The ``target`` part of (B, C, H, W) images. ``pca_top``: the mean plus the projection on the top components
    explaining ``share`` of the variance; ``pca_bottom``: what is left after removing the top components that
    explain ``1 - share`` (so its variance is ``share``, within one component). top(s) + bottom(1 - s) = image."""
    centred = images.flatten(1).float() - basis.mean
    if target == "pca_top":
        top = basis.components[: basis.count_for_share(share)]
        return (basis.mean + (centred @ top.T) @ top).view_as(images)
    if target == "pca_bottom":
        top = basis.components[: basis.count_for_share(1.0 - share)]
        return (centred - (centred @ top.T) @ top).view_as(images)
    raise ValueError(f"unknown target {target!r}: choose one of {', '.join(TARGETS)}")


def eigenspace_errors(reconstruction: torch.Tensor, images: torch.Tensor, pixel_mask: torch.Tensor, basis: PCABasis,
                      share: float) -> tuple[float, float]:
    """Squared reconstruction error of the masked pixels split between the top eigenspace (the components holding
    ``1 - share`` of the variance) and the bottom one (the rest), each per masked pixel value: the two curves of
    Balestriero & LeCun's paper (which part a model learns first). All (B, C, H, W), in the PCA's space."""
    error = ((reconstruction.float() - images.float()) * pixel_mask).flatten(1)
    top = basis.components[: basis.count_for_share(1.0 - share)]
    in_top = (error @ top.T) @ top
    count = pixel_mask.sum().clamp(min=1)
    return float(in_top.pow(2).sum() / count), float((error - in_top).pow(2).sum() / count)
