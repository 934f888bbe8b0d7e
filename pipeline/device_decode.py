"""JPEGs decoded on the training device (``--decode device``: nvJPEG on a GPU; ``--decode dali``: NVIDIA DALI),
then cropped there."""
from __future__ import annotations

import logging

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from .transforms import crop_view, resized_windows

logger = logging.getLogger(__name__)


def decodes_on_device(decode: str, device: torch.device) -> bool:
    """``--decode``: ``device`` or ``dali``, or ``auto`` on a GPU, leaves JPEGs encoded for :func:`decode_deferred`;
    ``dali`` fails here, in one line, where DALI is not installed."""
    if decode == "dali":
        from .dali_decode import import_dali

        import_dali()
    return decode in ("device", "dali") or (decode == "auto" and device.type == "cuda")


def fast_float64(device: torch.device) -> bool:
    """A GPU whose float64 matrix products run at full rate (A100, H100, H200, B200: compute capability 8.0, 9.0,
    10.0), where :func:`resized_windows` crops a decoded batch at once; consumer GPUs run float64 at 1/32-1/64."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) in ((8, 0), (9, 0), (10, 0))


def decode_deferred(batch: dict, device: torch.device, fence: str = "device", decode: str = "device") -> dict:
    """Decode a batch's JPEGs on ``device`` (nvJPEG on a GPU) and crop them there: ``jpeg`` (bytes end to end, cut by
    ``jpeg_sizes``) + ``crop`` become ``pixel_values``, uint8 (B, 3, S, S); an image that does not decode is dropped
    with its label and noise and counted in ``num_skipped``.
    ``fence`` (GPU): nvJPEG writes from its own stream into blocks the caching allocator may reuse while queued kernels
    still read them (pytorch/vision PR 9606), so ``device`` synchronises the whole device around the decode; ``stream``
    only the current stream, for :class:`pipeline.loading.DeviceBatches`, which decodes on a stream of its own.
    ``decode="dali"``: DALI decodes and crops the batch (:mod:`pipeline.dali_decode`), this function a batch DALI
    cannot decode."""
    if decode == "dali":
        from .dali_decode import decode_with_dali

        decoded = decode_with_dali(batch, device)
        if decoded is not None:
            return decoded
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
    kept = [(image, crop) for image, crop in zip(images, crops) if image is not None]
    if kept and fast_float64(device):  # a handful of batched products instead of ~6 kernels per image
        views = resized_windows([image for image, _ in kept], [crop for _, crop in kept], crops[0][5])
    elif kept:
        views = torch.stack([crop_view(image, crop) for image, crop in kept])
    if not all(keep):
        mask = torch.tensor(keep)
        batch = {k: v[mask] if isinstance(v, torch.Tensor) and v.ndim and len(v) == len(keep) else v
                 for k, v in batch.items()}
        batch["num_skipped"] = batch.get("num_skipped", 0) + keep.count(False)
    if kept:
        batch["pixel_values"] = views
    return batch
