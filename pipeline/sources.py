"""Where images come from: image folders, Fashion-MNIST (IDX files or the 🤗 Hub), 🤗 datasets, synthetic images."""
from __future__ import annotations

import gzip
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg

from utils.errors import DataError

from .transforms import EncodedJpeg, to_channels

logger = logging.getLogger(__name__)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
ARRAY_EXTENSIONS = (".npy",)  # (H, W, C) arrays: any number of channels (multispectral, ...)
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_HUB_ID = "zalando-datasets/fashion_mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format, optionally gzipped) into a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    zero, dtype_code, ndim = data[0] * 256 + data[1], data[2], data[3]
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"{path} is not a uint8 IDX file")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def find_fashion_mnist(path: str | None) -> Path | None:
    """The folder that holds Fashion-MNIST's IDX files: ``path`` if given, else Debian's package folder."""
    candidates = [path] if path else list(FASHION_MNIST_DIRS)
    for folder in candidates:
        if folder and (Path(folder) / "train-images-idx3-ubyte.gz").exists() or (
                folder and (Path(folder) / "train-images-idx3-ubyte").exists()):
            return Path(folder)
    if path:
        raise DataError(f"no Fashion-MNIST IDX files (train-images-idx3-ubyte[.gz]) in {path}: "
                        "point --path_to_data at the folder that holds them")
    return None


def load_fashion_mnist(split: str, path: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images (N, 28, 28) uint8 and labels (N,), from IDX files or, failing that, the 🤗 Hub."""
    prefix = "train" if split == "train" else "t10k"
    folder = find_fashion_mnist(path)
    if folder is not None:
        def idx(name: str) -> np.ndarray:
            plain = folder / f"{prefix}-{name}-idx{3 if name == 'images' else 1}-ubyte"
            return read_idx(plain if plain.exists() else f"{plain}.gz")
        return idx("images"), idx("labels")
    try:
        import datasets  # only needed for the Hub fallback

        hub = datasets.load_dataset(FASHION_MNIST_HUB_ID, split="train" if split == "train" else "test")
        images = np.stack([np.asarray(image, dtype=np.uint8) for image in hub["image"]])
        return images, np.asarray(hub["label"])
    except Exception as error:  # offline, or `datasets` missing
        raise DataError(
            "Fashion-MNIST not found: install it with `apt-get install dataset-fashion-mnist` (IDX files under "
            f"/usr/share/datasets/fashion-mnist), pass --path_to_data DIR with its IDX files, or go online with "
            f"`pip install datasets` ({type(error).__name__})"
        ) from None


def list_files(root: Path, extensions: Sequence[str]) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in extensions and p.is_file())


def resolve_image_folder(path: str, split: str, require_split: bool = False) -> Path:
    """The folder of ``split``: ``train/`` (or ``val/``/``validation/``) when the ImageNet layout is there,
    the folder itself otherwise (its images, in class subfolders or not, are all used)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"--path_to_data {path} is not a folder: pass a folder of images (or ImageNet-style train/ val/)")
    names = ("train",) if split == "train" else ("val", "validation")
    for name in names:
        if (root / name).is_dir():
            return root / name
    if require_split:
        raise DataError(f"no {' or '.join(n + '/' for n in names)} folder under {path}: evaluation needs held-out images "
                        "in the same class subfolders")
    if split != "train" and (root / "train").is_dir():
        return root / "train"  # no validation split: pictures show training images
    return root


@dataclass
class ImageRecord:
    path: Path
    label: int


class ImageFolderDataset(Dataset):
    """Images under a folder as uint8 (C, H, W): class subfolders give labels (ImageNet layout), loose images get -1;
    an unreadable file returns ``None`` (the collate function drops and counts it), so one bad JPEG never stops a run.
    """

    def __init__(self, root: Path, num_channels: int, encoded_jpeg: bool = False):
        self.num_channels = num_channels
        self.encoded_jpeg = encoded_jpeg and num_channels == 3  # JPEGs come back undecoded (EncodedJpeg)
        files = list_files(root, IMAGE_EXTENSIONS + ARRAY_EXTENSIONS)
        if not files:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS + ARRAY_EXTENSIONS)}) found under {root}: "
                            "check --path_to_data")
        class_dirs = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
        loose = [p for p in files if len(p.relative_to(root).parts) == 1]
        if class_dirs and not loose:
            self.classes = class_dirs
            index = {name: i for i, name in enumerate(class_dirs)}
            self.records = [ImageRecord(p, index[p.relative_to(root).parts[0]]) for p in files]
        else:
            self.classes = []
            self.records = [ImageRecord(p, -1) for p in files]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        record = self.records[index]
        try:
            image = image_from_bytes(record.path.read_bytes(), record.path.suffix, self.num_channels, self.encoded_jpeg)
            return image, record.label
        except DataError:
            raise
        except Exception as error:  # truncated, corrupt or unreadable: skipped and counted by the collate
            logger.warning("skipping unreadable image %s (%s)", record.path, error)
            return None


def image_from_bytes(data: bytes, suffix: str, num_channels: int, encoded_jpeg: bool = False):
    """An image file's bytes -> uint8 (C, H, W); or, with ``encoded_jpeg``, an RGB/gray JPEG left undecoded
    (:class:`EncodedJpeg`). Raises on a file that does not decode."""
    if suffix.lower() in ARRAY_EXTENSIONS:
        return to_channels(np.load(io.BytesIO(data), allow_pickle=False), num_channels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's EXIF / palette warnings (and torchvision.io's deprecation) would flood the log
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            if num_channels == 3 and image.format == "JPEG" and image.mode in ("RGB", "L"):  # CMYK etc.: PIL below
                width, height = image.size
                encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                if encoded_jpeg:
                    return EncodedJpeg(encoded, height, width)
                # libjpeg-turbo straight into a tensor: PIL's pixels exactly (tested), without PIL's two copies
                # on the way to numpy (~25% less of a loader worker's time)
                return decode_jpeg(encoded, mode=ImageReadMode.RGB)
            image.load()
            return to_channels(image, num_channels)


class ArrayDataset(Dataset):
    """In-memory uint8 images (N, H, W[, C]) with labels, e.g. Fashion-MNIST."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, num_channels: int, classes: Sequence[str] = ()):
        self.images, self.labels, self.num_channels, self.classes = images, labels, num_channels, list(classes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return to_channels(self.images[index], self.num_channels), int(self.labels[index])


def hub_columns(columns: list[str], image_column: str | None, label_column: str | None) -> tuple[str, str | None]:
    """The image and label columns of a 🤗 dataset: the ones asked for (which must exist), else guessed."""
    for flag, column in (("--image_column", image_column), ("--label_column", label_column)):
        if column and column not in columns:
            raise DataError(f"{flag} {column}: the dataset has no such column (it has {', '.join(columns)})")
    image = image_column or next((c for c in ("image", "img", "pixel_values") if c in columns), None)
    if image is None:
        raise DataError(f"no image column among {columns}: pass --image_column NAME")
    return image, label_column or next((c for c in ("label", "labels", "fine_label") if c in columns), None)


class HubImageDataset(Dataset):
    """A 🤗 ``datasets`` split (map-style) with an image column and an optional label column."""

    def __init__(self, hub_split, num_channels: int, image_column: str | None = None, label_column: str | None = None):
        self.image_column, self.label_column = hub_columns(hub_split.column_names, image_column, label_column)
        self.split, self.num_channels = hub_split, num_channels
        feature = hub_split.features.get(self.label_column) if self.label_column else None
        self.classes = list(getattr(feature, "names", []) or [])

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        try:  # the row access is where `datasets` decodes the image
            row = self.split[index]
            image = to_channels(row[self.image_column], self.num_channels)
        except DataError:
            raise
        except Exception as error:
            logger.warning("skipping unreadable image at row %d (%s)", index, error)
            return None
        label = row[self.label_column] if self.label_column else -1
        return image, label if isinstance(label, int) else -1


class SyntheticDataset(Dataset):
    """Random smooth images for smoke runs and benchmarks (no files needed)."""

    def __init__(self, num_samples: int, num_channels: int, img_size: int, num_classes: int = 10, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        coarse = torch.rand(num_samples, num_channels, 4, 4, generator=generator)
        self.images = (torch.nn.functional.interpolate(coarse, size=img_size, mode="bilinear") * 255).to(torch.uint8)
        self.labels = torch.randint(num_classes, (num_samples,), generator=generator)
        self.classes = [str(i) for i in range(num_classes)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], int(self.labels[index])


@dataclass(frozen=True)
class HubOptions:
    """How to read a 🤗 dataset (``--dataset hf:NAME``): its configuration, which splits, which columns, which
    revision; None everywhere: the defaults (``train``; ``validation``, ``val`` or ``test``; guessed columns)."""

    config: str | None = None
    train_split: str | None = None
    val_split: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    revision: str | None = None


def load_hub_split(name: str, split: str, streaming: bool = False, require_split: bool = False,
                   options: HubOptions = HubOptions()):
    """One split of a 🤗 dataset: a Hub name, a folder written by ``save_to_disk``, or a local data folder."""
    try:
        import datasets
    except ImportError:
        raise DataError("--dataset hf:... needs the `datasets` package: pip install datasets") from None
    asked = options.train_split if split == "train" else options.val_split
    wanted = (asked,) if asked else ("train",) if split == "train" else ("validation", "val", "test")
    local = Path(name).expanduser()
    source = str(local) if local.is_dir() else name
    try:
        if (local / "dataset_dict.json").exists() or (local / "state.json").exists():
            loaded = datasets.load_from_disk(str(local))
            if isinstance(loaded, datasets.Dataset):
                return loaded
            available = list(loaded.keys())
        else:
            available = datasets.get_dataset_split_names(source, options.config, revision=options.revision)
            loaded = None
    except Exception as error:
        raise DataError(f"cannot open 🤗 dataset {name!r} ({type(error).__name__}: {str(error).splitlines()[0]}): "
                        "check the name, the path, --dataset_config, --dataset_revision or your connection") from None
    if asked and asked not in available:
        raise DataError(f"🤗 dataset {name!r} has no split {asked!r} (it has {', '.join(available)}): "
                        f"pass one of them as --{'train' if split == 'train' else 'val'}_split")
    chosen = next((n for n in wanted if n in available), available[0] if split == "train" else None)
    if chosen is None and require_split:
        raise DataError(f"🤗 dataset {name!r} has no validation or test split (it has {available}): "
                        "evaluation needs held-out images")
    if chosen is None:  # no held-out split: pictures come from the training split
        chosen = available[0]
    if loaded is not None:
        return loaded[chosen]
    return datasets.load_dataset(source, options.config, split=chosen, streaming=streaming, revision=options.revision)


def dataset_classes(dataset) -> list[str]:
    """Class names of a dataset built by :func:`build_image_dataset` (through a Subset too); [] if unlabeled."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return list(getattr(dataset, "classes", []) or [])
