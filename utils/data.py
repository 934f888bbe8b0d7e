"""Datasets and transforms shared by the scripts.

Every random choice a sample needs (its crop, flip and MAE mask) is drawn from a generator seeded by
``(seed, epoch, index)``. A sample therefore looks the same whatever the number of processes or
workers, and a resumed run sees exactly the images it would have seen: resume is exact by design.
"""
from __future__ import annotations

import gzip
import io
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from .errors import UserError
import torchvision.transforms.v2.functional as TF
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode, v2

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
ARRAY_EXTENSIONS = (".npy",)  # (H, W, C) arrays: any number of channels (multispectral, ...)
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_HUB_ID = "zalando-datasets/fashion_mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)


class DataError(UserError):
    """Bad data input; the message names the problem and the fix (the scripts print it as one line)."""


def channel_stats(num_channels: int, dataset: str | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation mean/std: the data set's own where known, ImageNet's for RGB, 0.5/0.5 otherwise."""
    if dataset == "fashion_mnist" and num_channels == 1:
        return FASHION_MNIST_MEAN, FASHION_MNIST_STD
    if dataset == "fashion_mnist":
        return FASHION_MNIST_MEAN * num_channels, FASHION_MNIST_STD * num_channels
    if num_channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (0.5,) * num_channels, (0.5,) * num_channels


# --------------------------------------------------------------------------------------------- transforms
# Transforms take uint8 (C, H, W) tensors and an explicit torch.Generator and return uint8 (C, S, S):
# torchvision's random transforms draw from the global RNG, which would make a sample's augmentation
# depend on worker and process layout. Normalisation happens on the device (see Normalize).


class RandomResizedCropFlip:
    """MAE pretraining augmentation: RandomResizedCrop(scale, ratio 3/4-4/3, bicubic) + horizontal flip.

    Crop parameters are drawn as in torchvision's RandomResizedCrop (10 tries, then a centre crop),
    but from the generator given, so each sample's view is a function of its seed.
    """

    def __init__(self, img_size: int, scale: tuple[float, float] = (0.2, 1.0), ratio=(3 / 4, 4 / 3), flip: bool = True):
        self.size, self.scale, self.log_ratio, self.flip = [img_size, img_size], scale, (math.log(ratio[0]), math.log(ratio[1])), flip
        self.ratio = ratio

    def crop_box(self, height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
        area = height * width
        for _ in range(10):
            draws = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
            target_area = area * (self.scale[0] + draws[0] * (self.scale[1] - self.scale[0]))
            aspect = math.exp(self.log_ratio[0] + draws[1] * (self.log_ratio[1] - self.log_ratio[0]))
            crop_w = int(round(math.sqrt(target_area * aspect)))
            crop_h = int(round(math.sqrt(target_area / aspect)))
            if 0 < crop_w <= width and 0 < crop_h <= height:
                top = int(draws[2] * (height - crop_h + 1))
                left = int(draws[3] * (width - crop_w + 1))
                return top, left, crop_h, crop_w
        in_ratio = width / height  # fallback: the largest centred crop with an allowed aspect ratio
        if in_ratio < self.ratio[0]:
            crop_w, crop_h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            crop_h, crop_w = height, int(round(height * self.ratio[1]))
        else:
            crop_w, crop_h = width, height
        return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w

    def __call__(self, image: "torch.Tensor | EncodedJpeg", generator: torch.Generator) -> "torch.Tensor | DeferredCrop":
        """The view of ``image``; for an :class:`EncodedJpeg`, the same view's parameters, to be decoded and cropped
        on the device (the same draws in the same order, so both paths give the same sample)."""
        height, width = (image.height, image.width) if isinstance(image, EncodedJpeg) else image.shape[-2:]
        top, left, crop_h, crop_w = self.crop_box(height, width, generator)
        flip = bool(self.flip and torch.rand(1, generator=generator).item() < 0.5)
        crop = torch.tensor([top, left, crop_h, crop_w, int(flip), self.size[0]])
        if isinstance(image, EncodedJpeg):
            return DeferredCrop(image.data, crop)
        return crop_view(image, crop.tolist())


def crop_view(image: torch.Tensor, crop: Sequence[int]) -> torch.Tensor:
    """Cut ``crop = (top, left, height, width, flip, size)`` out of a (C, H, W) uint8 image, resize it to size x size
    (bicubic, antialiased) and flip it: the one implementation behind both the CPU and the on-device path."""
    top, left, crop_h, crop_w, flip, size = crop
    view = TF.resized_crop(image, top, left, crop_h, crop_w, [size, size], interpolation=InterpolationMode.BICUBIC,
                           antialias=True)
    return view.flip(-1) if flip else view


@dataclass
class EncodedJpeg:
    """A JPEG's bytes and size, read without decoding it (``--decode device``: decoded later, on the GPU)."""

    data: torch.Tensor  # uint8 (num_bytes,)
    height: int
    width: int


@dataclass
class DeferredCrop:
    """A training view still to be made: the JPEG's bytes and ``(top, left, height, width, flip, size)``."""

    data: torch.Tensor
    crop: torch.Tensor


def decodes_on_device(decode: str, device: torch.device) -> bool:
    """``--decode``: ``device``, or ``auto`` on a GPU, leaves JPEGs encoded for :func:`decode_deferred`."""
    return decode == "device" or (decode == "auto" and device.type == "cuda")


def decode_deferred(batch: dict, device: torch.device, fence: str = "device") -> dict:
    """Decode a batch's JPEGs on ``device`` (nvJPEG on a GPU, libjpeg-turbo on the CPU) and make their views there:
    ``batch["jpeg"]`` (the JPEGs' bytes end to end, cut by ``batch["jpeg_sizes"]``) + ``batch["crop"]`` become
    ``batch["pixel_values"]``, uint8 (B, 3, S, S) on the device. An image
    that does not decode is dropped with its label and noise and counted in ``num_skipped``.

    ``fence`` (a GPU): torchvision's nvJPEG decoder writes its outputs from its own stream without waiting for the
    caller's, into blocks the caching allocator may hand out while queued kernels still read them (pytorch/vision
    PR 9606; seen here on an H100 as a device-side assert, CUDA error 710). ``device`` synchronises the whole device
    before and after the decode (no overlap with the training step); ``stream`` only the current stream, for
    :class:`utils.run.DeviceBatches`, which decodes on a stream of its own while the step runs on another."""
    sizes, crops = batch.pop("jpeg_sizes").tolist(), batch.pop("crop").tolist()
    datas = list(torch.split(batch.pop("jpeg"), sizes))  # one buffer from the worker: one shared-memory hand-over

    def sync() -> None:
        if device.type != "cuda":
            return
        if fence == "device":
            torch.cuda.synchronize(device)
        else:
            torch.cuda.current_stream(device).synchronize()

    sync()
    try:
        images = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:  # one bad file fails the batched call: decode them one by one to find it
        images = []
        for data in datas:
            try:
                images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except RuntimeError as error:
                logger.warning("skipping a JPEG that does not decode (%s)", str(error).splitlines()[0])
                images.append(None)
    sync()
    keep = [image is not None for image in images]
    views = [crop_view(image, crop) for image, crop in zip(images, crops) if image is not None]
    if not all(keep):
        mask = torch.tensor(keep)
        batch = {k: v[mask] if isinstance(v, torch.Tensor) and v.ndim and len(v) == len(keep) else v
                 for k, v in batch.items()}
        batch["num_skipped"] = batch.get("num_skipped", 0) + keep.count(False)
    if views:
        batch["pixel_values"] = torch.stack(views)
    return batch


class ClassifierTrainTransform(RandomResizedCropFlip):
    """Fine-tuning augmentation: RandomResizedCrop + flip, then RandAugment (``num_ops`` ops of ``magnitude``).

    RandAugment is torchvision's; it draws from the global RNG, so it runs under a forked RNG seeded from
    the sample's generator (same view for the same (seed, epoch, index), whatever the process layout).
    """

    def __init__(self, img_size: int, min_scale: float = 0.08, randaug_magnitude: int = 0, randaug_ops: int = 2):
        super().__init__(img_size, scale=(min_scale, 1.0))
        self.randaug = v2.RandAugment(num_ops=randaug_ops, magnitude=randaug_magnitude) if randaug_magnitude > 0 else None

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        image = super().__call__(image, generator)
        if self.randaug is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
                image = self.randaug(image)
        return image


class ResizeCenterCrop:
    """Deterministic evaluation view: resize the short side to img_size / crop_ratio, centre-crop img_size.
    Images already at ``img_size`` (e.g. Fashion-MNIST at 28) come out unchanged."""

    def __init__(self, img_size: int, crop_ratio: float = 0.875):
        self.size = img_size
        self.resize = img_size if crop_ratio >= 1.0 else int(round(img_size / crop_ratio))

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if tuple(image.shape[-2:]) == (self.size, self.size):
            return image
        image = TF.resize(image, self.resize, interpolation=InterpolationMode.BICUBIC, antialias=True)
        return TF.center_crop(image, [self.size, self.size])


class Normalize(torch.nn.Module):
    """uint8 (B, C, H, W) on any device -> float, normalised with per-channel mean/std (done on the device)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) * 255.0, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean.to(images.device)) / self.std.to(images.device)

    def inverse(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised float -> [0, 1] float, for pictures."""
        mean, std = self.mean.to(images.device) / 255.0, self.std.to(images.device) / 255.0
        return (images.float() * std + mean).clamp(0, 1)


def to_channels(image, num_channels: int) -> torch.Tensor:
    """PIL image or (H, W[, C]) array -> uint8 tensor (C, H, W) with ``num_channels`` channels.

    Grayscale, palette, RGBA and CMYK images are converted by PIL; a 1-channel image is repeated to fill
    more channels, and an RGB image is averaged down to one.
    """
    if isinstance(image, Image.Image) and image.mode.startswith("I"):
        image = np.asarray(image)  # 16/32-bit integer images: scaled below, PIL's convert would clip them
    if isinstance(image, Image.Image):
        single_band = len(image.getbands()) == 1 and image.mode != "P"
        mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(num_channels, "L" if single_band else "RGB")
        if image.mode == "P" and mode == "RGB" and "transparency" in image.info:
            image = image.convert("RGBA")  # PIL warns if palette transparency is dropped directly
        array = np.asarray(image.convert(mode))
    else:
        array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.dtype != np.uint8:
        if array.dtype.kind in "iu":  # 16-bit (or wider integers holding 16-bit values) -> 8 bit
            array = (np.clip(array, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8) if array.max(initial=0) > 255 \
                else array.astype(np.uint8)
        else:  # floats are taken to be in [0, 1]
            array = (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if not array.flags.writeable or not array.flags.c_contiguous:
        array = np.array(array, order="C")  # PIL's buffers are read-only; torch wants to own writable memory
    tensor = torch.from_numpy(array).permute(2, 0, 1)  # (C, H, W)
    channels = tensor.shape[0]
    if channels == num_channels:
        return tensor
    if channels == 1:
        return tensor.expand(num_channels, -1, -1).contiguous()
    if num_channels == 1:
        return tensor[:3].float().mean(dim=0, keepdim=True).round().to(torch.uint8)
    raise DataError(f"an image has {channels} channels but the model expects {num_channels}: set --input_channels {channels}")


# --------------------------------------------------------------------------------------------- sources
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
    """Images under a folder: class subfolders give labels (ImageNet layout), loose images get label -1.

    Items are uint8 tensors (C, H, W). A file that cannot be read returns ``None`` (the collate function
    drops it and counts it) so one bad JPEG never stops a long run.
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


class HubImageDataset(Dataset):
    """A 🤗 ``datasets`` split (map-style) with an image column and an optional label column."""

    def __init__(self, hub_split, num_channels: int, image_column: str | None = None, label_column: str | None = None):
        columns = hub_split.column_names
        self.image_column = image_column or next((c for c in ("image", "img", "pixel_values") if c in columns), None)
        if self.image_column is None:
            raise DataError(f"no image column among {columns}: pass --image_column NAME")
        self.label_column = label_column or next((c for c in ("label", "labels", "fine_label") if c in columns), None)
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


def load_hub_split(name: str, split: str, streaming: bool = False, require_split: bool = False):
    """One split of a 🤗 dataset: a Hub name, a folder written by ``save_to_disk``, or a local data folder."""
    try:
        import datasets
    except ImportError:
        raise DataError("--dataset hf:... needs the `datasets` package: pip install datasets") from None
    wanted = ("train",) if split == "train" else ("validation", "val", "test")
    local = Path(name).expanduser()
    try:
        if (local / "dataset_dict.json").exists() or (local / "state.json").exists():
            loaded = datasets.load_from_disk(str(local))
            if isinstance(loaded, datasets.Dataset):
                return loaded
            available = list(loaded.keys())
        else:
            available = datasets.get_dataset_split_names(str(local) if local.is_dir() else name)
            loaded = None
    except Exception as error:
        raise DataError(f"cannot open 🤗 dataset {name!r} ({type(error).__name__}: {str(error).splitlines()[0]}): "
                        "check the name, the path, or your connection") from None
    chosen = next((n for n in wanted if n in available), available[0] if split == "train" else None)
    if chosen is None and require_split:
        raise DataError(f"🤗 dataset {name!r} has no validation or test split (it has {available}): "
                        "evaluation needs held-out images")
    if chosen is None:  # no held-out split: pictures come from the training split
        chosen = available[0]
    if loaded is not None:
        return loaded[chosen]
    return datasets.load_dataset(str(local) if local.is_dir() else name, split=chosen, streaming=streaming)


def build_image_dataset(dataset: str, path_to_data: str | None, split: str, num_channels: int, img_size: int,
                        max_samples: int | None = None, image_column: str | None = None,
                        require_split: bool = False, encoded_jpeg: bool = False) -> Dataset:
    """The uint8 image dataset (items ``(C, H, W) uint8, label`` or ``None``) for one split.

    ``dataset``: ``folder`` (``--path_to_data``), ``shards`` (tar shards under ``--path_to_data``, a folder or fsspec
    URL; see utils/shards.py), ``cache`` (decoded pixels; see utils/pixel_cache.py), ``fashion_mnist``, ``synthetic``
    or ``hf:<name or path>``.
    ``encoded_jpeg``: a folder's (or shards') RGB JPEGs come back as :class:`EncodedJpeg`, to be decoded on the device.
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
        from .shards import TarShardDataset, find_index

        found = find_index(path_to_data, split, require_split) if path_to_data else None
        if found is None:
            raise DataError(f"no shards.json under --path_to_data {path_to_data}: pass a folder or URL of tar shards "
                            "written by make_shards.py (or index yours with make_shards.py --index_only URL)")
        return TarShardDataset(found, num_channels, encoded_jpeg, max_samples)
    elif dataset == "cache":
        from .pixel_cache import PixelCacheDataset, find_cache

        found = find_cache(path_to_data, split, require_split)
        if found is None:
            raise DataError(f"no cache.json under --path_to_data {path_to_data}: pass a local folder written by "
                            "make_pixel_cache.py")
        return PixelCacheDataset(found, num_channels, max_samples)
    elif dataset.startswith("hf:"):
        data = HubImageDataset(load_hub_split(dataset[3:], split, require_split=require_split), num_channels, image_column)
    else:
        raise DataError(f"unknown --dataset {dataset!r}: use fashion_mnist, synthetic, folder, shards, cache or hf:<name>")
    if max_samples is not None and max_samples < len(data):
        data = torch.utils.data.Subset(data, range(max_samples))
    return data


# --------------------------------------------------------------------------------------------- sampling
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
    """A StepSampler's epochs one after another in one iterator, from optimizer step ``first_step`` on.

    A loader over it never starts an epoch empty: its workers go on into the next epoch while the last steps of
    this one train and the epoch-end work (evaluation, pictures, checkpoint) runs. Epoch by epoch, each epoch would
    wait for one worker to make a whole micro-batch (about 2 s for 512 JPEGs decoded in a worker, against an
    estimated 40 s ImageNet epoch on 8 H100s). The batches are the same, in the same order (each key carries its
    epoch).
    Infinite: the training loop takes the micro-batches it needs. The sampler's ``epoch`` runs ahead of the training
    (the loader prefetches), so a checkpoint asks for the state at its step (:meth:`StepSampler.state_dict`).
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
    """Yields this process's micro-batches of ``(index, epoch)`` keys, in optimizer-step order.

    Each epoch is a permutation seeded by ``(seed, epoch)``, cut into global optimizer steps of
    ``per_process_batch * num_processes`` samples (an incomplete last step is dropped). Process ``rank``
    takes its slice of each step, split into ``accumulation_steps`` micro-batches. The samples of a step
    are thus the same for 1 process x 8 and 2 processes x 4, and ``start_step`` resumes mid-epoch
    without reading the skipped samples. Its state is nothing: the order is the same for any number of processes.
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
                yield [(int(i), self.epoch) for i in ids]


def dataset_classes(dataset) -> list[str]:
    """Class names of a dataset built by :func:`build_image_dataset` (through a Subset too); [] if unlabeled."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return list(getattr(dataset, "classes", []) or [])


class TensorSamples(Dataset):
    """Pre-computed inputs (e.g. cached encoder features) and labels, served like :class:`SeededSamples`."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor):
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key
        return {"pixel_values": self.inputs[index], "label": int(self.labels[index])}
