"""Per-epoch test top-1 of fine-tuning runs, side by side: curve.png, curve.json and CURVE.md from each run's
metrics.jsonl and args.json, next to logistic regression on raw pixels.

    python experiments/finetune_curve.py --runs mae=runs/ft_mae scratch=runs/ft_scratch --pixels 84.23 --out DIR
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_curve(run: Path) -> list[dict]:
    """One row per evaluated epoch: epoch, test top-1, train loss."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{"epoch": row["epoch"], "top1": row["top1"], "train_loss": row.get("train_loss")}
            for row in rows if "top1" in row]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="NAME=RUN_FOLDER of finetune_classifier.py runs.")
    parser.add_argument("--pixels", type=float, default=None,
                        help="Logistic regression on raw pixels, top-1 (%%), drawn as a line.")
    parser.add_argument("--commands", nargs="*", default=[],
                        help="Commands that made the runs, written under the table (e.g. the pretraining's).")
    parser.add_argument("--machine", default=None, help="Where the runs were made, written under the table.")
    parser.add_argument("--out", required=True, help="Folder for curve.png, curve.json and CURVE.md.")
    args = parser.parse_args(argv)
    runs = dict(item.split("=", 1) for item in args.runs)
    curves = {name: read_curve(Path(folder)) for name, folder in runs.items()}
    settings = {name: json.loads((Path(folder) / "args.json").read_text()) for name, folder in runs.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "curve.json").write_text(json.dumps({"curves": curves, "pixels_top1": args.pixels}, indent=2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for name, rows in curves.items():
        axis.plot([r["epoch"] for r in rows], [r["top1"] for r in rows], marker="o", label=name)
    if args.pixels is not None:
        axis.axhline(args.pixels, color="grey", linestyle="--", label=f"logistic regression on pixels {args.pixels:.1f}%")
    axis.set_xlabel("epoch")
    axis.set_ylabel("test top-1 (%)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "curve.png", dpi=110)
    plt.close(figure)

    epochs = sorted({r["epoch"] for rows in curves.values() for r in rows})
    lines = ["| epoch | " + " | ".join(curves) + " |", "|---|" + "---|" * len(curves)]
    for epoch in epochs:
        cells = [next((f"{r['top1']:.2f}" for r in rows if r["epoch"] == epoch), "") for rows in curves.values()]
        lines.append(f"| {epoch:g} | " + " | ".join(cells) + " |")
    keys = ("epochs", "per_gpu_batch_size", "base_learning_rate", "layer_decay", "drop_path", "label_smoothing",
            "min_crop_scale", "mixed_precision", "from_scratch")
    text = ["# Fine-tuning curves", "", "Test top-1 (%) on the 10k test images after each epoch.", "", *lines, "",
            "![curve](curve.png)", "", "Settings:", "",
            *[f"- {name}: " + ", ".join(f"{k} {settings[name].get(k)}" for k in keys) for name in curves], "",
            *(["Commands:", "", *[f"- `{command}`" for command in args.commands], ""] if args.commands else []),
            *([f"Machine: {args.machine}", ""] if args.machine else [])]
    (out / "CURVE.md").write_text("\n".join(text))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
