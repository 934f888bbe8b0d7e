"""The shared training loop: a script's :class:`Task` run by the :class:`Trainer` with a :class:`TrainConfig`."""
from .trainer import Task, TrainConfig, Trainer, train_step

__all__ = ["Task", "TrainConfig", "Trainer", "train_step"]
