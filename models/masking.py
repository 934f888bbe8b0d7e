"""Mask sampling strategies (MAE paper, Fig. 6): random, block-wise (BEiT) and a regular grid, each as per-patch
noise for :func:`models.mae.random_masking` that gives its masked patches the largest values, so every strategy
yields masks (B, L) (1 = masked) with exactly ``int(L * mask_ratio)`` masked patches, a function of the generator.
"""
from __future__ import annotations

import math

import torch

MASK_STRATEGIES = ("random", "block", "grid")


def grid_cell(mask_ratio: float) -> int:
    """The cell size s of the regular grid that keeps one patch in s x s: mask_ratio must be 1 - 1/s^2."""
    for cell in range(2, 9):
        if abs(1.0 - 1.0 / cell**2 - mask_ratio) < 1e-6:
            return cell
    allowed = ", ".join(f"{1 - 1 / s**2:.4g}" for s in range(2, 5))
    raise ValueError(f"--mask_strategy grid keeps one patch in every s x s cell, so --mask_ratio must be 1 - 1/s^2 "
                     f"({allowed}, ...), got {mask_ratio}")


def block_order(grid_size: tuple[int, int], mask_ratio: float, generator: torch.Generator | None) -> torch.Tensor:
    """BEiT-style block-wise masking: rectangles of random area (>= 4 patches) and aspect ratio (0.3-3.3) are
    placed until ``int(L * mask_ratio)`` patches are covered. Returns (L,) with 0 for unmasked patches and, for
    masked ones, how early their block came (larger = earlier), so a lower ratio keeps the first blocks whole."""
    height, width = grid_size
    target = int(height * width * mask_ratio)
    order = torch.zeros(height, width)
    covered, blocks = 0, 0
    while covered < target:
        draws = torch.rand(5, generator=generator, dtype=torch.float64).tolist()
        area = 4 + draws[0] * max(0, target - covered - 4)
        aspect = math.exp(math.log(0.3) + draws[1] * (math.log(1 / 0.3) - math.log(0.3)))
        block_h = max(1, min(height, round(math.sqrt(area * aspect))))
        block_w = max(1, min(width, round(math.sqrt(area / aspect))))
        top, left = int(draws[2] * (height - block_h + 1)), int(draws[3] * (width - block_w + 1))
        region = order[top:top + block_h, left:left + block_w]
        fresh = region == 0
        if fresh.any():
            blocks += 1
            region[fresh] = -blocks  # negative while placing: earlier blocks have smaller magnitude
            covered += int(fresh.sum())
    return torch.where(order < 0, blocks + 1 + order, order).flatten()  # block 1 -> `blocks`, the last -> 1


def mask_noise(strategy: str, grid_size: tuple[int, int], mask_ratio: float,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """(L,) noise for :func:`models.mae.random_masking` that realises ``strategy`` at ``mask_ratio``: uniform for
    ``random`` (the MAE default); ``grid`` and ``block`` lift the patches they mask above every visible patch's
    noise, so exactly their patches are masked (up to the exact count)."""
    height, width = grid_size
    noise = torch.rand(height * width, generator=generator)
    if strategy == "random":
        return noise
    if strategy == "grid":
        cell = grid_cell(mask_ratio)
        row_offset, col_offset = torch.randint(0, cell, (2,), generator=generator).tolist()
        rows = (torch.arange(height) - row_offset) % cell == 0
        cols = (torch.arange(width) - col_offset) % cell == 0
        kept = (rows[:, None] & cols[None, :]).flatten()
        return noise + (~kept).float()
    if strategy == "block":
        order = block_order(grid_size, mask_ratio, generator)
        return noise + torch.where(order > 0, 1.0 + order, torch.zeros_like(order))
    raise ValueError(f"unknown mask strategy {strategy!r}: choose one of {', '.join(MASK_STRATEGIES)}")


def curriculum_ratio(step: int, steps_per_epoch: int, final_ratio: float, start_ratio: float | None,
                     curriculum_epochs: float) -> float:
    """Mask ratio at optimizer ``step``: linear from ``start_ratio`` to ``final_ratio`` over the first
    ``curriculum_epochs`` epochs, then constant (a pure function of the step, so resume continues it exactly)."""
    if start_ratio is None or curriculum_epochs <= 0:
        return final_ratio
    progress = min(1.0, step / (curriculum_epochs * steps_per_epoch))
    return start_ratio + (final_ratio - start_ratio) * progress
