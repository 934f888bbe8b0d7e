"""Training samples keyed by ``(index, epoch)``: each one's crop, flip and mask drawn from its own counter-based
draws (pipeline/draws.py), a function of ``(seed, epoch, index)``, so a sample is the same for any process, worker
or device layout and resume is exact."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from .device_decode import decode_deferred
from .draws import MASK_SLOT, NOISE_SLOT, SampleDraws
from .transforms import DeferredCrop


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that is a function of (run seed, epoch, sample index) only (the segmentation pipeline's)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32).view(np.uint64)[0] >> 1)


class SeededSamples(Dataset):
    """Wraps a uint8 dataset: applies ``transform`` (and draws MAE mask noise) with the sample's own draws.

    Items are requested as ``(index, epoch)``; the output is ``{"pixel_values": uint8 (C, S, S), "label",
    "noise": (num_patches,)}`` or ``None`` for an unreadable image.
    """

    def __init__(self, base: Dataset, transform: Callable, seed: int, num_patches: int = 0,
                 noise_fn: Callable[[torch.Generator], torch.Tensor] | None = None):
        self.base, self.transform, self.seed, self.num_patches = base, transform, seed, num_patches
        self.noise_fn = noise_fn  # a mask strategy's noise (models.masking.mask_noise); default uniform

    def __len__(self) -> int:
        return len(self.base)

    def __getitems__(self, keys: list) -> list:
        """A batch (the DataLoader calls this when it exists): its draws and crops are made together, and a base
        that can read many items at once (tar shards on an object store) reads them together first."""
        keys = [key if isinstance(key, tuple) else (key, 0) for key in keys]
        indices = [index for index, _ in keys]
        if hasattr(self.base, "prefetch"):
            self.base.prefetch(indices)
        items = [self.base[index] for index in indices]
        read = [i for i, item in enumerate(items) if item is not None]
        draws = SampleDraws.of(self.seed, [keys[i][1] for i in read], [indices[i] for i in read])
        images = [items[i][0] for i in read]
        views = self.transform.each(images, draws) if hasattr(self.transform, "each") else \
            [self.transform(image, draws.row(i)) for i, image in enumerate(images)]
        if self.noise_fn is not None:
            noise = [self.noise_fn(draws.row(i).generator(MASK_SLOT)) for i in range(len(read))]
        elif self.num_patches:
            noise = draws.uniform(NOISE_SLOT, self.num_patches, torch.float32).unbind()
        samples = [None] * len(keys)  # an unreadable image stays None
        for position, (i, view) in enumerate(zip(read, views)):
            samples[i] = {"pixel_values": view, "label": items[i][1]}
            if self.noise_fn is not None or self.num_patches:
                samples[i]["noise"] = noise[position]
        return samples

    def __getitem__(self, key):
        return self.__getitems__([key])[0]


def collate_skipping_bad(samples: list) -> dict:
    """Stack samples, dropping the ``None`` of unreadable images and counting them in ``num_skipped``."""
    good = [s for s in samples if s is not None]
    if not good:
        return {"num_skipped": len(samples)}
    deferred = [isinstance(s["pixel_values"], DeferredCrop) for s in good]
    if all(deferred):  # decode_deferred (called by move_to_device) makes the views on the device
        batch = {key: torch.stack([torch.as_tensor(s[key]) for s in good]) for key in good[0] if key != "pixel_values"}
        batch["jpeg"] = torch.cat([s["pixel_values"].data for s in good])  # one tensor, not one per image
        batch["jpeg_sizes"] = torch.tensor([len(s["pixel_values"].data) for s in good])
        batch["crop"] = torch.stack([s["pixel_values"].crop for s in good])
        return {**batch, "num_skipped": len(samples) - len(good)}
    if any(deferred):  # a folder mixing JPEGs and other files: every view is made here
        good = [s for s in map(view_made_here, good) if s is not None]
    batch = {key: torch.stack([torch.as_tensor(s[key]) for s in good]) for key in good[0]} if good else {}
    return {**batch, "num_skipped": len(samples) - len(good)}


def view_made_here(sample: dict) -> dict | None:
    """A sample whose view was deferred, made on the CPU (``None`` if its JPEG does not decode)."""
    if not isinstance(sample["pixel_values"], DeferredCrop):
        return sample
    data, crop = sample["pixel_values"].data, sample["pixel_values"].crop
    batch = decode_deferred({"jpeg": data, "jpeg_sizes": torch.tensor([len(data)]), "crop": crop[None]},
                            torch.device("cpu"))
    return {**sample, "pixel_values": batch["pixel_values"][0]} if "pixel_values" in batch else None


class TensorSamples(Dataset):
    """Pre-computed inputs (e.g. cached encoder features) and labels, served like :class:`SeededSamples`."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor):
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key
        return {"pixel_values": self.inputs[index], "label": int(self.labels[index])}
