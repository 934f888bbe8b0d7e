"""JPEG decoding routes for the training loader, timed on the same files: each turns a batch of JPEGs into the
training crops (seeded random-resized-crop windows resized to --size, uint8, stacked on the device), timed over
--batches batches after one warm-up batch. Routes:

    pil               PIL decode + crop + resize on one CPU thread (a loader worker's rate: multiply by the workers)
    tv_cpu            torchvision.io.decode_jpeg on one CPU thread, crop + resize there
    tv_cuda_loop      torchvision decode on the GPU one image at a time, crops resized on the GPU
    tv_cuda_batched   torchvision decode on the GPU, one call per batch (nvJPEG's batched decode)
    tv_cuda_windows   the same decode, the crops then resized together (resized_windows: --decode device's bicubic)
    nvimgcodec        nvImageCodec's batched decode, every backend allowed (it picks; crops resized on the GPU)
    nvimgcodec_hw     the same on the GPU's hardware JPEG engines alone (A100, H100, H200)
    nvimgcodec_roi    every backend allowed, decoding only each crop's window (region-of-interest decode)
    nvimgcodec_cpu    nvImageCodec's CPU backend (libjpeg-turbo), crops resized on the CPU
    dali              --decode dali's pipeline on the GPU: each window decoded (hardware engines where the GPU has
                      them), resized (bicubic, antialiased) and flipped there
    dali_cpu          the same pipeline on the CPU (libjpeg-turbo, its own threads)

Rows give images/s and the host CPU time per image (what the decode takes from the loader's cores).

    python bench/benchmark_decode.py --make_jpegs 1024 --path_to_data /tmp/jpegs --output bench/results.jsonl
"""
from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.benchmark_pretrain import emit_rows, make_jpegs  # noqa: E402

ROUTES = ("pil", "tv_cpu", "tv_cuda_loop", "tv_cuda_batched", "tv_cuda_windows", "nvimgcodec", "nvimgcodec_hw",
          "nvimgcodec_roi", "nvimgcodec_cpu", "dali", "dali_cpu")
NVIMGCODEC_BACKENDS = {"nvimgcodec": None, "nvimgcodec_roi": None, "nvimgcodec_hw": "HW_GPU_ONLY",
                       "nvimgcodec_cpu": "CPU_ONLY"}


def crop_windows(sizes: list[tuple[int, int]], seed: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)) -> list[tuple]:
    """One random-resized-crop window (top, left, height, width) per image of (height, width), from a seeded
    generator, as torchvision's RandomResizedCrop.get_params draws them (ten tries, then the central crop)."""
    generator = torch.Generator().manual_seed(seed)
    windows = []
    for height, width in sizes:
        area = height * width
        for _ in range(10):
            target = area * torch.empty(1).uniform_(*scale, generator=generator).item()
            log_ratio = torch.empty(1).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator).item()
            aspect = math.exp(log_ratio)
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = torch.randint(0, height - h + 1, (1,), generator=generator).item()
                left = torch.randint(0, width - w + 1, (1,), generator=generator).item()
                windows.append((top, left, h, w))
                break
        else:
            side = min(height, width)
            windows.append(((height - side) // 2, (width - side) // 2, side, side))
    return windows


def resize_crops(images: list[torch.Tensor], windows: list[tuple], size: int, channels_last: bool) -> torch.Tensor:
    """Crop each (C, H, W) or (H, W, C) uint8 image to its window and resize to size x size (bilinear, antialiased as
    torchvision's transforms v2 do on tensors); a (B, 3, size, size) uint8 batch."""
    out = []
    for image, (top, left, h, w) in zip(images, windows):
        crop = image[top:top + h, left:left + w].permute(2, 0, 1) if channels_last else image[:, top:top + h, left:left + w]
        crop = F.interpolate(crop[None].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(crop.round_().clamp_(0, 255).to(torch.uint8)[0])
    return torch.stack(out)


def import_nvimgcodec():
    """nvidia.nvimgcodec, also where another install made ``nvidia`` a regular package that hides it."""
    from pipeline.dali_decode import import_nvidia

    return import_nvidia("nvimgcodec")


def as_tensor(image, device: torch.device) -> torch.Tensor:
    """An nvImageCodec image (H, W, C) as a tensor: on the GPU through its CUDA array interface, else through numpy."""
    if image is None:
        raise RuntimeError("the decoder returned no image for a file (a backend that can't decode it)")
    if device.type == "cuda":
        return torch.as_tensor(image, device=device)
    import numpy as np

    return torch.from_numpy(np.asarray(image.cpu()))


def make_missing_jpegs(folder: Path, count: int) -> None:
    if not (folder / "train" / "synthetic").is_dir() or len(list((folder / "train" / "synthetic").iterdir())) < count:
        make_jpegs(folder, count)


class Route:
    def __init__(self, name: str, device: torch.device, size: int, hw_decoder_load: float | None = None):
        self.name, self.device, self.size, self.dali, self.hw_decoder_load = name, device, size, None, hw_decoder_load
        if name.startswith("nvimgcodec"):
            nvimgcodec = import_nvimgcodec()
            self.codec = nvimgcodec
            kind = NVIMGCODEC_BACKENDS[name]
            backends = None if kind is None else [nvimgcodec.Backend(getattr(nvimgcodec.BackendKind, kind))]
            self.decoder = nvimgcodec.Decoder(device_id=device.index or 0, backends=backends)
            self.params = nvimgcodec.DecodeParams(color_spec=nvimgcodec.ColorSpec.SRGB, allow_any_depth=False)

    def __call__(self, encoded: list[bytes], sizes: list[tuple[int, int]], seed: int) -> torch.Tensor:
        windows = crop_windows(sizes, seed)
        if self.name.startswith("dali"):
            import numpy as np

            from pipeline.dali_decode import DaliCrops

            if self.dali is None:
                self.dali = DaliCrops(self.device if self.name == "dali" else torch.device("cpu"), self.size,
                                      len(encoded), self.hw_decoder_load)
            boxes = np.array([(*window, 0, self.size) for window in windows], dtype=np.int64)
            return self.dali([np.frombuffer(data, np.uint8) for data in encoded], boxes)
        if self.name == "pil":
            import io

            import numpy as np
            from PIL import Image

            out = []
            for data, (top, left, h, w) in zip(encoded, windows):
                image = Image.open(io.BytesIO(data)).convert("RGB")
                image = image.resize((self.size, self.size), Image.BILINEAR, box=(left, top, left + w, top + h))
                out.append(torch.from_numpy(np.array(image)).permute(2, 0, 1))
            return torch.stack(out)
        from torchvision.io import ImageReadMode, decode_jpeg

        tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in encoded]
        if self.name == "tv_cpu":
            images = [decode_jpeg(t, mode=ImageReadMode.RGB) for t in tensors]
            return resize_crops(images, windows, self.size, False)
        if self.name == "tv_cuda_loop":
            images = [decode_jpeg(t, mode=ImageReadMode.RGB, device=self.device) for t in tensors]
            return resize_crops(images, windows, self.size, False)
        if self.name == "tv_cuda_batched":
            images = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device)
            return resize_crops(images, windows, self.size, False)
        if self.name == "tv_cuda_windows":
            from pipeline.transforms import resized_windows

            images = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device)
            return resized_windows(images, [(*window, 0, self.size) for window in windows], self.size)
        stream = torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0
        if self.name != "nvimgcodec_roi":
            streams = [self.codec.CodeStream(data) for data in encoded]
            decoded = self.decoder.decode(streams, params=self.params, cuda_stream=stream)
            images = [as_tensor(image, self.device) for image in decoded]
            return resize_crops(images, windows, self.size, True)
        # nvimgcodec_roi: decode only each window
        streams = [self.codec.CodeStream(data).get_sub_code_stream(
            region=self.codec.Region(top, left, top + h, left + w)) for data, (top, left, h, w) in zip(encoded, windows)]
        decoded = self.decoder.decode(streams, params=self.params, cuda_stream=stream)
        images = [as_tensor(image, self.device) for image in decoded]
        return resize_crops(images, [(0, 0, h, w) for _, _, h, w in windows], self.size, True)


def time_route(route: Route, batches: list[tuple[list[bytes], list[tuple[int, int]]]], device: torch.device) -> dict:
    route(*batches[0], seed=0)  # warm-up: library handles, kernels, allocator
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    images = 0
    for index, (encoded, sizes) in enumerate(batches):
        out = route(encoded, sizes, seed=index + 1)
        images += out.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"images_per_sec": round(images / wall, 1), "cpu_ms_per_image": round(1000 * cpu / images, 3),
            "images": images}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path_to_data", default="/tmp/jpegs", help="Folder of .jpg files (searched recursively).")
    parser.add_argument("--make_jpegs", type=int, default=0, help="First write this many 500x375 quality-90 JPEGs there.")
    parser.add_argument("--routes", nargs="+", default=list(ROUTES), choices=ROUTES, help="Routes to time.")
    parser.add_argument("--batch_size", type=int, default=256, help="Images per batch.")
    parser.add_argument("--batches", type=int, default=4, help="Timed batches per route.")
    parser.add_argument("--size", type=int, default=224, help="Side of the training crops.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda.")
    parser.add_argument("--hw_decoder_load", type=float, nargs="+", default=[None], metavar="SHARE",
                        help="dali: the shares of JPEGs for the hardware decoder to time (default: DALI's own).")
    parser.add_argument("--output", default=None, help="Also append each row as a JSON line to this file.")
    args = parser.parse_args()

    torch.set_num_threads(1)  # the CPU routes run as one loader worker does
    device = torch.device(args.device)
    folder = Path(args.path_to_data)
    if args.make_jpegs:
        make_missing_jpegs(folder, args.make_jpegs)
    files = sorted(folder.rglob("*.jpg"))
    if not files:
        sys.exit(f"error: no .jpg files under {folder}: pass --path_to_data, or --make_jpegs N to write some")
    from PIL import Image

    needed = args.batch_size * (args.batches + 1)
    files = [files[i % len(files)] for i in range(needed)]
    encoded = [f.read_bytes() for f in files]
    sizes = []
    for f in files:
        with Image.open(f) as image:
            sizes.append((image.height, image.width))
    batches = [(encoded[i:i + args.batch_size], sizes[i:i + args.batch_size]) for i in range(0, needed, args.batch_size)]
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    runs = [(name, load) for name in args.routes for load in (args.hw_decoder_load if name == "dali" else [None])]
    for name, load in runs:
        if device.type != "cuda" and ("cuda" in name or name in ("nvimgcodec", "nvimgcodec_hw", "nvimgcodec_roi",
                                                                  "dali")):
            continue
        try:
            row = time_route(Route(name, device, args.size, load), batches, device)
        except Exception as error:  # a route the machine lacks (no nvImageCodec, no batched nvJPEG) is reported, not fatal
            print(f"{name}: not run ({type(error).__name__}: {str(error).splitlines()[0][:200]})")
            continue
        if load is not None:
            row["hw_decoder_load"] = load
        row = {"mode": "decode", "route": name, "batch_size": args.batch_size, "size": args.size,
               "mean_kb_per_file": round(sum(map(len, encoded)) / len(encoded) / 1024, 1), **row,
               "machine": machine, "torch": torch.__version__, "command": " ".join(sys.argv)}
        emit_rows([row], args.output)  # (row by row: a run cut short keeps what it measured)


if __name__ == "__main__":
    main()
