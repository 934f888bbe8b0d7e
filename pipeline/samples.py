"""Training samples keyed by ``(index, epoch)``: each one's crop, flip and mask drawn from a generator seeded by
``(seed, epoch, index)``, so a sample is the same for any process or worker layout and resume is exact."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from .device_decode import decode_deferred
from .transforms import DeferredCrop


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that is a function of (run seed, epoch, sample index) only."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32).view(np.uint64)[0] >> 1)


class SeededSamples(Dataset):
    """Wraps a uint8 dataset: applies ``transform`` (and draws MAE mask noise) with the sample's own RNG.

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
        """A batch (the DataLoader calls this when it exists): a base that can read many items at once (tar shards
        on an object store) reads them together first."""
        keys = list(keys)
        if hasattr(self.base, "prefetch"):
            self.base.prefetch([key[0] if isinstance(key, tuple) else key for key in keys])
        return [self[key] for key in keys]

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        item = self.base[index]
        if item is None:
            return None
        image, label = item
        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
        sample = {"pixel_values": self.transform(image, generator), "label": label}
        if self.noise_fn is not None:
            sample["noise"] = self.noise_fn(generator)
        elif self.num_patches:
            sample["noise"] = torch.rand(self.num_patches, generator=generator)
        return sample


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
