"""Classification metrics."""
from __future__ import annotations

import torch


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[float]:
    """Percent of samples whose label is among the k highest logits, for each k (k capped at the class count)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (N, K)
    hits = top == labels.unsqueeze(1)
    return [hits[:, :min(k, logits.shape[1])].any(dim=1).float().mean().item() * 100.0 for k in ks]
