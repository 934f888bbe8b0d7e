"""What --compile's regions add over compiling the blocks alone: this project's MAE trained eager, with its blocks
compiled, with the blocks and the regions between them compiled (what --compile does), and compiled whole, in
alternating rounds in one process (synthetic images, fused AdamW).

    python bench/compile_scope.py --model mae_vit_tiny_patch4 --batch_size 128
    python bench/compile_scope.py --model mae_vit_base_patch16 --batch_size 256 --precision bf16   # a GPU
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models import MaskedAutoencoder, mae_config  # noqa: E402
from utils.optim import build_adamw  # noqa: E402
from utils.training import apply_speed_options  # noqa: E402

SCOPES = ("eager", "blocks", "regions", "whole")


def build(scope: str, config: dict, device: torch.device):
    torch.manual_seed(0)
    model = MaskedAutoencoder(**config).to(device)
    if scope in ("blocks", "regions"):
        apply_speed_options(model, argparse.Namespace(compile=True, gradient_checkpointing=False))
        model.compile_regions = scope == "regions"
    elif scope == "whole":
        model.compile()
    return model, build_adamw(model.parameters(), 1e-4, device=device)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mae_vit_tiny_patch4", help="An MAE preset.")
    parser.add_argument("--batch_size", type=int, default=128, help="Images per step.")
    parser.add_argument("--steps", type=int, default=10, help="Timed steps per round.")
    parser.add_argument("--rounds", type=int, default=6, help="Alternating rounds; the median is reported.")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="Autocast dtype.")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = mae_config(args.model)
    images = torch.randn(args.batch_size, config["in_chans"], config["img_size"], config["img_size"], device=device)
    noise = torch.rand(args.batch_size, (config["img_size"] // config["patch_size"]) ** 2, device=device)
    runs = {scope: build(scope, config, device) for scope in SCOPES}

    def step(model, optimizer) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = model(images, noise=noise).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for model, optimizer in runs.values():  # (compilation)
        for _ in range(3):
            step(model, optimizer)
    rates = {scope: [] for scope in SCOPES}
    for _ in range(args.rounds):
        for scope, (model, optimizer) in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.steps):
                step(model, optimizer)
            if device.type == "cuda":
                torch.cuda.synchronize()
            rates[scope].append(args.batch_size * args.steps / (time.perf_counter() - start))
    for scope in SCOPES:
        print(f"{scope:8s} median {statistics.median(rates[scope]):8.1f} images/s   rounds: "
              + " ".join(f"{rate:.1f}" for rate in rates[scope]))


if __name__ == "__main__":
    main()
