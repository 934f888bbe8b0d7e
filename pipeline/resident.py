"""Small training sets held on the device (``--data_on_device``): every image as uint8 in device memory, each
micro-batch's crops, flips and mask noise drawn and made there in a few batched kernels, with no loader workers.
The draws are :class:`pipeline.samples.SeededSamples`' own, so a step's samples are the default path's (up to float
rounding at half a grey level) and resume stays exact."""
from __future__ import annotations

import logging

import torch
from torch.utils.data import Dataset, Subset

from utils.errors import UserError

from .draws import NOISE_SLOT, SampleDraws
from .pixel_cache import PixelCacheDataset
from .samples import SeededSamples
from .sources import ArrayDataset, SyntheticDataset

logger = logging.getLogger(__name__)

IN_MEMORY = (ArrayDataset, SyntheticDataset, PixelCacheDataset)  # what ``auto`` holds on the device
AUTO_LIMIT_BYTES = 4 << 30


class ResidentBatches:
    """The training loader's batches for a held set: ``batch_sampler`` (an EpochChain) gives each micro-batch's
    ``(index, epoch)`` keys; images and labels are gathered, cropped and flipped on their device."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, samples: SeededSamples, batch_sampler):
        self.images, self.labels, self.batch_sampler = images, labels, batch_sampler
        self.dataset = samples  # (what a DataLoader names so: the run's size is read from it)
        self.transform, self.seed, self.num_patches = samples.transform, samples.seed, samples.num_patches

    def __iter__(self):
        for keys in self.batch_sampler:
            yield self.batch(keys)

    def batch(self, keys: list) -> dict:
        index_epoch = torch.tensor(keys, dtype=torch.int64).view(-1, 2)
        if self.images.is_cuda:  # pinned, so the copy does not wait for the work already queued
            index_epoch = index_epoch.pin_memory().to(self.images.device, non_blocking=True)
        indices, epochs = index_epoch.unbind(1)
        draws = SampleDraws.of(self.seed, epochs, indices)
        batch = {"pixel_values": self.transform.views(self.images[indices], draws), "label": self.labels[indices],
                 "num_skipped": 0}
        if self.num_patches:
            batch["noise"] = draws.uniform(NOISE_SLOT, self.num_patches, torch.float32)
        return batch


def in_memory_kind(base: Dataset) -> bool:
    while isinstance(base, Subset):
        base = base.dataset
    return isinstance(base, IN_MEMORY)


def hold_on_device(base: Dataset, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Every image of ``base`` stacked, uint8 (N, C, H, W), with its labels, both on ``device``; None when the
    images differ in size or one cannot be read (then the set is read per sample)."""
    first = base[0]
    if first is None or not isinstance(first[0], torch.Tensor):
        return None
    shape, chunk, labels = first[0].shape, [], []
    images = torch.empty((len(base), *shape), dtype=torch.uint8, device=device)
    for index in range(len(base)):  # copied over in chunks: the host never holds a second copy of the set
        item = base[index]
        if item is None or not isinstance(item[0], torch.Tensor) or item[0].shape != shape:
            return None
        chunk.append(item[0])
        labels.append(item[1] if item[1] is not None else -1)
        if len(chunk) == 4096 or index == len(base) - 1:
            images[index + 1 - len(chunk):index + 1] = torch.stack(chunk).to(device)
            chunk = []
    return images, torch.tensor(labels, dtype=torch.int64).to(device)


def resident_batches(choice: str, base: Dataset, samples: SeededSamples, batch_sampler,
                     device: torch.device) -> ResidentBatches | None:
    """The held-set loader ``--data_on_device`` asks for: ``on``, or ``auto`` on a GPU for an in-memory or cached set
    of at most 4 GiB and a quarter of the GPU's memory; None (read per sample) when off or not possible."""
    if choice == "off":
        return None
    why_not = None
    if not getattr(samples.transform, "batched", False):
        why_not = "its augmentation works one image at a time (RandAugment): set --random_aug_magnitude 0"
    elif samples.noise_fn is not None:
        why_not = "its mask strategy is drawn per image: use --mask_strategy random"
    if choice == "auto":
        if why_not or device.type != "cuda" or not in_memory_kind(base):
            return None
        first = base[0]
        size = len(base) * (first[0].numel() if first is not None and isinstance(first[0], torch.Tensor) else 0)
        if not size or size > min(AUTO_LIMIT_BYTES, torch.cuda.get_device_properties(device).total_memory // 4):
            return None
    elif why_not:
        raise UserError(f"--data_on_device on cannot make this run's views in batches: {why_not}, or "
                        "--data_on_device off")
    held = hold_on_device(base, device)
    if held is None:
        if choice == "on":
            raise UserError("--data_on_device on needs every training image readable and of one size, which this "
                            "set's are not: use --data_on_device off")
        return None
    images, labels = held
    logger.info("training images held on %s: %s uint8 (%.1f MB), views made there in batches", device,
                tuple(images.shape), images.numel() / 2**20)
    return ResidentBatches(images, labels, samples, batch_sampler)
