"""One entry point for every source: ``--dataset`` and ``--path_to_data`` to a dataset of (image, label) items."""
from __future__ import annotations


import torch
from torch.utils.data import Dataset

from utils.errors import DataError

from .pixel_cache import PixelCacheDataset, find_cache
from .shards import TarShardDataset, find_index
from .sources import (
    FASHION_MNIST_CLASSES, ArrayDataset, HubImageDataset, HubOptions, ImageFolderDataset, SyntheticDataset,
    load_fashion_mnist, load_hub_split, resolve_image_folder,
)


def build_image_dataset(dataset: str, path_to_data: str | None, split: str, num_channels: int, img_size: int,
                        max_samples: int | None = None, hub: HubOptions | None = None,
                        require_split: bool = False, encoded_jpeg: bool = False) -> Dataset:
    """The uint8 image dataset of one split (items ``(C, H, W) uint8, label`` or ``None``). ``dataset``: ``folder``,
    ``shards`` (pipeline/shards.py), ``cache`` (pipeline/pixel_cache.py), ``fashion_mnist``, ``synthetic`` or
    ``hf:<name or path>`` (read as ``hub`` says); ``encoded_jpeg``: a folder's or shards' RGB JPEGs come back as
    :class:`EncodedJpeg`.
    """
    if dataset == "fashion_mnist":
        images, labels = load_fashion_mnist(split, path_to_data)
        data = ArrayDataset(images, labels, num_channels, FASHION_MNIST_CLASSES)
    elif dataset == "synthetic":
        data = SyntheticDataset(2048 if split == "train" else 256, num_channels, img_size, seed=0 if split == "train" else 1)
    elif dataset == "folder":
        if not path_to_data:
            raise DataError("--dataset folder needs --path_to_data DIR (a folder of images)")
        data = ImageFolderDataset(resolve_image_folder(path_to_data, split, require_split), num_channels, encoded_jpeg)
    elif dataset == "shards":
        found = find_index(path_to_data, split, require_split) if path_to_data else None
        if found is None:
            raise DataError(f"no shards.json under --path_to_data {path_to_data}: pass a folder or URL of tar shards "
                            "written by make_shards.py (or index yours with make_shards.py --index_only URL)")
        return TarShardDataset(found, num_channels, encoded_jpeg, max_samples)
    elif dataset == "cache":
        found = find_cache(path_to_data, split, require_split)
        if found is None:
            raise DataError(f"no cache.json under --path_to_data {path_to_data}: pass a local folder written by "
                            "make_pixel_cache.py")
        return PixelCacheDataset(found, num_channels, max_samples)
    elif dataset.startswith("hf:"):
        hub = hub or HubOptions()
        data = HubImageDataset(load_hub_split(dataset[3:], split, require_split=require_split, options=hub),
                               num_channels, hub.image_column, hub.label_column)
    else:
        raise DataError(f"unknown --dataset {dataset!r}: use fashion_mnist, synthetic, folder, shards, cache or hf:<name>")
    if max_samples is not None and max_samples < len(data):
        data = torch.utils.data.Subset(data, range(max_samples))
    return data
