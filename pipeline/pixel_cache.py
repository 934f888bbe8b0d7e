"""A decoded pixel cache, which spares loader workers the JPEG decoding: every image decoded once, uint8 end to end
in one memory-mapped file per split (``make_pixel_cache.py`` writes it; ``--path_to_data CACHE`` reads it). Same images
at the same indices as the source (undecodable ones stay gaps), so runs see the same views, unless ``--max_size``
shrank them; the price is disk (full-size ImageNet-1k train: about 700 GB).

Layout of a split folder: ``pixels.u8`` (each image (H, W, C) uint8, end to end), ``index.npy`` (int64 (N, 4): byte
offset, height, width, label; height 0 for an image that did not decode) and ``cache.json`` (channels, classes).
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from utils.errors import DataError

INDEX_NAME = "cache.json"
FORMAT = "mae-accelerate pixel cache"


def find_cache(path: str | None, split: str, require_split: bool = False) -> Path | None:
    """The folder holding ``split``'s cache: ``<path>/train`` (``val``/``validation`` for other splits) when there;
    else, unless ``require_split``, ``<path>/train`` or ``<path>`` itself. None if there is none."""
    if not path or "://" in path:
        return None
    base = Path(path).expanduser()
    names = ("train",) if split == "train" else ("val", "validation")
    candidates = [base / name for name in names]
    if not require_split:
        candidates += [base / "train", base] if split != "train" else [base]
    return next((folder for folder in candidates if (folder / INDEX_NAME).is_file()), None)


def is_pixel_cache(path: str | None) -> bool:
    return find_cache(path, "train") is not None


class PixelCacheDataset(Dataset):
    """A split of a pixel cache. Items are ``(uint8 (C, H, W), label)``, a view of the memory map with (H, W, C)
    strides (the transforms copy what they crop), or ``None`` for an image the source could not decode."""

    def __init__(self, folder: Path, num_channels: int, max_samples: int | None = None):
        self.folder, self.num_channels = Path(folder), num_channels
        try:
            meta = json.loads((self.folder / INDEX_NAME).read_text())
            self.index = np.load(self.folder / "index.npy", allow_pickle=False)
            size = (self.folder / "pixels.u8").stat().st_size
        except (OSError, ValueError) as error:
            raise DataError(f"cannot read the pixel cache in {self.folder} ({error}): write it again with "
                            "make_pixel_cache.py") from None
        if meta.get("format") != FORMAT or "num_channels" not in meta or self.index.ndim != 2 or self.index.shape[1] != 4:
            raise DataError(f"{self.folder} is not a pixel cache written by make_pixel_cache.py: write it again")
        self.stored_channels, self.classes = meta["num_channels"], meta.get("classes", [])
        if self.stored_channels != num_channels:  # converting here would not give the source's own conversion
            raise DataError(f"the pixel cache in {self.folder} holds {self.stored_channels}-channel images, the run asks "
                            f"for {num_channels}: set --input_channels {self.stored_channels} or write a cache with "
                            f"make_pixel_cache.py --input_channels {num_channels}")
        ends = self.index[:, 0] + self.index[:, 1] * self.index[:, 2] * self.stored_channels
        if size != meta.get("bytes") or (len(ends) and ends.max() > size):
            raise DataError(f"{self.folder / 'pixels.u8'} is shorter than its index says (a copy cut short?): "
                            "copy it again or write it again with make_pixel_cache.py")
        if max_samples is not None:
            self.index = self.index[:max_samples]
        self._pixels, self._pid = None, None

    def __len__(self) -> int:
        return len(self.index)

    def pixels(self) -> np.memmap:
        """The memory map, opened once per process (a forked worker opens its own). Read-only and shared: a private
        (copy-on-write) map of a file bigger than RAM is refused by Linux's overcommit check."""
        if self._pixels is None or self._pid != os.getpid():
            self._pixels, self._pid = np.memmap(self.folder / "pixels.u8", dtype=np.uint8, mode="r"), os.getpid()
        return self._pixels

    def __getitem__(self, index: int):
        offset, height, width, label = (int(value) for value in self.index[index])
        if height == 0:
            return None
        channels = self.num_channels
        image = self.pixels()[offset:offset + height * width * channels].reshape(height, width, channels)
        with warnings.catch_warnings():  # torch warns that the map is read-only: the transforms never write into it
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(image).permute(2, 0, 1), label

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pixels": None, "_pid": None}  # workers started by spawn map the file themselves


class CacheWriter:
    """Appends images to a new split folder; ``close()`` writes the index and then ``cache.json``, last, so a cut
    write never looks like a cache."""

    def __init__(self, folder: Path, num_channels: int):
        self.folder, self.num_channels = Path(folder), num_channels
        self.folder.mkdir(parents=True, exist_ok=True)
        # a new file, put in place at close(): a job still reading the old cache keeps its pages (no SIGBUS)
        self.handle = open(self.folder / "pixels.u8.partial", "wb")
        self.records, self.offset = [], 0

    def add(self, item: tuple[torch.Tensor, int] | None) -> None:
        """``item``: a source's ``(uint8 (C, H, W), label)``, or None for an image that did not decode (kept as a gap,
        so indices stay)."""
        if item is None:
            self.records.append((self.offset, 0, 0, -1))
            return
        image, label = item
        data = np.ascontiguousarray(image.permute(1, 2, 0).numpy())  # (H, W, C)
        self.handle.write(data.tobytes())
        self.records.append((self.offset, data.shape[0], data.shape[1], label))
        self.offset += data.nbytes

    def close(self, classes: list[str], source: dict) -> dict:
        """Put the split in place and return its ``cache.json``. ``classes``: the source's class names; without
        names, the label numbers found ("0", "1", ...)."""
        self.handle.close()
        (self.folder / INDEX_NAME).unlink(missing_ok=True)
        os.replace(self.folder / "pixels.u8.partial", self.folder / "pixels.u8")
        np.save(self.folder / "index.npy", np.array(self.records, dtype=np.int64).reshape(-1, 4))
        if not classes:
            classes = [str(label) for label in range(max((record[3] for record in self.records), default=-1) + 1)]
        gaps = sum(1 for record in self.records if not record[1])
        meta = {"format": FORMAT, "num_channels": self.num_channels, "classes": list(classes),
                "images": len(self.records) - gaps, "gaps": gaps, "bytes": self.offset, "source": source}
        (self.folder / INDEX_NAME).write_text(json.dumps(meta, indent=1))
        return meta
