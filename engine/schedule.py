"""Learning-rate schedules as pure functions of the optimizer step (so a resumed run continues exactly)."""
from __future__ import annotations

import math


def scaled_learning_rate(base_lr: float, per_process_batch: int, num_processes: int) -> float:
    """The MAE scaling rule: lr = base_lr x effective batch / 256 (the effective batch of one optimizer step)."""
    return base_lr * per_process_batch * num_processes / 256


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float = 0.0) -> float:
    """Linear warmup from 0 to ``peak_lr`` over ``warmup_steps``, then half-cosine down to ``min_lr``."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_learning_rate(optimizer, lr: float) -> None:
    """Apply ``lr`` to every parameter group, times the group's ``lr_scale`` (layer decay) if it has one."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def warmup_poly(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float = 0.0,
                power: float = 1.0) -> float:
    """Linear warmup, then polynomial decay (mmseg's ``poly``, power 1 = linear) down to ``min_lr`` at the end."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (peak_lr - min_lr) * (1.0 - progress) ** power
