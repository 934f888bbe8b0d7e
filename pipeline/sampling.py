"""Step samplers: each optimizer step's images, split over processes and micro-batches, epoch after epoch."""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler

from utils.errors import DataError


class StepSampler(Sampler):
    """What the step samplers share: this process's ``per_process_batch`` images per optimizer step in
    ``accumulation_steps`` micro-batches, ``set_epoch(epoch, start_step)`` to resume mid-epoch, and the
    ``steps_per_epoch`` a subclass sets."""

    def __init__(self, per_process_batch: int, accumulation_steps: int, num_processes: int, rank: int, seed: int):
        if per_process_batch % accumulation_steps:
            raise DataError(f"--per_gpu_batch_size {per_process_batch} is not divisible by --gradient_accumulation_steps "
                            f"{accumulation_steps}: choose a batch size that is a multiple of it")
        self.per_process_batch, self.accumulation_steps = per_process_batch, accumulation_steps
        self.num_processes, self.rank, self.seed = num_processes, rank, seed
        self.micro_batch = per_process_batch // accumulation_steps
        self.global_batch = per_process_batch * num_processes
        self.steps_per_epoch = 0
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.accumulation_steps

    def state_dict(self, step: int) -> dict:
        """What a checkpoint written after optimizer step ``step`` must hold besides the step: nothing, unless a
        subclass says otherwise. (Not the sampler's own epoch: a loader over an EpochChain sets it ahead.)"""
        return {}

    def epoch_of_step(self, step: int) -> int:
        """The epoch optimizer step ``step`` (counted from 1, so the last of epoch e is (e + 1) x steps_per_epoch)
        was taken in; 0 before any step."""
        return max(step - 1, 0) // self.steps_per_epoch


class EpochChain(Sampler):
    """A StepSampler's epochs one after another in one infinite iterator, from optimizer step ``first_step`` on, so
    loader workers go on into the next epoch during the epoch-end work (same batches, same order). Its ``epoch`` runs
    ahead of training (prefetch): a checkpoint asks for the state at its step (:meth:`StepSampler.state_dict`).
    """

    def __init__(self, sampler: StepSampler, first_step: int = 0):
        self.sampler, self.first_step = sampler, first_step

    def __iter__(self) -> Iterator[list]:
        epoch, start_step = divmod(self.first_step, self.sampler.steps_per_epoch)
        while True:
            self.sampler.set_epoch(epoch, start_step=start_step)
            yield from iter(self.sampler)
            epoch, start_step = epoch + 1, 0


class StepBatchSampler(StepSampler):
    """Yields this process's micro-batches of ``(index, epoch)`` keys, in optimizer-step order: each epoch is a
    permutation seeded by ``(seed, epoch)`` cut into global steps (an incomplete last one dropped), of which ``rank``
    takes its slice, so a step's samples do not depend on the process count and ``start_step`` resumes mid-epoch.
    """

    def __init__(self, num_samples: int, per_process_batch: int, accumulation_steps: int, num_processes: int = 1,
                 rank: int = 0, seed: int = 0, shuffle: bool = True):
        super().__init__(per_process_batch, accumulation_steps, num_processes, rank, seed)
        self.num_samples, self.shuffle = num_samples, shuffle
        self.steps_per_epoch = num_samples // self.global_batch
        if self.steps_per_epoch == 0:
            raise DataError(f"the data set has {num_samples} samples, fewer than one global batch of {self.global_batch} "
                            "(per_gpu_batch_size x processes): lower --per_gpu_batch_size or add data")

    def __iter__(self) -> Iterator[list]:
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.num_samples)
        for step in range(self.start_step, self.steps_per_epoch):
            start = step * self.global_batch + self.rank * self.per_process_batch
            for micro in range(self.accumulation_steps):
                ids = order[start + micro * self.micro_batch: start + (micro + 1) * self.micro_batch]
                yield [(i, self.epoch) for i in ids.tolist()]
