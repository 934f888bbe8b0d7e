"""Seeded training and evaluation views: uint8 (C, H, W) in, uint8 (C, S, S) out, every random choice from the
sample's own draws (pipeline/draws.py); normalisation happens on the device (:class:`Normalize`)."""
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

from .draws import AUGMENT_SLOT, CROP_SLOT, FLIP_SLOT, SampleDraws

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
    drawn as torchvision draws it (10 tries, then a centre crop) but from the sample's own draws
    (:class:`pipeline.draws.SampleDraws`), so a function of (seed, epoch, index); one image at a time or a batch.
    """

    batched = True  # views() makes a whole batch's views at once (pipeline/resident.py)

    def __init__(self, img_size: int, scale: tuple[float, float] = (0.2, 1.0), ratio=(3 / 4, 4 / 3), flip: bool = True):
        self.size, self.scale, self.ratio, self.flip = img_size, scale, ratio, flip

    def crops(self, heights: torch.Tensor, widths: torch.Tensor, draws: SampleDraws) -> torch.Tensor:
        """(B, 6) int64 ``(top, left, height, width, flip, size)`` for images of the given sizes: the first of ten
        tries (area share from ``scale``, log-uniform aspect ratio) that fits, else the largest centred crop with an
        allowed aspect ratio; computed for the whole batch where the draws live (no host sync on a GPU)."""
        heights = heights.to(draws.keys.device, torch.float64)[:, None]
        widths = widths.to(draws.keys.device, torch.float64)[:, None]
        tries = draws.uniform(CROP_SLOT, 40).view(-1, 10, 4)
        (low, high), (log_low, log_high) = self.scale, (math.log(self.ratio[0]), math.log(self.ratio[1]))
        target = heights * widths * (low + tries[..., 0] * (high - low))
        aspect = torch.exp(log_low + tries[..., 1] * (log_high - log_low))
        crop_w, crop_h = torch.round(torch.sqrt(target * aspect)), torch.round(torch.sqrt(target / aspect))
        top = torch.floor(tries[..., 2] * (heights - crop_h + 1))
        left = torch.floor(tries[..., 3] * (widths - crop_w + 1))
        fits = (crop_w > 0) & (crop_w <= widths) & (crop_h > 0) & (crop_h <= heights)
        first = fits.to(torch.uint8).argmax(1, keepdim=True)  # the first try that fits
        drawn = [value.gather(1, first) for value in (top, left, crop_h, crop_w)]
        in_ratio = widths / heights  # none fits: the largest centred crop with an allowed aspect ratio
        centre_w = torch.where(in_ratio > self.ratio[1], torch.round(heights * self.ratio[1]), widths)
        centre_h = torch.where(in_ratio < self.ratio[0], torch.round(widths / self.ratio[0]), heights)
        centre = [torch.floor((heights - centre_h) / 2), torch.floor((widths - centre_w) / 2), centre_h, centre_w]
        box = [torch.where(fits.any(1, keepdim=True), a, b) for a, b in zip(drawn, centre)]
        flip = draws.uniform(FLIP_SLOT, 1) < 0.5 if self.flip else torch.zeros_like(box[0], dtype=torch.bool)
        return torch.cat([*box, flip.to(torch.float64), torch.full_like(box[0], self.size)], 1).to(torch.int64)

    def __call__(self, image: "torch.Tensor | EncodedJpeg", draws: SampleDraws) -> "torch.Tensor | DeferredCrop":
        return self.each([image], draws)[0]

    def each(self, images: list, draws: SampleDraws) -> list:
        """The views of a list of images of any sizes (row i of ``draws`` is image i's), their crops drawn together;
        for an :class:`EncodedJpeg`, the view's parameters, to be decoded and cropped on the device."""
        sizes = torch.tensor([(image.height, image.width) if isinstance(image, EncodedJpeg) else tuple(image.shape[-2:])
                              for image in images]).view(-1, 2)
        crops = self.crops(sizes[:, 0], sizes[:, 1], draws)
        return [DeferredCrop(image.data, crop) if isinstance(image, EncodedJpeg) else crop_view(image, crop.tolist())
                for image, crop in zip(images, crops)]

    def views(self, images: torch.Tensor, draws: SampleDraws) -> torch.Tensor:
        """A batch's views at once: uint8 (B, C, H, W) images of one size in, uint8 (B, C, S, S) out, where they are."""
        height, width = images.shape[-2:]
        sizes = [torch.full((len(images),), side, device=images.device) for side in (height, width)]
        return resized_crops(images, self.crops(*sizes, draws), self.size)


def crop_view(image: torch.Tensor, crop: Sequence[int]) -> torch.Tensor:
    """Cut ``crop = (top, left, height, width, flip, size)`` out of a (C, H, W) uint8 image, resize it to size x size
    (bicubic, antialiased, in float: torch's uint8 kernel rounds between its two passes) and flip it; one image,
    decoded on the CPU or on the device (``--decode device``), the same view as :func:`resized_crops` makes."""
    top, left, crop_h, crop_w, flip, size = crop
    view = TF.resize(image[..., top:top + crop_h, left:left + crop_w].float(), [size, size],
                     interpolation=InterpolationMode.BICUBIC, antialias=True)
    view = view.clamp_(0, 255).round_().to(torch.uint8)
    return view.flip(-1) if flip else view


def resize_weights(starts: torch.Tensor, lengths: torch.Tensor, full: int, size: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """(B, size, full): row i holds the weights with which output pixel i of resizing the window
    [start, start + length) of a line of ``full`` pixels to ``size`` pixels sums the input, as torch's antialiased
    bicubic resize weighs them (Keys' cubic with a = -0.5, widened by the scale when shrinking, each row normalised)."""
    device = starts.device
    length = lengths.to(torch.float64)[:, None, None]
    scale = length / size
    support, inverse = 2.0 * scale.clamp(min=1.0), 1.0 / scale.clamp(min=1.0)
    centre = scale * (torch.arange(size, device=device, dtype=torch.float64)[None, :, None] + 0.5)
    first = torch.floor(centre - support + 0.5).clamp(min=0)
    end = torch.minimum(torch.floor(centre + support + 0.5), length)
    position = torch.arange(full, device=device, dtype=torch.float64)[None, None, :] - \
        starts.to(torch.float64)[:, None, None]
    x, a = ((position - centre + 0.5) * inverse).abs(), -0.5
    weights = torch.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                          torch.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, torch.zeros_like(x)))
    weights = weights * ((position >= first) & (position < end))
    return (weights / weights.sum(-1, keepdim=True)).to(dtype)


def resized_crops(images: torch.Tensor, crops: torch.Tensor, size: int, dtype: torch.dtype | None = None,
                  chunk: int = 512) -> torch.Tensor:
    """:func:`crop_view` for a batch of same-size images at once, as two batched matrix products (rows, then
    columns): uint8 (B, C, H, W) and (B, 6) crops in, uint8 (B, C, size, size) out, equal to :func:`crop_view`'s up to
    float rounding at half a grey level. ``dtype``: float64 on a GPU (float32 products may run in TF32), else
    float32; made ``chunk`` images at a time, which bounds the memory and leaves every image's numbers unchanged."""
    dtype = dtype or (torch.float64 if images.is_cuda else torch.float32)
    views = []
    for start in range(0, len(images), chunk):
        part, box = images[start:start + chunk], crops[start:start + chunk]
        rows = resize_weights(box[:, 0], box[:, 2], images.shape[-2], size, dtype)
        cols = resize_weights(box[:, 1], box[:, 3], images.shape[-1], size, dtype)
        cols = torch.where(box[:, 4, None, None] > 0, cols.flip(1), cols)
        out = rows[:, None] @ part.to(dtype) @ cols.transpose(1, 2)[:, None]
        views.append(out.clamp_(0, 255).round_().to(torch.uint8))
    return torch.cat(views)


def resized_windows(images: list[torch.Tensor], crops: torch.Tensor, size: int, dtype: torch.dtype | None = None,
                    budget: int = 2**25) -> torch.Tensor:
    """:func:`resized_crops` for (C, H, W) images of any sizes: each window is cut out, windows of similar area are
    padded to a common size (the resize weights are zero outside a window, so the padding is never read) and resized
    a group of at most ``budget`` padded pixel values at a time (each takes 2 x 8 bytes in the float64 products);
    uint8 (B, C, size, size) in the crops' order."""
    crops = crops.tolist() if isinstance(crops, torch.Tensor) else crops
    windows = [image[:, top:top + height, left:left + width] for image, (top, left, height, width, *_) in
               zip(images, crops)]
    order = sorted(range(len(windows)), key=lambda i: -windows[i].shape[-2] * windows[i].shape[-1])
    views, start = [None] * len(windows), 0
    while start < len(order):
        end, height, width = start, 0, 0
        while end < len(order):  # grow the group while its padded pixels stay within the budget
            shape = windows[order[end]].shape
            grown = (end + 1 - start) * shape[0] * max(height, shape[-2]) * max(width, shape[-1])
            if end > start and grown > budget:
                break
            height, width, end = max(height, shape[-2]), max(width, shape[-1]), end + 1
        group = order[start:end]
        padded = windows[group[0]].new_zeros((len(group), windows[group[0]].shape[0], height, width))
        for slot, index in enumerate(group):
            padded[slot, :, :windows[index].shape[-2], :windows[index].shape[-1]] = windows[index]
        boxes = torch.tensor([[0, 0, *windows[i].shape[-2:], crops[i][4], size] for i in group], device=padded.device)
        for slot, view in zip(group, resized_crops(padded, boxes, size, dtype)):
            views[slot] = view
        start = end
    return torch.stack(views)


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
    (C, H, W) image, with the global Python and NumPy RNGs that timm draws from seeded from the sample's draws
    (and put back after), so the view is a function of (seed, epoch, index)."""

    def __init__(self, policy: str, img_size: int, mean: Sequence[float]):
        from timm.data import auto_augment as timm_auto_augment
        from timm.data.auto_augment import rand_augment_transform
        from timm.data.transforms import str_to_pil_interp

        hparams = dict(translate_const=int(img_size * 0.45), img_mean=tuple(min(255, round(255 * m)) for m in mean),
                       interpolation=str_to_pil_interp("bicubic"))  # as timm's create_transform sets them
        self.op = rand_augment_transform(policy, hparams)
        for op in self.op.ops:
            if op.aug_fn is timm_auto_augment.posterize:
                op.aug_fn = posterize_to_any_bits

    def __call__(self, image: torch.Tensor, draws: SampleDraws) -> torch.Tensor:
        seed = draws.seed(AUGMENT_SLOT)
        python_state, numpy_state = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            augmented = self.op(TF.to_pil_image(image))
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
        return TF.pil_to_tensor(augmented)


def posterize_to_any_bits(image: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize, where keeping 0 bits gives black as older Pillow did (Pillow 13 refuses 0 bits; the increasing
    posterize of ``inc1`` policies, the MAE recipe's, reaches 0 bits at magnitude 10)."""
    from timm.data import auto_augment as timm_auto_augment

    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return timm_auto_augment.posterize(image, bits_to_keep, **kwargs)


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
    from the sample's draws), so the view is a function of (seed, epoch, index) whatever the process layout.
    """

    def __init__(self, img_size: int, min_scale: float = 0.08, randaug_magnitude: int = 0, randaug_ops: int = 2,
                 auto_augment: TimmRandAugment | None = None):
        super().__init__(img_size, scale=(min_scale, 1.0))
        self.randaug = v2.RandAugment(num_ops=randaug_ops, magnitude=randaug_magnitude) if randaug_magnitude > 0 else None
        self.auto_augment = auto_augment
        self.batched = self.randaug is None and auto_augment is None  # per-image augmentation: no batched views

    def each(self, images: list, draws: SampleDraws) -> list:
        return [self.augment(view, draws.row(i)) for i, view in enumerate(super().each(images, draws))]

    def augment(self, image: torch.Tensor, draws: SampleDraws) -> torch.Tensor:
        if self.auto_augment is not None:
            return self.auto_augment(image, draws)
        if self.randaug is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(draws.seed(AUGMENT_SLOT))
                image = self.randaug(image)
        return image


class ResizeCenterCrop:
    """Deterministic evaluation view: resize the short side to img_size / crop_ratio, centre-crop img_size.
    Images already at ``img_size`` (e.g. Fashion-MNIST at 28) come out unchanged."""

    def __init__(self, img_size: int, crop_ratio: float = 0.875):
        self.size = img_size
        self.resize = img_size if crop_ratio >= 1.0 else math.floor(img_size / crop_ratio)  # as timm

    def __call__(self, image: torch.Tensor, draws: SampleDraws | None = None) -> torch.Tensor:
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
