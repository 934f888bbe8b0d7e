"""Fixed 2-D sine-cosine position embeddings (MAE, MoCo v3)."""
from __future__ import annotations

import numpy as np
import torch


def sincos_pos_embed_2d(embed_dim: int, grid_size: tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding, (1, [1 +] H*W, D), as in MAE / MoCo v3: half of the channels
    encode the row, half the column, each half [sin(pos * w), cos(pos * w)] with w = 1 / 10000^(k / (D/4)); the cls
    token (if any) gets zeros."""
    if embed_dim % 4 != 0:
        raise ValueError(f"embed_dim must be divisible by 4 for 2-D sin-cos position embeddings, got {embed_dim}")
    grid_h, grid_w = grid_size
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 4, dtype=np.float64) / (embed_dim / 4.0))  # (D/4,)
    rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing="ij")

    def encode(positions: np.ndarray) -> np.ndarray:  # (H*W,) -> (H*W, D/2)
        angles = np.outer(positions.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    # Width first, then height: the channel order of the official implementation, so weights transfer.
    embed = np.concatenate([encode(cols), encode(rows)], axis=1)  # (H*W, D)
    if cls_token:
        embed = np.concatenate([np.zeros((1, embed_dim)), embed], axis=0)
    return torch.from_numpy(embed).float().unsqueeze(0)
