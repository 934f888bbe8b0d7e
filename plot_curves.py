"""A run's curves as a picture: loss, learning rate and evaluation metrics against the step, from its metrics.jsonl.
Every run draws ``curves.png`` when it ends; this draws it for any run folder, finished or not.

    python plot_curves.py work_dir/mae_vit_tiny_patch4_fashion_mnist [--keys loss lr] [--out curves.png]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from utils.config import HelpFormatter
from utils.errors import UserError, run_cli
from utils.visualize import CURVES, save_curves


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("run", help="A run folder (with metrics.jsonl) or a metrics.jsonl file.")
    parser.add_argument("--keys", nargs="+", default=list(CURVES), help="Metrics to draw, one panel each.")
    parser.add_argument("--out", default=None, help="PNG to write (default: curves.png in the run folder).")
    args = parser.parse_args(argv)
    run = Path(args.run).expanduser()
    metrics = run if run.suffix == ".jsonl" else run / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{metrics} does not exist: pass a run folder (<working_directory>/<experiment_name>)")
    written = save_curves(metrics, Path(args.out) if args.out else metrics.parent / "curves.png", args.keys)
    if written is None:
        raise UserError(f"{metrics} has none of {', '.join(args.keys)}: pass --keys with metrics it logs")
    print(f"wrote {written}")


if __name__ == "__main__":
    run_cli(main)
