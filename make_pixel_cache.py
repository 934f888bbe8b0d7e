"""Decode a data set once into a pixel cache (uint8, memory-mapped) that the training scripts read with
``--path_to_data CACHE``: for repeated epochs when the loader workers cannot decode JPEGs as fast as the GPU trains.

    python make_pixel_cache.py --path_to_data /data/imagenet --output_dir /nvme/imagenet-pixels     # train/ and val/
    python make_pixel_cache.py --path_to_data s3://bucket/imagenet-shards --output_dir /nvme/imagenet-pixels
    python make_pixel_cache.py --dataset hf:user/photos --output_dir /nvme/photos-pixels

It keeps a folder's, tar shards' or 🤗 dataset's images pixel for pixel at the same indices, so a run on it sees the
source's views, labels and order with ``--decode cpu`` (but shards' images in one global shuffle). It needs a local
disk, ideally one whose pages stay in RAM (~700 GB for full-size ImageNet-1k train; ``--max_size`` shrinks it); see
pipeline/pixel_cache.py for the format.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from tqdm.auto import tqdm

from engine.flags import default_dataset, hub_options
from engine.setup import available_cores
from pipeline.datasets import build_image_dataset
from pipeline.pixel_cache import INDEX_NAME, CacheWriter
from pipeline.sources import dataset_classes
from utils.errors import DataError, run_cli

logger = logging.getLogger("make_pixel_cache")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=None,
                        help="folder, shards or hf:<hub name or path>, as in the training scripts (default: shards "
                             "or folder as --path_to_data holds).")
    parser.add_argument("--path_to_data", default=None, help="The source: an image folder (train/ and val/ kept "
                        "apart), a folder or fsspec URL of tar shards, or a 🤗 dataset's folder.")
    parser.add_argument("--image_column", default=None, help="Image column of a 🤗 dataset (default: guessed).")
    parser.add_argument("--output_dir", required=True, help="Local folder for the cache (train/ and val/ inside).")
    parser.add_argument("--input_channels", type=int, default=3,
                        help="Channels to store; a run on the cache must ask for the same --input_channels.")
    parser.add_argument("--max_size", type=int, default=0,
                        help="Shrink images whose longer side exceeds this (bicubic, antialiased) to save disk; "
                             "0 (default) keeps them as the source gives them.")
    parser.add_argument("--splits", nargs="+", default=["train", "val"], choices=["train", "val"],
                        help="Splits to cache (val: the source's val/ or validation/); a split the source does not have "
                             "is left out, and an older cache's copy of it removed.")
    parser.add_argument("--num_workers", type=int, default=max(1, min(16, available_cores() - 1)),
                        help="Processes decoding the source (default: the cores less one, at most 16).")
    args = parser.parse_args(argv)
    if not args.path_to_data and not (args.dataset or "").startswith("hf:"):
        parser.error("give --path_to_data (an image folder or tar shards) or --dataset hf:<name>: the built-in "
                     "data sets are held in memory already")
    args.dataset = default_dataset(args)
    if "://" in args.output_dir:
        parser.error(f"--output_dir {args.output_dir} is a URL: the cache is memory-mapped, so it must be a local folder")
    if args.dataset == "cache":
        parser.error(f"--path_to_data {args.path_to_data} is already a pixel cache")
    if args.dataset in ("fashion_mnist", "synthetic"):
        parser.error(f"--dataset {args.dataset} is held in memory already: a pixel cache would not make it faster")
    if args.max_size < 0 or args.num_workers < 0:
        parser.error("--max_size and --num_workers must not be negative")
    return args


class Shrunk(Dataset):
    """The source's items with images whose longer side exceeds ``max_size`` resized (0: unchanged)."""

    def __init__(self, source: Dataset, max_size: int):
        self.source, self.max_size = source, max_size

    def __len__(self) -> int:
        return len(self.source)

    def __getitems__(self, indices: list) -> list:
        if hasattr(self.source, "prefetch"):  # tar shards on an object store: a batch's reads go out together
            self.source.prefetch(list(indices))
        return [self[index] for index in indices]

    def __getitem__(self, index: int):
        item = self.source[index]
        if item is None or not self.max_size or max(item[0].shape[-2:]) <= self.max_size:
            return item
        image, label = item
        height, width = image.shape[-2:]
        scale = self.max_size / max(height, width)
        size = [max(1, round(height * scale)), max(1, round(width * scale))]
        return TF.resize(image, size, interpolation=InterpolationMode.BICUBIC, antialias=True), label


def as_list(items: list) -> list:
    return items


def write_split(args, split: str) -> bool:
    """Cache one split; False when the source has no such split."""
    try:
        source = build_image_dataset(args.dataset, args.path_to_data, split, args.input_channels, img_size=224,
                                     hub=hub_options(args), require_split=split != "train")
    except DataError as error:
        if split == "train":
            raise
        logger.info("no %s split to cache (%s)", split, error)
        stale = Path(args.output_dir).expanduser() / split
        if (stale / INDEX_NAME).exists():
            shutil.rmtree(stale)
            logger.warning("removed %s: an older cache's %s split, which the source no longer has", stale, split)
        return False
    if args.dataset == "shards" and split == "train":
        logger.info("the cache will be read as one data set (a global shuffle), not shard by shard as the shards are")
    folder = Path(args.output_dir).expanduser() / split
    writer = CacheWriter(folder, args.input_channels)
    loader = DataLoader(Shrunk(source, args.max_size), batch_size=64, num_workers=args.num_workers,
                        collate_fn=as_list)  # in index order: the cache keeps the source's indices
    start = time.perf_counter()
    with tqdm(total=len(loader.dataset), desc=f"cache {split}", unit="img") as bar:
        for items in loader:
            for item in items:
                writer.add(item)
            bar.update(len(items))
            bar.set_postfix_str(f"{writer.offset / 1e9:.1f} GB", refresh=False)
    meta = writer.close(dataset_classes(source),
                        {"dataset": args.dataset, "path_to_data": args.path_to_data, "max_size": args.max_size})
    logger.info("%s: %d images (%d that did not decode kept as gaps), %.2f GB in %s, %.0f s", split, meta["images"],
                meta["gaps"], meta["bytes"] / 1e9, folder, time.perf_counter() - start)
    return True


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)  # the workers decode; the main process only writes
    for split in args.splits:
        write_split(args, split)


if __name__ == "__main__":
    run_cli(main)
