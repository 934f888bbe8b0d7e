"""JPEGs decoded by NVIDIA DALI (``--decode dali``): on a GPU its hardware JPEG engines (A100, H100, H200) or nvJPEG
decode only each training crop's window, then resize (bicubic, antialiased) and flip it there; on a machine without
a GPU the same pipeline runs on the CPU (libjpeg-turbo). The windows are the loader's own (drawn from each sample's
seeded draws), so the views are the default path's within one grey level and a resumed run gets the same samples.
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


def import_dali():
    """``nvidia.dali``, or a one-line error naming the package to install. Also found where another install made
    ``nvidia`` a regular package (an ``__init__.py``), which hides the namespace's other folders on ``sys.path``."""
    try:
        import nvidia.dali as dali
    except ImportError:
        try:
            import nvidia

            folders = [Path(entry or ".") / "nvidia" for entry in sys.path]
            nvidia.__path__ = list(nvidia.__path__) + [str(folder) for folder in folders if (folder / "dali").is_dir()]
            import nvidia.dali as dali
        except ImportError:
            raise UserError(f"--decode dali needs NVIDIA DALI, which is not installed: {INSTALL_HINT}") from None
    return dali


class DaliCrops:
    """A DALI pipeline for batches of up to ``max_batch`` JPEGs: bytes + (top, left, height, width, flip) windows in,
    uint8 (B, 3, size, size) views out, on ``device`` (a GPU, or the CPU). ``hw_decoder_load``: the share of the
    JPEGs for the GPU's hardware decoder (DALI's default where None), the rest decoded by nvJPEG's hybrid path."""

    def __init__(self, device: torch.device, size: int, max_batch: int, hw_decoder_load: float | None = None):
        dali = import_dali()
        from nvidia.dali import fn, types

        self.device, self.size, self.max_batch = device, size, max_batch
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
                                             normalized_shape=False, **load)
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
        if self.held is not None:
            self.held[1].synchronize()  # the last copy has run (it was queued before the step that followed it)
            self.held = None
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


_PIPELINES: dict = {}


def dali_crops(device: torch.device, size: int, batch_size: int) -> DaliCrops:
    """The process's pipeline for ``device`` and view ``size``, rebuilt larger when a bigger batch comes."""
    key = (str(device), size)
    if key not in _PIPELINES or _PIPELINES[key].max_batch < batch_size:
        _PIPELINES[key] = DaliCrops(device, size, batch_size)
    return _PIPELINES[key]


def decode_with_dali(batch: dict, device: torch.device) -> dict | None:
    """:func:`pipeline.device_decode.decode_deferred`'s batch, decoded and cropped by DALI: ``jpeg`` + ``crop``
    become ``pixel_values``. None (the batch untouched) when a JPEG in it does not decode: DALI fails the whole batch,
    and the caller's per-image decode finds and drops the bad one."""
    sizes, windows = batch["jpeg_sizes"].numpy(), batch["crop"].numpy()
    datas = np.split(batch["jpeg"].numpy(), np.cumsum(sizes)[:-1])
    size = int(windows[0, 5])
    try:
        views = dali_crops(device, size, len(datas))(datas, windows)
    except RuntimeError:
        _PIPELINES.pop((str(device), size), None)  # built afresh for the next batch, whatever state the error left
        logger.warning("DALI could not decode a JPEG of this batch: decoding the batch image by image")
        return None
    batch = {key: value for key, value in batch.items() if key not in ("jpeg", "jpeg_sizes", "crop")}
    batch["pixel_values"] = views
    return batch
