"""On a GPU: the draws, crops and views a set held on the device makes equal the loader path's on the CPU.

    python bench/check_resident.py --output results.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.draws import SampleDraws  # noqa: E402
from pipeline.resident import ResidentBatches, hold_on_device  # noqa: E402
from pipeline.samples import SeededSamples, collate_skipping_bad  # noqa: E402
from pipeline.sampling import EpochChain, StepBatchSampler  # noqa: E402
from pipeline.sources import SyntheticDataset  # noqa: E402
from pipeline.transforms import RandomResizedCropFlip  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="The device to compare with the CPU.")
    parser.add_argument("--output", default=None, help="Also append the row as a JSON line to this file.")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    indices = torch.arange(100_000)
    cpu_bits = SampleDraws.of(3, indices % 7, indices).bits(0, 113)
    device_bits = SampleDraws.of(3, (indices % 7).to(device), indices.to(device)).bits(0, 113).cpu()
    base = SyntheticDataset(2048, 3, 40)
    samples = SeededSamples(base, RandomResizedCropFlip(32, scale=(0.08, 1.0)), seed=3, num_patches=64)
    images, labels = hold_on_device(base, device)
    batches = iter(ResidentBatches(images, labels, samples, EpochChain(StepBatchSampler(len(base), 512, 1, seed=3))))
    keys_of = iter(EpochChain(StepBatchSampler(len(base), 512, 1, seed=3)))
    worst, equal, same_draws = 0, [], True
    for _ in range(8):  # two epochs
        batch, expected = next(batches), collate_skipping_bad(samples.__getitems__(next(keys_of)))
        same_draws &= torch.equal(batch["noise"].cpu(), expected["noise"]) and \
            torch.equal(batch["label"].cpu(), expected["label"])
        difference = (batch["pixel_values"].cpu().int() - expected["pixel_values"].int()).abs()
        worst = max(worst, int(difference.max()))
        equal.append((difference == 0).float().mean().item())
    row = {"check": "data held on the device vs the loader path", "device_name": torch.cuda.get_device_name(device)
           if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "draw_bits_equal": bool(torch.equal(cpu_bits, device_bits)), "noise_and_labels_equal": bool(same_draws),
           "pixels_max_abs_diff": worst, "pixels_equal_share": round(min(equal), 6)}
    print(json.dumps(row))
    if args.output:
        with open(args.output, "a") as file:
            file.write(json.dumps(row) + "\n")
    return row


if __name__ == "__main__":
    main()
