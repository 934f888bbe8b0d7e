"""The shared training loop: a script's :class:`Task` run by the :class:`Trainer`."""
from .trainer import Task, Trainer

__all__ = ["Task", "Trainer"]
