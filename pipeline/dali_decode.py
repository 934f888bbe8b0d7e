"""JPEGs decoded by NVIDIA DALI (``--decode dali``): on a GPU its hardware JPEG decoder (A100, H100, H200: a share of
the images) and nvJPEG decode only each training crop's window, then resize (bicubic, antialiased) and flip it
there; on a machine without a GPU the same pipeline runs on the CPU (libjpeg-turbo). The windows are the loader's
own (drawn from each sample's seeded draws), so the views are the default path's within two grey levels and a
resumed run gets the same samples. EXIF orientation is ignored, as torchvision's decode_jpeg ignores it.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch

from utils.errors import UserError

logger = logging.getLogger(__name__)

INSTALL_HINT = ("pip install nvidia-dali-cuda130 (CUDA 13 builds of torch; nvidia-dali-cuda120 for CUDA 12), or use "
                "--decode device")


def import_nvidia(name: str):
    """``nvidia.<name>`` (dali, nvimgcodec), also where another install made ``nvidia`` a regular package (an
    ``__init__.py``), which hides the namespace's other folders on ``sys.path``."""
    import importlib

    try:
        return importlib.import_module(f"nvidia.{name}")
    except ImportError:
        import nvidia

        folders = [Path(entry or ".") / "nvidia" for entry in sys.path]
        nvidia.__path__ = list(nvidia.__path__) + [str(folder) for folder in folders if (folder / name).is_dir()]
        return importlib.import_module(f"nvidia.{name}")


def import_dali():
    """``nvidia.dali``, or a one-line error naming the package to install."""
    try:
        return import_nvidia("dali")
    except ImportError as error:
        problem = "is not installed" if isinstance(error, ModuleNotFoundError) else \
            f"does not import ({str(error).splitlines()[0]})"
        raise UserError(f"--decode dali needs NVIDIA DALI, which {problem}: {INSTALL_HINT}") from None


class DaliCrops:
    """A DALI pipeline for batches of up to ``max_batch`` JPEGs: bytes + (top, left, height, width, flip) windows in,
    uint8 (B, 3, size, size) views out, on ``device`` (a GPU, or the CPU). ``hw_decoder_load``: the share of the
    JPEGs for the GPU's hardware decoder (DALI's default where None), the rest decoded by nvJPEG's hybrid path."""

    def __init__(self, device: torch.device, size: int, max_batch: int, hw_decoder_load: float | None = None):
        dali = import_dali()
        from nvidia.dali import fn, types

        self.device, self.max_batch = device, max_batch
        on_gpu = device.type == "cuda"
        threads = max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()))

        @dali.pipeline_def(batch_size=max_batch, num_threads=threads, prefetch_queue_depth=1, exec_dynamic=True,
                           device_id=(device.index if device.index is not None else torch.cuda.current_device())
                           if on_gpu else None)
        def crops():
            jpegs = fn.external_source(name="jpegs", dtype=types.UINT8)
            anchors = fn.external_source(name="anchors", dtype=types.INT64)  # (top, left)
            shapes = fn.external_source(name="shapes", dtype=types.INT64)  # (height, width)
            flips = fn.external_source(name="flips", dtype=types.INT32)
            load = {"hw_decoder_load": hw_decoder_load} if on_gpu and hw_decoder_load is not None else {}
            images = fn.decoders.image_slice(jpegs, anchors, shapes, device="mixed" if on_gpu else "cpu",
                                             output_type=types.RGB, axis_names="HW", normalized_anchor=False,
                                             normalized_shape=False, adjust_orientation=False, **load)
            images = fn.resize(images, size=[size, size], interp_type=types.INTERP_CUBIC, antialias=True,
                               dtype=types.FLOAT)  # in float, rounded once below, as crop_view does
            return fn.crop_mirror_normalize(images, mirror=flips, output_layout="CHW", dtype=types.UINT8)

        self.pipeline = crops()
        self.pipeline.build()
        self.held = None  # (GPU) the last outputs and the event of their copy: DALI may reuse them once let go

    def __call__(self, datas: list[np.ndarray], windows: np.ndarray) -> torch.Tensor:
        """``datas``: each JPEG's bytes; ``windows``: int64 (B, >= 5) rows of (top, left, height, width, flip)."""
        self.pipeline.feed_input("jpegs", datas)
        self.pipeline.feed_input("anchors", list(np.ascontiguousarray(windows[:, 0:2])))
        self.pipeline.feed_input("shapes", list(np.ascontiguousarray(windows[:, 2:4])))
        self.pipeline.feed_input("flips", list(windows[:, 4].astype(np.int32)))
        self.close()  # the last copy has run (it was queued before the step that followed it)
        views, = self.pipeline.run()
        if self.device.type != "cuda":
            return torch.from_numpy(views.as_array())
        from nvidia.dali.plugin.pytorch import feed_ndarray

        # the copy runs on the caller's stream, the one the allocator gave `out` to, so no kernel still queued there
        # reads the block while DALI writes it
        dense, stream = views.as_tensor(), torch.cuda.current_stream(self.device)
        out = torch.empty(dense.shape(), dtype=torch.uint8, device=self.device)
        feed_ndarray(dense, out, cuda_stream=stream)
        copied = torch.cuda.Event()
        copied.record(stream)
        self.held = (views, copied)
        return out

    def close(self) -> None:
        """Wait for the last copy out of DALI's buffers, before the pipeline (and its memory pool) is let go."""
        if self.held is not None:
            self.held[1].synchronize()
            self.held = None


_PIPELINES: dict = {}
_FAILURES = {"in_a_row": 0, "given_up": False}
GIVE_UP_AFTER = 10  # batches failed in a row: DALI itself (memory, a library), not a bad JPEG; decode_jpeg takes over


def dali_crops(device: torch.device, size: int, batch_size: int) -> DaliCrops:
    """The process's pipeline for ``device`` and view ``size``, rebuilt larger when a bigger batch comes; a pipeline
    that cannot be built is a one-line error."""
    key = (str(device), size)
    if key not in _PIPELINES or _PIPELINES[key].max_batch < batch_size:
        drop_pipeline(key)
        try:
            _PIPELINES[key] = DaliCrops(device, size, batch_size)
        except RuntimeError as error:
            raise UserError(f"--decode dali: DALI cannot build its pipeline on {device} "
                            f"({str(error).strip().splitlines()[-1]}): use --decode device") from None
    return _PIPELINES[key]


def drop_pipeline(key: tuple) -> None:
    if key in _PIPELINES:
        _PIPELINES.pop(key).close()


def decode_with_dali(batch: dict, device: torch.device) -> dict | None:
    """:func:`pipeline.device_decode.decode_deferred`'s batch, decoded and cropped by DALI: ``jpeg`` + ``crop``
    become ``pixel_values``. None (the batch untouched) when a JPEG in it does not decode: DALI fails the whole batch,
    and the caller's per-image decode finds and drops the bad one."""
    if _FAILURES["given_up"]:
        return None
    sizes, windows = batch["jpeg_sizes"].numpy(), batch["crop"].numpy()
    datas = np.split(batch["jpeg"].numpy(), np.cumsum(sizes)[:-1])
    size = int(windows[0, 5])
    pipeline = dali_crops(device, size, len(datas))
    try:
        views = pipeline(datas, windows)
    except RuntimeError as error:
        drop_pipeline((str(device), size))  # built afresh for the next batch, whatever state the error left
        _FAILURES["in_a_row"] += 1
        if _FAILURES["in_a_row"] >= GIVE_UP_AFTER:
            _FAILURES["given_up"] = True
            logger.warning("DALI failed %d batches in a row (last: %s): decode_jpeg decodes from here on",
                           GIVE_UP_AFTER, str(error).strip().splitlines()[-1])
        else:
            logger.warning("DALI could not decode a JPEG of this batch: decoding the batch image by image")
        return None
    _FAILURES["in_a_row"] = 0
    batch = {key: value for key, value in batch.items() if key not in ("jpeg", "jpeg_sizes", "crop")}
    batch["pixel_values"] = views
    return batch
