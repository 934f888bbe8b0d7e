"""Scaled dot-product attention backends on the MAE's shapes: forward + backward time per call of each backend
PyTorch offers (flash, cuDNN, memory-efficient, math), for the encoder (cls + visible patches) and the decoder (cls +
every patch) of a preset, and that backend's share of the model step if it were used for every block.

    python bench/benchmark_attention.py --model mae_vit_base_patch16 --batch_size 256 --precision bf16
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.benchmark_pretrain import emit_rows  # noqa: E402
from models import mae_config  # noqa: E402
from models.mae import visible_count  # noqa: E402

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def time_backend(backend, q, k, v, steps: int) -> float:
    """Seconds per forward + backward call, or raises where the backend can't run these inputs."""
    grad = torch.randn_like(q)
    with sdpa_kernel([backend]):
        for _ in range(3):
            F.scaled_dot_product_attention(q, k, v).backward(grad)
        if q.is_cuda:
            torch.cuda.synchronize(q.device)
        start = time.perf_counter()
        for _ in range(steps):
            F.scaled_dot_product_attention(q, k, v).backward(grad)
        if q.is_cuda:
            torch.cuda.synchronize(q.device)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mae_vit_base_patch16", help="MAE preset whose shapes to use.")
    parser.add_argument("--batch_size", type=int, default=256, help="Images per call.")
    parser.add_argument("--mask_ratio", type=float, default=0.75, help="Share of patches hidden from the encoder.")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"], help="Dtype of q, k, v.")
    parser.add_argument("--steps", type=int, default=20, help="Timed calls per backend.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda.")
    parser.add_argument("--output", default=None, help="Also append each row as a JSON line to this file.")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision]
    config = mae_config(args.model)
    patches = (config["img_size"] // config["patch_size"]) ** 2
    parts = {"encoder": (1 + visible_count(patches, args.mask_ratio), config["embed_dim"], config["num_heads"],
                         config["depth"]),
             "decoder": (1 + patches, config["decoder_embed_dim"], config["decoder_num_heads"], config["decoder_depth"])}
    for part, (tokens, dim, heads, depth) in parts.items():
        shape = (args.batch_size, heads, tokens, dim // heads)
        q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        for name, backend in BACKENDS.items():
            try:
                seconds = time_backend(backend, q, k, v, args.steps)
            except RuntimeError as error:
                print(f"{part} {name}: not run ({str(error).splitlines()[0][:160]})")
                continue
            row = {"mode": "attention", "model": args.model, "part": part, "backend": name, "shape": list(shape),
                   "precision": args.precision, "ms_per_call": round(seconds * 1000, 3),
                   "ms_per_step_all_blocks": round(seconds * 1000 * depth, 2),
                   "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   "torch": torch.__version__, "command": " ".join(sys.argv)}
            emit_rows([row], args.output)  # (row by row: a run cut short keeps what it measured)


if __name__ == "__main__":
    main()
