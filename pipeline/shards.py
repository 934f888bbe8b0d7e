"""Webdataset-style tar shards (``<key>.<ext>`` images, ``<key>.cls`` class index as text) for data sets too big for
each node's disk: ``shards.json`` (``make_shards.py``) records each image's byte range, so a sample is one ranged read
from a folder or fsspec URL. Each process reads its own shards (:class:`ShardStepSampler`); items are ``(index,
epoch)`` keys, so a run resumes mid-epoch with exactly the remaining samples.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import PurePosixPath
from typing import Iterator

import torch
from torch.utils.data import Dataset

from utils.errors import DataError

from .sampling import StepBatchSampler, StepSampler
from .sources import image_from_bytes

logger = logging.getLogger(__name__)

INDEX_NAME = "shards.json"
SHARDS_MIXED = 4  # shards read side by side: a micro-batch draws from this many shards' samples


def filesystem(url: str):
    """(fsspec filesystem, path) for a local path or an fsspec URL."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as error:  # e.g. "Install s3fs to access S3"
        raise DataError(f"cannot open {url}: {error} (pip install it)") from None


def find_index(url: str, split: str, require_split: bool = False) -> str | None:
    """The folder (or URL) holding ``split``'s shards.json: ``<url>/train`` (``val``/``validation`` for other
    splits) when there; else, unless ``require_split``, ``<url>/train`` or ``<url>`` itself (pictures of a run
    without held-out images show training ones); None if there is none."""
    names = ("train",) if split == "train" else ("val", "validation")
    base = url.rstrip("/")
    candidates = [f"{base}/{name}" for name in names]
    if not require_split:
        candidates += [f"{base}/train", base] if split != "train" else [base]
    for candidate in candidates:
        fs, path = filesystem(candidate)
        if fs.exists(f"{path}/{INDEX_NAME}"):
            return candidate
    return None


def is_sharded(url: str | None) -> bool:
    return bool(url) and find_index(url, "train") is not None


class TarShardDataset(Dataset):
    """The images of a folder of tar shards (local or fsspec URL), one ranged read each (a batch's reads are issued
    together, see ``prefetch``); items are ``(uint8 (C, H, W) or EncodedJpeg, label)``, or ``None`` for an image that
    does not decode (a shard that cannot be read is an error)."""

    def __init__(self, url: str, num_channels: int, encoded_jpeg: bool = False, max_samples: int | None = None):
        self.url, self.num_channels, self.encoded_jpeg = url, num_channels, encoded_jpeg
        self.fs, self.root = filesystem(url)
        self._pid, self._fetched = os.getpid(), {}  # bytes read ahead by prefetch(), by index
        try:
            with self.fs.open(f"{self.root}/{INDEX_NAME}", "r") as handle:
                index = json.load(handle)
        except FileNotFoundError:
            raise DataError(f"no {INDEX_NAME} under {url}: write one with "
                            f"`python make_shards.py --index_only {url}`") from None
        self.classes = index.get("classes", [])
        self.shard_names = [shard["name"] for shard in index["shards"]]
        self.records = []  # (shard number, offset, size, label, suffix), shard after shard
        self.shard_ranges = []  # (first record, count) of each shard
        for number, shard in enumerate(index["shards"]):
            start = len(self.records)
            for key, offset, size, label in shard["samples"]:
                self.records.append((number, offset, size, label, PurePosixPath(key).suffix))
            self.shard_ranges.append((start, len(self.records) - start))
        if max_samples is not None and max_samples < len(self.records):  # whole shards first, then part of one
            self.records = self.records[:max_samples]
            self.shard_ranges = [(start, min(count, max_samples - start)) for start, count in self.shard_ranges
                                 if start < max_samples]
        if not self.records:
            raise DataError(f"the shards under {url} hold no images: check --path_to_data")

    def __len__(self) -> int:
        return len(self.records)

    def _filesystem(self):
        if self._pid != os.getpid():  # a forked loader worker: s3fs, gcsfs and HTTP filesystems are not fork-safe
            self.fs, self.root = filesystem(self.url)
            self._pid, self._fetched = os.getpid(), {}
        return self.fs

    def _unreadable(self, number: int, error: Exception) -> DataError:
        return DataError(f"cannot read shard {self.shard_names[number]} under {self.url} ({error}): check "
                         "--path_to_data and the credentials of its filesystem")

    def prefetch(self, indices: list[int]) -> None:
        """Read these images' bytes in one ``cat_ranges`` call (concurrent requests on object stores such as
        s3fs and gcsfs), for the ``read_bytes`` calls that follow. SeededSamples calls it with each batch."""
        fs = self._filesystem()
        records = [self.records[index] for index in indices]
        paths = [f"{self.root}/{self.shard_names[number]}" for number, *_ in records]
        blobs = fs.cat_ranges(paths, [offset for _, offset, *_ in records],
                              [offset + size for _, offset, size, *_ in records], on_error="return")
        self._fetched = {}  # never more than one batch
        for index, record, blob in zip(indices, records, blobs):
            if isinstance(blob, Exception) or len(blob) != record[2]:
                raise self._unreadable(record[0], blob if isinstance(blob, Exception) else self._short(record, blob))
            self._fetched[index] = blob

    @staticmethod
    def _short(record, blob: bytes) -> str:
        return (f"{len(blob)} bytes where the index has {record[2]} at offset {record[1]}: a truncated shard, or a "
                "server that ignores range requests")

    def read_bytes(self, index: int) -> bytes:
        """The image's bytes: one ranged read (no read-ahead, so a shuffled order costs no extra traffic)."""
        fs = self._filesystem()
        if index in self._fetched:
            return self._fetched.pop(index)
        number, offset, size, _, _ = self.records[index]
        try:
            blob = fs.cat_file(f"{self.root}/{self.shard_names[number]}", start=offset, end=offset + size)
        except OSError as error:
            raise self._unreadable(number, error) from None
        if len(blob) != size:
            raise self._unreadable(number, self._short(self.records[index], blob))
        return blob

    def __getitem__(self, index: int):
        number, _, _, label, suffix = self.records[index]
        data = self.read_bytes(index)
        try:
            return image_from_bytes(data, suffix, self.num_channels, self.encoded_jpeg), label
        except DataError:
            raise
        except Exception as error:  # skipped and counted by the collate, as for image folders
            logger.warning("skipping unreadable image %d of shard %s (%s)", index, self.shard_names[number], error)
            return None


def assign_shards(shard_ranges: list[tuple[int, int]], num_processes: int) -> list[list[int]]:
    """Shards per process, balanced by sample count (largest first, each to the least loaded process). The split
    is fixed for the run; what each process reads in an epoch is reshuffled by ShardStepSampler."""
    loads, assigned = [0] * num_processes, [[] for _ in range(num_processes)]
    for number in sorted(range(len(shard_ranges)), key=lambda n: (-shard_ranges[n][1], n)):
        rank = min(range(num_processes), key=lambda r: (loads[r], r))
        assigned[rank].append(number)
        loads[rank] += shard_ranges[number][1]
    return [sorted(shards) for shards in assigned]


class ShardStepSampler(StepSampler):
    """A StepSampler for tar shards: this process reads only its own shards, ``SHARDS_MIXED`` at a time in a new order
    every epoch (samples shuffled together); every process takes the smallest share's number of steps, and
    ``start_step`` skips exactly the steps taken. Resumed on another process count (``resume``: a checkpoint's
    ``state_dict``), the epoch in progress keeps its steps, later epochs split the shards anew, and ``steps_per_epoch``
    stays (a short share repeats images).
    """

    def __init__(self, shard_ranges: list[tuple[int, int]], per_process_batch: int, accumulation_steps: int,
                 num_processes: int = 1, rank: int = 0, seed: int = 0, resume: dict | None = None):
        super().__init__(per_process_batch, accumulation_steps, num_processes, rank, seed)
        if len(shard_ranges) < num_processes:
            raise DataError(f"{len(shard_ranges)} shards for {num_processes} processes: each process reads its own "
                            "shards, so write at least as many shards as processes (make_shards.py --samples_per_shard)")
        self.shard_ranges = shard_ranges
        self.assignment = assign_shards(shard_ranges, num_processes)
        shares = [sum(shard_ranges[n][1] for n in shards) for shards in self.assignment]
        natural_steps = min(shares) // per_process_batch
        self.steps_per_epoch = resume["steps_per_epoch"] if resume else natural_steps
        # (epoch, processes): the epoch in progress when the run was resumed, and the process count that laid it out
        self.carried = tuple(resume["shard_layout"]) if resume else (-1, num_processes)
        if self.steps_per_epoch == 0:
            raise DataError(f"a process's shards hold {min(shares)} samples, fewer than one --per_gpu_batch_size of "
                            f"{per_process_batch}: lower it or add data")
        uneven = sum(shares) - num_processes * min(shares)  # beyond the smallest share: out of every epoch
        if rank == 0 and natural_steps < self.steps_per_epoch:
            logger.warning("the shards split over %d processes give %d to %d images each, fewer than the run's %d "
                           "steps of %d: a process with a short share repeats a few of its images every epoch",
                           num_processes, min(shares), max(shares), self.steps_per_epoch, per_process_batch)
        elif rank == 0 and uneven > 0.02 * sum(shares):
            logger.warning("%d of %d images (%.0f%%) sit out every epoch: the %d shards split unevenly over %d "
                           "processes (%d to %d images each); write shards of equal size, a multiple of %d of them",
                           uneven, sum(shares), 100 * uneven / sum(shares), len(shard_ranges), num_processes,
                           min(shares), max(shares), num_processes)

    def state_dict(self, step: int) -> dict:
        """What a checkpoint written after optimizer step ``step`` must hold to resume this sampler on any number of
        processes: the layout of the epoch that step was taken in."""
        epoch = self.epoch_of_step(step)
        processes = self.carried[1] if epoch == self.carried[0] else self.num_processes
        return {"shard_layout": [epoch, processes]}

    def epoch_order(self, rank: int | None = None, num_processes: int | None = None) -> list[int]:
        """The sample indices one process reads in this epoch, in order (for another process count: what that
        layout's process ``rank`` reads)."""
        rank = self.rank if rank is None else rank
        num_processes = num_processes or self.num_processes
        assignment = self.assignment if num_processes == self.num_processes else assign_shards(self.shard_ranges,
                                                                                               num_processes)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 1009 + rank)
        shards = [assignment[rank][i] for i in torch.randperm(len(assignment[rank]), generator=generator).tolist()]
        order = []
        for first in range(0, len(shards), SHARDS_MIXED):
            group = [index for number in shards[first:first + SHARDS_MIXED]
                     for index in range(self.shard_ranges[number][0], sum(self.shard_ranges[number]))]
            order += [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
        return order

    def step_orders(self) -> Iterator[list[int]]:
        """This process's images of each step of the epoch, from ``start_step``."""
        if self.epoch == self.carried[0] and self.carried[1] != self.num_processes:
            old = self.carried[1]  # the layout that began this epoch: its steps, re-split over these processes
            share = self.global_batch // old
            orders = [self.epoch_order(rank, old) for rank in range(old)]
            for step in range(self.start_step, self.steps_per_epoch):
                step_images = [i for order in orders for i in order[step * share:(step + 1) * share]]
                yield step_images[self.rank * self.per_process_batch:(self.rank + 1) * self.per_process_batch]
            return
        order = self.epoch_order()
        needed = self.steps_per_epoch * self.per_process_batch
        order = (order * (needed // len(order) + 1))[:needed] if len(order) < needed else order
        for step in range(self.start_step, self.steps_per_epoch):
            yield order[step * self.per_process_batch:(step + 1) * self.per_process_batch]

    def __iter__(self) -> Iterator[list]:
        for images in self.step_orders():
            for micro in range(self.accumulation_steps):
                yield [(index, self.epoch) for index in images[micro * self.micro_batch:(micro + 1) * self.micro_batch]]


def build_step_sampler(dataset, per_process_batch: int, accumulation_steps: int, num_processes: int, rank: int,
                       seed: int, resume: dict | None = None) -> StepSampler:
    """The training sampler for ``dataset``: ShardStepSampler for tar shards (each process reads its own; ``resume``:
    the checkpoint's trainer state, see resumed_layout), StepBatchSampler (a global permutation) otherwise."""
    if isinstance(dataset, TarShardDataset):
        return ShardStepSampler(dataset.shard_ranges, per_process_batch, accumulation_steps, num_processes, rank, seed,
                                resume)
    return StepBatchSampler(len(dataset), per_process_batch, accumulation_steps, num_processes, rank, seed)
