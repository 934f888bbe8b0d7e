"""Pretraining throughput on the current device: images/s, step time and peak memory for one preset.

Synthetic images live on the device, so this measures the model step (forward, backward, AdamW), not
the data pipeline. Example:

    python bench/benchmark_pretrain.py --model mae_vit_base_patch16 --batch_size 64 --precision bf16
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models import MAE_PRESETS, MaskedAutoencoder, mae_config  # noqa: E402
from utils.optim import build_adamw, param_groups_weight_decay  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mae_vit_tiny_patch4", choices=sorted(MAE_PRESETS), help="Preset to time.")
    parser.add_argument("--batch_size", type=int, default=128, help="Images per step.")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="Autocast dtype.")
    parser.add_argument("--steps", type=int, default=10, help="Timed steps (after the warm-up steps).")
    parser.add_argument("--warmup_steps", type=int, default=3, help="Untimed steps first.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda.")
    parser.add_argument("--norm_pix_loss", action="store_true", help="Time with the per-patch normalised target.")
    parser.add_argument("--output", default=None, help="Also append the result as a JSON line to this file.")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    config = mae_config(args.model, norm_pix_loss=args.norm_pix_loss)
    model = MaskedAutoencoder(**config).to(device)
    optimizer = build_adamw(param_groups_weight_decay(model, 0.05), 1e-4, device=device)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    images = torch.randn(args.batch_size, config["in_chans"], config["img_size"], config["img_size"], device=device)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = model(images).loss
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup_steps):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    elapsed = (time.perf_counter() - start) / args.steps
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:  # the process's peak resident memory (Linux reports KiB)
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result = {
        "model": args.model, "batch_size": args.batch_size, "precision": args.precision, "device": str(device),
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "images_per_sec": round(args.batch_size / elapsed, 1), "step_time_ms": round(elapsed * 1000, 1),
        "peak_memory_gib": round(peak, 2), "peak_memory_kind": "allocated" if device.type == "cuda" else "process RSS",
    }
    result["command"] = "python " + " ".join(sys.argv)
    print(json.dumps(result))
    if args.output:
        with open(args.output, "a") as handle:
            handle.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
