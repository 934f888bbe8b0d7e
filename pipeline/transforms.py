"""Seeded training and evaluation views: uint8 (C, H, W) in, uint8 (C, S, S) out, every random choice from an
explicit generator; normalisation happens on the device (:class:`Normalize`)."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from utils.errors import DataError, UserError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)


def channel_stats(num_channels: int, dataset: str | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation mean/std: the data set's own where known, ImageNet's for RGB, 0.5/0.5 otherwise."""
    if dataset == "fashion_mnist" and num_channels == 1:
        return FASHION_MNIST_MEAN, FASHION_MNIST_STD
    if dataset == "fashion_mnist":
        return FASHION_MNIST_MEAN * num_channels, FASHION_MNIST_STD * num_channels
    if num_channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (0.5,) * num_channels, (0.5,) * num_channels


class RandomResizedCropFlip:
    """MAE pretraining augmentation: RandomResizedCrop(scale, ratio 3/4-4/3, bicubic) + horizontal flip, the crop
    drawn as torchvision does (10 tries, then a centre crop) but from the generator given, so a function of the seed.
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


class TimmRandAugment:
    """timm's RandAugment from a policy string (``rand-m9-mstd0.5-inc1``: the MAE fine-tuning recipe's) on a uint8
    (C, H, W) image, with the global Python and NumPy RNGs that timm draws from seeded from the sample's generator
    (and put back after), so the view is a function of (seed, epoch, index)."""

    def __init__(self, policy: str, img_size: int, mean: Sequence[float]):
        from timm.data.auto_augment import rand_augment_transform
        from timm.data.transforms import str_to_pil_interp

        hparams = dict(translate_const=int(img_size * 0.45), img_mean=tuple(min(255, round(255 * m)) for m in mean),
                       interpolation=str_to_pil_interp("bicubic"))  # as timm's create_transform sets them
        self.op = rand_augment_transform(policy, hparams)

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        python_state, numpy_state = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            augmented = self.op(TF.to_pil_image(image))
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
        return TF.pil_to_tensor(augmented)


def timm_rand_augment(policy: str, img_size: int, mean: Sequence[float]) -> TimmRandAugment:
    """:class:`TimmRandAugment`, or a one-line error for a policy string timm cannot read."""
    if not policy.startswith("rand"):
        raise UserError(f"--auto_augment {policy}: only timm's RandAugment policies (rand-...) are supported, "
                        "e.g. rand-m9-mstd0.5-inc1")
    try:
        return TimmRandAugment(policy, img_size, mean)
    except (AssertionError, ValueError, KeyError, IndexError) as error:
        raise UserError(f"--auto_augment {policy}: timm cannot read this policy ({error or type(error).__name__}); "
                        "e.g. rand-m9-mstd0.5-inc1") from None


class ClassifierTrainTransform(RandomResizedCropFlip):
    """Fine-tuning augmentation: RandomResizedCrop + flip, then timm's RandAugment (``auto_augment``: a
    :class:`TimmRandAugment`) or torchvision's (``num_ops`` ops of ``magnitude``, under a forked global RNG seeded
    from the sample's generator), so the view is a function of (seed, epoch, index) whatever the process layout.
    """

    def __init__(self, img_size: int, min_scale: float = 0.08, randaug_magnitude: int = 0, randaug_ops: int = 2,
                 auto_augment: TimmRandAugment | None = None):
        super().__init__(img_size, scale=(min_scale, 1.0))
        self.randaug = v2.RandAugment(num_ops=randaug_ops, magnitude=randaug_magnitude) if randaug_magnitude > 0 else None
        self.auto_augment = auto_augment

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        image = super().__call__(image, generator)
        if self.auto_augment is not None:
            return self.auto_augment(image, generator)
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
        self.resize = img_size if crop_ratio >= 1.0 else math.floor(img_size / crop_ratio)  # as timm

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
    """PIL image or (H, W[, C]) array -> uint8 tensor (C, H, W) with ``num_channels`` channels: PIL converts
    grayscale, palette, RGBA and CMYK; a 1-channel image is repeated to fill more, an RGB one averaged down to one.
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
