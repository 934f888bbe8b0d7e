"""Segmentation data: image/mask sources (ADE20K's release layout, any folder of pairs, 🤗 datasets, Fashion-MNIST
canvases) and joint transforms that keep the mask aligned with its image. Items are ``(image uint8 (C, H, W), mask
int64 (H, W))`` or ``None``; masks hold class ids in [0, num_classes) and ``IGNORE_INDEX`` (255) where unlabelled.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode

from utils.errors import DataError

from .samples import sample_seed
from .sources import (
    FASHION_MNIST_CLASSES, IMAGE_EXTENSIONS, HubImageDataset, HubOptions, list_files, load_fashion_mnist,
    load_hub_split,
)
from .transforms import to_channels

logger = logging.getLogger(__name__)

IGNORE_INDEX = 255
SPLIT_FOLDERS = {"train": ("training", "train"), "val": ("validation", "val")}
MASK_FOLDERS = ("annotations", "masks", "labels")
ADE20K_FOLDER = "ADEChallengeData2016"
ADE20K_NUM_CLASSES = 150
MASK_COLUMNS = ("annotation", "mask", "label", "segmentation", "semantic_map")


def read_mask(source) -> torch.Tensor:
    """A PNG path or PIL image (mode L, P or I) or array -> int64 (H, W) of class ids (palette indices for P)."""
    image = Image.open(source) if isinstance(source, (str, Path)) else source
    array = np.asarray(image)
    if array.ndim == 3:  # an RGB mask: class ids are expected in the first channel
        array = array[..., 0]
    return torch.from_numpy(np.array(array, dtype=np.int64))


def reduce_zero_label(mask: torch.Tensor) -> torch.Tensor:
    """ADE20K convention: 0 means 'no label' (ignored), classes 1..150 become 0..149; 255 stays ignored."""
    return torch.where((mask == 0) | (mask == IGNORE_INDEX), IGNORE_INDEX, mask - 1)


# --------------------------------------------------------------------------------------------- sources
def resolve_pair_folders(path: str, split: str) -> tuple[Path, Path, bool]:
    """(image folder, mask folder, ADE20K?) of ``split`` under ``path``: ADE20K's release layout
    (``[ADEChallengeData2016/]images/training`` + ``annotations/training``) or ``images/{train,val}`` with
    ``annotations|masks|labels/{train,val}``."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"--path_to_data {path} is not a folder: point it at ADEChallengeData2016/ or at a folder with "
                        "images/<split>/ and annotations/<split>/")
    is_ade = root.name == ADE20K_FOLDER or (root / ADE20K_FOLDER).is_dir()
    if (root / ADE20K_FOLDER).is_dir():
        root = root / ADE20K_FOLDER
    for name in SPLIT_FOLDERS[split]:
        images = root / "images" / name
        if images.is_dir():
            masks = next((root / folder / name for folder in MASK_FOLDERS if (root / folder / name).is_dir()), None)
            if masks is None:
                raise DataError(f"{images} has no mask folder beside it: put the masks in {root}/annotations/{name}/ "
                                "(same file names, .png)")
            return images, masks, is_ade
    wanted = " or ".join(f"images/{name}" for name in SPLIT_FOLDERS[split])
    raise DataError(f"no {wanted} under {root}: expected ADE20K's layout (images/{{training,validation}}, "
                    "annotations/{training,validation}) or images/{train,val} with annotations/{train,val}")


class PairFolderDataset(Dataset):
    """Images under one folder and same-named masks (any image extension, usually .png) under another."""

    def __init__(self, images: Path, masks: Path, num_channels: int, zero_is_ignore: bool):
        self.images = list_files(images, IMAGE_EXTENSIONS)
        if not self.images:
            raise DataError(f"no images in {images}: add image files ({', '.join(IMAGE_EXTENSIONS[:4])}, ...)")
        mask_files = {file.relative_to(masks).with_suffix(""): file for file in list_files(masks, IMAGE_EXTENSIONS)}
        self.masks = []
        for image in self.images:
            mask = mask_files.get(image.relative_to(images).with_suffix(""))
            if mask is None:
                raise DataError(f"image {image} has no mask in {masks} (expected {image.relative_to(images).with_suffix('.png')}): "
                                "every image needs a mask with the same name, or remove the image")
            self.masks.append(mask)
        self.num_channels, self.zero_is_ignore = num_channels, zero_is_ignore

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        try:
            with Image.open(self.images[index]) as image:
                pixels = to_channels(image, self.num_channels)
            mask = read_mask(self.masks[index])
        except DataError:
            raise
        except Exception as error:
            logger.warning("skipping unreadable pair %s (%s)", self.images[index], error)
            return None
        return check_pair(pixels, reduce_zero_label(mask) if self.zero_is_ignore else mask, self.images[index])


def check_pair(image: torch.Tensor, mask: torch.Tensor, name) -> tuple[torch.Tensor, torch.Tensor]:
    if tuple(image.shape[1:]) != tuple(mask.shape):
        raise DataError(f"{name}: image is {image.shape[2]}x{image.shape[1]} but its mask {mask.shape[1]}x{mask.shape[0]}: "
                        "an image and its mask must have the same size")
    return image, mask


class HubSegmentationDataset(HubImageDataset):
    """A 🤗 split with an image column and a mask column (e.g. ``scene_parse_150``: ``image``, ``annotation``)."""

    def __init__(self, hub_split, num_channels: int, image_column: str | None, mask_column: str | None,
                 zero_is_ignore: bool):
        columns = hub_split.column_names
        mask_column = mask_column or next((c for c in MASK_COLUMNS if c in columns), None)
        if mask_column is None:
            raise DataError(f"no mask column among {columns}: pass --mask_column NAME")
        super().__init__(hub_split, num_channels, image_column, label_column=mask_column)
        self.classes, self.zero_is_ignore = [], zero_is_ignore

    def __getitem__(self, index: int):
        try:
            row = self.split[index]
            image = to_channels(row[self.image_column], self.num_channels)
            mask = read_mask(row[self.label_column])
        except DataError:
            raise
        except Exception as error:
            logger.warning("skipping unreadable pair at row %d (%s)", index, error)
            return None
        return check_pair(image, reduce_zero_label(mask) if self.zero_is_ignore else mask, f"row {index}")


class FashionMNISTCanvases(Dataset):
    """Fashion-MNIST garments pasted onto noisy canvases, the offline segmentation set: a canvas, a function of (split,
    index), holds 2-3 garments (train split for training, test for validation), later ones on top; a pixel's label is
    its garment's class + 1 where the garment has ink (value > ``ink``), else 0 (background).
    """

    classes = ("background", *FASHION_MNIST_CLASSES)

    def __init__(self, split: str, size: int = 48, num_canvases: int | None = None, path: str | None = None,
                 garments: tuple[int, int] = (2, 3), ink: int = 10):
        if size < 28:
            raise DataError(f"canvases must be at least 28 pixels to hold a garment, got --img_size {size}")
        self.images, self.labels = load_fashion_mnist(split, path)
        self.size, self.garments, self.ink = size, garments, ink
        self.split_seed = 1 if split == "train" else 2
        self.num_canvases = num_canvases or len(self.images) // 3  # each garment used about once

    def __len__(self) -> int:
        return self.num_canvases

    def __getitem__(self, index: int):
        generator = torch.Generator().manual_seed(sample_seed(self.split_seed, 0, index))
        canvas = torch.randint(0, 16, (self.size, self.size), generator=generator, dtype=torch.uint8)
        mask = torch.zeros(self.size, self.size, dtype=torch.int64)
        count = int(torch.randint(self.garments[0], self.garments[1] + 1, (1,), generator=generator))
        for _ in range(count):
            pick = int(torch.randint(len(self.images), (1,), generator=generator))
            top, left = torch.randint(0, self.size - 28 + 1, (2,), generator=generator).tolist()
            garment = torch.from_numpy(self.images[pick])
            ink = garment > self.ink
            canvas[top:top + 28, left:left + 28][ink] = garment[ink]
            mask[top:top + 28, left:left + 28][ink] = int(self.labels[pick]) + 1
        return canvas.unsqueeze(0), mask


def default_zero_is_ignore(dataset: str, path_to_data: str | None) -> bool:
    """ADE20K (its folder, or 🤗 scene_parse_150 / ADE names) uses 0 for 'no label'."""
    if dataset == "folder" and path_to_data:
        root = Path(path_to_data).expanduser()
        return root.name == ADE20K_FOLDER or (root / ADE20K_FOLDER).is_dir()
    return dataset.startswith("hf:") and any(key in dataset.lower() for key in ("scene_parse", "ade20k"))


def build_segmentation_dataset(dataset: str, path_to_data: str | None, split: str, num_channels: int,
                               max_samples: int | None = None, hub: HubOptions | None = None,
                               mask_column: str | None = None, zero_is_ignore: bool = False,
                               canvas_size: int = 48) -> Dataset:
    """One split of ``fashion_mnist_seg`` (built in), ``folder`` (``--path_to_data``) or ``hf:<name or path>``."""
    if dataset == "fashion_mnist_seg":
        data = FashionMNISTCanvases(split, canvas_size, path=path_to_data)
    elif dataset == "folder":
        if not path_to_data:
            raise DataError("--dataset folder needs --path_to_data DIR (ADEChallengeData2016/ or images/ + annotations/)")
        images, masks, _ = resolve_pair_folders(path_to_data, split)
        data = PairFolderDataset(images, masks, num_channels, zero_is_ignore)
    elif dataset.startswith("hf:"):
        hub = hub or HubOptions()
        data = HubSegmentationDataset(load_hub_split(dataset[3:], split, require_split=split != "train", options=hub),
                                      num_channels, hub.image_column, mask_column, zero_is_ignore)
    else:
        raise DataError(f"unknown --dataset {dataset!r}: use fashion_mnist_seg, folder or hf:<name>")
    if max_samples is not None and max_samples < len(data):
        subset = torch.utils.data.Subset(data, range(max_samples))
        subset.classes = getattr(data, "classes", ())
        data = subset
    return data


# --------------------------------------------------------------------------------------------- transforms
def scale_to_fit(height: int, width: int, short_side: float, max_aspect: float = 4.0) -> tuple[int, int]:
    """Size that brings the short side to ``short_side`` without the long side passing ``max_aspect`` times it
    (mmseg's keep-ratio resize to (2048, 512) for ADE20K is short_side=512, max_aspect=4)."""
    scale = min(short_side / min(height, width), max_aspect * short_side / max(height, width))
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def resize_pair(image: torch.Tensor, mask: torch.Tensor | None, size: tuple[int, int]):
    """Bilinear for the image, nearest neighbour for the mask (labels are never blended)."""
    if tuple(image.shape[1:]) == tuple(size):
        return image, mask
    image = TF.resize(image, list(size), interpolation=InterpolationMode.BILINEAR, antialias=True)
    if mask is not None:
        mask = TF.resize(mask.unsqueeze(0), list(size), interpolation=InterpolationMode.NEAREST_EXACT)[0]
    return image, mask


def photometric_jitter(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """mmseg's PhotoMetricDistortion on the image only: brightness +-32, contrast 0.5-1.5 and, for RGB,
    saturation 0.5-1.5 and hue +-36 degrees, each applied with probability 1/2."""
    draws = torch.rand(8, generator=generator).tolist()
    pixels = image.float()
    if draws[0] < 0.5:
        pixels = pixels + (draws[1] * 64 - 32)
    if draws[2] < 0.5:
        pixels = pixels * (0.5 + draws[3])
    image = pixels.clamp(0, 255).round().to(torch.uint8)
    if image.shape[0] == 3:
        if draws[4] < 0.5:
            image = TF.adjust_saturation(image, 0.5 + draws[5])
        if draws[6] < 0.5:
            image = TF.adjust_hue(image, (draws[7] * 36 - 18) / 180)  # +-18 OpenCV hue units of 2 degrees
    return image


class SegmentationTrainTransform:
    """Random scale (short side = base_size x U(scale_range)), random crop (retried, as mmseg, until no class
    covers more than ``cat_max_ratio`` of the labelled pixels), flip, photometric jitter, then padding to
    ``crop_size`` (image: ``fill``, the data's mean colour; mask: IGNORE_INDEX): every sample is
    (C, crop, crop) with a (crop, crop) mask."""

    def __init__(self, crop_size: int, base_size: int, scale_range: Sequence[float] = (0.5, 2.0), photometric: bool = True,
                 fill: Sequence[int] = (0,), cat_max_ratio: float = 0.75):
        self.crop_size, self.base_size, self.scale_range, self.photometric = crop_size, base_size, scale_range, photometric
        self.fill, self.cat_max_ratio = torch.tensor(fill, dtype=torch.uint8).view(-1, 1, 1), cat_max_ratio

    def crop_corner(self, mask: torch.Tensor, generator: torch.Generator) -> tuple[int, int]:
        height, width = mask.shape
        for _ in range(10):
            top = int(torch.randint(0, max(height - self.crop_size, 0) + 1, (1,), generator=generator))
            left = int(torch.randint(0, max(width - self.crop_size, 0) + 1, (1,), generator=generator))
            labels = mask[top:top + self.crop_size, left:left + self.crop_size]
            counts = torch.bincount(labels[labels != IGNORE_INDEX].flatten())
            if self.cat_max_ratio >= 1.0 or (counts > 0).sum() > 1 and counts.max() < self.cat_max_ratio * counts.sum():
                break
        return top, left

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, generator: torch.Generator):
        low, high = self.scale_range
        ratio = low + (high - low) * torch.rand(1, generator=generator, dtype=torch.float64).item()
        image, mask = resize_pair(image, mask, scale_to_fit(image.shape[1], image.shape[2], self.base_size * ratio))
        top, left = self.crop_corner(mask, generator)
        image = image[:, top:top + self.crop_size, left:left + self.crop_size]
        mask = mask[top:top + self.crop_size, left:left + self.crop_size]
        if torch.rand(1, generator=generator).item() < 0.5:
            image, mask = image.flip(-1), mask.flip(-1)
        if self.photometric:
            image = photometric_jitter(image, generator)
        if tuple(mask.shape) != (self.crop_size, self.crop_size):  # pad at the right and bottom, as mmseg
            canvas = self.fill.expand(image.shape[0], self.crop_size, self.crop_size).clone()
            canvas[:, :mask.shape[0], :mask.shape[1]] = image
            padded = torch.full((self.crop_size, self.crop_size), IGNORE_INDEX, dtype=mask.dtype)
            padded[:mask.shape[0], :mask.shape[1]] = mask
            image, mask = canvas, padded
        return image.contiguous(), mask.contiguous()


class SegmentationEvalTransform:
    """Evaluation view: the image resized to the base scale (keep ratio); the mask stays at its original size,
    where the metric is computed (predictions are resized back to it)."""

    def __init__(self, base_size: int):
        self.base_size = base_size

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None):
        size = scale_to_fit(image.shape[1], image.shape[2], self.base_size)
        return resize_pair(image, None, size)[0], mask


class SegmentationSamples(Dataset):
    """``(index, epoch)`` -> ``{"pixel_values": uint8 (C, H, W), "mask": int64 (h, w)}`` (or ``None``)."""

    def __init__(self, base: Dataset, transform, seed: int):
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        item = self.base[index]
        if item is None:
            return None
        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
        image, mask = self.transform(*item, generator)
        return {"pixel_values": image, "mask": mask}


def segmentation_classes(dataset) -> list[str]:
    return list(getattr(dataset, "classes", ()) or ())


__all__ = [
    "ADE20K_NUM_CLASSES", "FashionMNISTCanvases", "HubSegmentationDataset", "IGNORE_INDEX", "PairFolderDataset",
    "SegmentationEvalTransform", "SegmentationSamples", "SegmentationTrainTransform", "build_segmentation_dataset",
    "default_zero_is_ignore", "read_mask", "reduce_zero_label", "resolve_pair_folders", "scale_to_fit",
]
