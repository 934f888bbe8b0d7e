"""The ablation runs' report: results.json, RESULTS.md (table, per-claim verdicts) and plots, generated from the run
folders that experiments/run_ablations.py fills; and the logistic-regression baseline on raw pixels.

    python experiments/ablation_report.py logreg --out DIR                           # the pixel baseline, a stage
    python experiments/ablation_report.py featprobe --weights RUN/final --out DIR    # the feature probe, a stage
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

METRICS = {  # results.json key: (table heading, higher is better)
    "linear_probe_top1": ("linear probe top-1 (%)", True),
    "feature_probe_top1": ("LR feature probe top-1 (%)", True),
    "finetune_top1": ("fine-tune top-1 (%)", True),
    "masked_psnr": ("masked PSNR (dB)", True),
    "hf_error": ("HF error", False),
    "pretrain_minutes": ("pretraining (min)", False),
}
PIXELS = "logistic_regression"  # the pixel baseline's one number is its feature_probe_top1: the same probe on pixels


def on_both_probes(claim: str, winner: str, loser: str, *margin) -> list[tuple]:
    """A feature-quality claim, judged by the official BN + linear probe and by the logistic-regression probe."""
    return [(claim, winner, loser, "linear_probe_top1", *margin),
            (f"{claim}, LR probe", winner, loser, "feature_probe_top1", *margin)]


# The claims: (claim, variant that should win, variant it should beat, metric[, claimed minimum gain[, the loser's
# metric where it differs]]).
CLAIMS = [
    ("MAE pretraining beats training from scratch (MAE paper)", "mae", "scratch", "finetune_top1"),
    *on_both_probes("MAE features beat a random encoder's", "mae", "random_probe"),
    ("MAE features beat raw pixels (LR probe)", "mae", PIXELS, "feature_probe_top1"),
    ("fine-tuned MAE beats logistic regression on pixels", "mae", PIXELS, "finetune_top1", 0.0, "feature_probe_top1"),
    ("fine-tuned improved MAE beats logistic regression on pixels", "improved", PIXELS, "finetune_top1", 0.0,
     "feature_probe_top1"),
    ("the ViT from scratch beats logistic regression on pixels", "scratch", PIXELS, "finetune_top1", 0.0,
     "feature_probe_top1"),
    *on_both_probes("mask ratio 0.75 beats 0.5 (MAE paper)", "mae", "ratio_0.5"),
    ("mask ratio 0.75 beats 0.5, fine-tuned", "mae", "ratio_0.5", "finetune_top1"),
    *on_both_probes("mask ratio 0.75 beats 0.9", "mae", "ratio_0.9"),
    ("mask ratio 0.75 beats 0.9, fine-tuned", "mae", "ratio_0.9", "finetune_top1"),
    *on_both_probes("random masking beats block masking (paper)", "mae", "block"),
    ("random masking beats block masking, fine-tuned", "mae", "block", "finetune_top1"),
    *on_both_probes("random masking beats grid masking (paper)", "mae", "grid"),
    ("random masking beats grid masking, fine-tuned", "mae", "grid", "finetune_top1"),
    *on_both_probes("bottom-PCA targets beat pixel targets (Balestriero & LeCun)", "pca_bottom", "mae"),
    ("bottom-PCA targets beat pixel targets, fine-tuned", "pca_bottom", "mae", "finetune_top1"),
    *on_both_probes("bottom-PCA targets beat top-PCA targets (Balestriero & LeCun)", "pca_bottom", "pca_top"),
    *on_both_probes("norm_pix_loss gives better features (paper)", "mae", "mae_raw_pixels"),
    *on_both_probes("improved recipe beats the original by > 5 points", "improved", "mae", 5.0),
    ("improved recipe beats the original by > 5 points, fine-tuned", "improved", "mae", "finetune_top1", 5.0),
    *on_both_probes("curriculum masking alone helps (improved-MAE recipe)", "curriculum", "mae"),
    *on_both_probes("HF loss alone helps (improved-MAE recipe)", "hf_loss", "mae"),
    *on_both_probes("uniformity regulariser alone helps (improved-MAE recipe)", "uniformity", "mae"),
    ("HF loss lowers the high-frequency error (improved-MAE recipe)", "hf_loss", "mae", "hf_error"),
]
BASELINES = {
    "logistic_regression": "baseline: logistic regression on raw pixels",
    "random_probe": "baseline: the probes of a randomly initialised encoder",
    "scratch": "baseline: the same ViT fine-tuned from scratch",
}


# ------------------------------------------------------------------------------------------- probes
def fit_logistic_regression(train_x, train_y, test_x, test_y, weight_decay: float = 1e-4) -> dict:
    """Multinomial logistic regression on standardised inputs (N, D), full-batch L-BFGS (no sklearn needed), on the
    GPU where there is one."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train_x, test_x = train_x.to(device, torch.float64), test_x.to(device, torch.float64)
    train_y, test_y = train_y.to(device), test_y.to(device)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-3
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    linear = torch.nn.Linear(train_x.shape[1], int(train_y.max()) + 1).to(device, torch.float64)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(linear.parameters(), lr=1, max_iter=500, history_size=20,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(train_x), train_y)
        loss = loss + weight_decay / 2 * linear.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        top1 = (linear(test_x).argmax(1) == test_y).double().mean().item() * 100
        train_top1 = (linear(train_x).argmax(1) == train_y).double().mean().item() * 100
    return {"top1": top1, "train_top1": train_top1, "train_samples": len(train_x), "val_samples": len(test_x),
            "weight_decay": weight_decay}


def fashion_mnist_split(name: str, limit: int):
    """uint8 images (N, 1, 28, 28) and int64 labels of the first ``limit`` images of a split (0: all)."""
    import torch

    from pipeline.sources import load_fashion_mnist

    images, labels = load_fashion_mnist(name)
    limit = limit or len(images)
    return torch.from_numpy(images[:limit]).unsqueeze(1), torch.from_numpy(labels[:limit].astype("int64"))


def logistic_regression(max_samples: int, max_val_samples: int, weight_decay: float = 1e-4) -> dict:
    """The pixel baseline: logistic regression on the raw pixels."""
    (train_x, train_y), (test_x, test_y) = (fashion_mnist_split("train", max_samples),
                                            fashion_mnist_split("test", max_val_samples))
    return fit_logistic_regression(train_x.flatten(1), train_y, test_x.flatten(1), test_y, weight_decay)


def encoder_features(encoder, images, batch_size: int = 1000):
    """Frozen-encoder features of uint8 images: the cls token beside the mean patch token, both after the final
    norm (N, 2D); on the GPU where there is one, in bf16 autocast where the hardware computes bf16 natively."""
    import torch

    from engine.setup import bf16_is_native
    from pipeline.transforms import FASHION_MNIST_MEAN, FASHION_MNIST_STD, Normalize

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    normalize = Normalize(FASHION_MNIST_MEAN, FASHION_MNIST_STD).to(device)
    encoder = encoder.to(device).eval()
    bf16 = bf16_is_native()
    features = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for start in range(0, len(images), batch_size):
            tokens = encoder.forward_features(normalize(images[start:start + batch_size].to(device)))
            features.append(torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=1).float())
    return torch.cat(features).cpu()


def feature_probe(weights: str | None, seed: int, max_samples: int, max_val_samples: int,
                  weight_decay: float = 1e-4) -> dict:
    """Logistic regression on a frozen encoder's cls + mean-patch features: the MAE's in ``weights`` (a pretraining
    run's final/ folder), or a randomly initialised tiny MAE encoder drawn from ``seed`` when ``weights`` is None."""
    import torch

    from models import MaskedAutoencoder, mae_config

    if weights:
        encoder = MaskedAutoencoder.from_pretrained(weights).encoder
    else:
        torch.manual_seed(seed)
        encoder = MaskedAutoencoder(**mae_config("mae_vit_tiny_patch4")).encoder
    (train_x, train_y), (test_x, test_y) = (fashion_mnist_split("train", max_samples),
                                            fashion_mnist_split("test", max_val_samples))
    result = fit_logistic_regression(encoder_features(encoder, train_x), train_y, encoder_features(encoder, test_x),
                                     test_y, weight_decay)
    return {**result, "weights": weights, "features": "cls token and mean patch token, standardised"}


# ------------------------------------------------------------------------------------------- collecting
def wall_clock_minutes(stages) -> float:
    """From the first stage's start to the last one's end (stages of several invocations count from the first)."""
    import datetime

    spans = [(datetime.datetime.fromisoformat(row["finished"]).timestamp() - row["seconds"],
              datetime.datetime.fromisoformat(row["finished"]).timestamp()) for row in stages if "finished" in row]
    return (max(end for _, end in spans) - min(start for start, _ in spans)) / 60 if spans else 0.0


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def collect(out: Path, chosen) -> tuple[list[dict], dict]:
    """One record per (variant, seed) and per baseline run; the pretraining curves per variant and seed."""
    stages = {row["stage"]: row for row in read_jsonl(out / "stages.jsonl")}  # the latest record per stage
    compare = read_json(out / "compare" / "metrics.json") or {"models": {}}
    by_model = {Path(path).resolve(): metrics for path, metrics in compare["models"].items()}
    records, curves = [], {}
    for variant in chosen:
        for seed_dir in sorted((out / variant.name).glob("seed*")):
            seed = int(seed_dir.name[4:])
            probe = read_json(seed_dir / "linear_probe" / "results.json") or {}
            features = read_json(seed_dir / "feature_probe" / "results.json") or {}
            finetune = read_json(seed_dir / "finetune" / "results.json") or {}
            recon = by_model.get((seed_dir / "pretrain" / "final").resolve(), {})
            pretrain = stages.get(f"{variant.name}/seed{seed}/pretrain", {})
            records.append({"variant": variant.name, "seed": seed, "description": variant.description,
                            "mask_ratio": variant.mask_ratio,
                            "linear_probe_top1": probe.get("top1"), "feature_probe_top1": features.get("top1"),
                            "finetune_top1": finetune.get("top1"),
                            "masked_psnr": recon.get("val_psnr_masked"), "hf_error": recon.get("val_hf_error"),
                            "pretrain_minutes": round(pretrain["seconds"] / 60, 2) if pretrain else None})
            curves[(variant.name, seed)] = read_jsonl(seed_dir / "pretrain" / "metrics.jsonl")
    baselines = out / "baselines"
    logreg = read_json(baselines / "logistic_regression" / "results.json")
    if logreg:
        records.append({"variant": PIXELS, "seed": 0, "description": BASELINES[PIXELS],
                        "feature_probe_top1": logreg["top1"]})
    for seed_dir in sorted(baselines.glob("seed*")):
        seed = int(seed_dir.name[4:])
        for name, parts in (("scratch", {"scratch": "finetune_top1"}),
                            ("random_probe", {"random_probe": "linear_probe_top1",
                                              "random_features": "feature_probe_top1"})):
            found = {key: read_json(seed_dir / folder / "results.json") for folder, key in parts.items()}
            if any(found.values()):
                records.append({"variant": name, "seed": seed, "description": BASELINES[name],
                                **{key: result["top1"] for key, result in found.items() if result}})
    return records, curves


def summarize(records: list[dict]) -> dict:
    """Per variant and metric: mean, std over seeds (None with one seed) and the number of seeds."""
    summary: dict = {}
    for record in records:
        summary.setdefault(record["variant"], {"description": record["description"], "values": {}})
        for key in METRICS:
            if record.get(key) is not None:
                summary[record["variant"]]["values"].setdefault(key, []).append(record[key])
    for entry in summary.values():
        entry["stats"] = {key: (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None,
                                len(values)) for key, values in entry["values"].items()}
    return summary


def verdict(summary: dict, winner: str, loser: str, metric: str, margin: float = 0.0, loser_metric: str | None = None,
            reference: str = "mae") -> dict | None:
    """Did `winner` beat `loser` on `metric` (by at least `margin`, where the claim names one)? A difference within
    the spread over seeds (the larger std of the two; one-seed variants borrow the other's, or the `reference`
    variant's when both have one seed) is no difference. `loser_metric`: the loser's column, where it differs."""
    loser_metric = loser_metric or metric
    if (metric not in summary.get(winner, {}).get("stats", {})
            or loser_metric not in summary.get(loser, {}).get("stats", {})):
        return None
    (mean_w, std_w, n_w), (mean_l, std_l, n_l) = summary[winner]["stats"][metric], summary[loser]["stats"][loser_metric]
    higher_better = METRICS[metric][1]
    gain = (mean_w - mean_l) if higher_better else (mean_l - mean_w)
    spreads = [s for s in (std_w, std_l) if s is not None]
    if not spreads:
        spreads = [s for s in [summary.get(reference, {}).get("stats", {}).get(metric, (0, None, 0))[1]] if s is not None]
    spread = max(spreads) if spreads else None
    if spread is None:
        outcome = "unknown spread (one seed each)"
    elif abs(gain) <= spread:
        outcome = "no difference"
    elif gain < 0:
        outcome = "reversed"
    else:
        outcome = "reproduced" if gain >= margin else f"better, but by less than the claimed {margin:g}"
    return {"gain": gain, "spread": spread, "outcome": outcome, "seeds": (n_w, n_l)}


# ------------------------------------------------------------------------------------------- writing
def cell(stats, best: bool, digits: int) -> str:
    if stats is None:
        return ""
    mean, std, _ = stats
    text = f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")
    return f"**{text}**" if best else text


def table(summary: dict, order: list[str], descriptions: bool = True) -> str:
    digits = {"hf_error": 4, "pretrain_minutes": 1}
    best = {}
    for key, (_, higher) in METRICS.items():
        means = {name: summary[name]["stats"][key][0] for name in order if key in summary[name]["stats"]
                 and name not in BASELINES}
        if means:
            best[key] = (max if higher else min)(means, key=means.get)
    lines = ["| variant | seeds | " + " | ".join(heading for heading, _ in METRICS.values()) + " |",
             "|---|---|" + "---|" * len(METRICS)]
    for name in order:
        stats = summary[name]["stats"]
        seeds = max(n for _, _, n in stats.values()) if stats else 0
        cells = [cell(stats.get(key), best.get(key) == name, digits.get(key, 2)) for key in METRICS]
        label = f"{name} ({summary[name]['description']})" if descriptions else f"`{name}`"
        lines.append(f"| {label} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def claims_table(summary: dict) -> tuple[str, list[dict]]:
    lines = ["| claim | metric | difference | spread over seeds | verdict |", "|---|---|---|---|---|"]
    found = []
    for claim, winner, loser, metric, *margin in CLAIMS:
        result = verdict(summary, winner, loser, metric, *margin)
        if result is None:
            continue
        digits = 4 if metric == "hf_error" else 2
        spread = f"{result['spread']:.{digits}f}" if result["spread"] is not None else "n/a"
        against = f" vs `{loser}`'s {METRICS[margin[1]][0]}" if len(margin) > 1 else ""
        lines.append(f"| {claim}: `{winner}` vs `{loser}` | {METRICS[metric][0]}{against} | "
                     f"{result['gain']:+.{digits}f} | {spread} | {result['outcome']} |")
        found.append({"claim": claim, "winner": winner, "loser": loser, "metric": metric, **result})
    return "\n".join(lines), found


def plots(summary: dict, curves: dict, order: list[str], report: Path, compare: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    variants = [name for name in order if name not in BASELINES]

    def baseline_line(axis, name: str, key: str, colour: str):
        stats = summary.get(name, {}).get("stats", {}).get(key)
        if stats:
            axis.axvline(stats[0], color=colour, linestyle="--", label=f"{name} {stats[0]:.1f}%")

    pixels = (PIXELS, "grey", "feature_probe_top1")
    panels = (("linear_probe_top1", (("random_probe", "red", "linear_probe_top1"), pixels)),
              ("feature_probe_top1", (("random_probe", "red", "feature_probe_top1"), pixels)),
              ("finetune_top1", (("scratch", "red", "finetune_top1"), pixels)))
    figure, axes = plt.subplots(1, 3, figsize=(16, 0.4 * len(variants) + 2), sharey=True)
    for axis, (key, lines) in zip(axes, panels):
        shown = [name for name in variants if key in summary[name]["stats"]]
        means = [summary[name]["stats"][key][0] for name in shown]
        errors = [summary[name]["stats"][key][1] or 0 for name in shown]
        axis.barh(range(len(shown)), means, xerr=errors, color="tab:blue", capsize=3)
        axis.set_yticks(range(len(variants)), variants)
        for name, colour, line_key in lines:
            baseline_line(axis, name, line_key, colour)
        references = [summary.get(name, {}).get("stats", {}).get(line_key, (100,))[0] for name, _, line_key in lines]
        low = min(means + references) if means else 0
        axis.set_xlim(max(0, low - 5), min(100, max(means + references, default=100) + 3))
        axis.set_xlabel(METRICS[key][0])
        axis.legend(loc="lower right", fontsize=8)
    axes[0].invert_yaxis()
    figure.suptitle("Fashion-MNIST top-1 per pretraining variant (mean ± std over seeds)")
    figure.tight_layout()
    figure.savefig(report / "accuracy.png", dpi=110)
    plt.close(figure)
    written.append("accuracy.png")

    ratios = [(ratio, name) for ratio, name in ((0.5, "ratio_0.5"), (0.75, "mae"), (0.9, "ratio_0.9")) if name in summary]
    if len(ratios) > 1:
        figure, axis = plt.subplots(figsize=(5, 4))
        for key, marker in (("linear_probe_top1", "o"), ("feature_probe_top1", "^"), ("finetune_top1", "s")):
            points = [(ratio, summary[name]["stats"][key]) for ratio, name in ratios if key in summary[name]["stats"]]
            axis.errorbar([p[0] for p in points], [p[1][0] for p in points], yerr=[p[1][1] or 0 for p in points],
                          marker=marker, capsize=3, label=METRICS[key][0])
        axis.set_xlabel("mask ratio (random masking)")
        axis.set_ylabel("top-1 (%)")
        axis.legend()
        figure.tight_layout()
        figure.savefig(report / "mask_ratio.png", dpi=110)
        plt.close(figure)
        written.append("mask_ratio.png")

    first_seed = {name: rows for (name, seed), rows in curves.items() if seed == 0}
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, rows in first_seed.items():
        train = [row for row in rows if "loss" in row]
        axis.plot([row["epoch"] for row in train], [row["loss"] for row in train], label=name, linewidth=1)
    axis.set_yscale("log")
    axis.set_xlabel("epoch")
    axis.set_ylabel("training loss (total; scales differ between targets and losses)")
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(report / "pretrain_loss.png", dpi=110)
    plt.close(figure)
    written.append("pretrain_loss.png")

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=False)
    for name, rows in first_seed.items():
        scale = next((row["epoch"] / row["step"] for row in rows if "epoch" in row and row.get("step")), 1.0)
        val = [row for row in rows if "val_error_top" in row]
        for axis, key in zip(axes, ("val_error_top", "val_error_bottom")):
            axis.plot([row["step"] * scale for row in val], [row[key] for row in val], marker=".", label=name,
                      linewidth=1)
    for axis, title in zip(axes, ("top eigenspace (75% of the variance)", "bottom eigenspace (25% of the variance)")):
        axis.set_title(f"masked-pixel error in the {title}", fontsize=9)
        axis.set_xlabel("epoch")
        axis.set_yscale("log")
    axes[1].legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(report / "eigenspace_error.png", dpi=110)
    plt.close(figure)
    written.append("eigenspace_error.png")

    grid = compare / "compare.png"
    meta = read_json(compare / "metrics.json")
    if grid.exists() and meta:
        picture = plt.imread(grid)
        columns = meta["columns"]
        labels = [label if label in ("original", "masked input") else Path(label).parent.parent.parent.name
                  + ("" if Path(label).parent.parent.name == "seed0" else f" ({Path(label).parent.parent.name})")
                  for label in columns]
        figure, axis = plt.subplots(figsize=(max(8, len(columns) * 0.9), 0.9 * picture.shape[0] / picture.shape[1]
                                             * len(columns) + 1.6))
        axis.imshow(picture)
        width = picture.shape[1] / len(columns)
        axis.set_xticks([width * (i + 0.5) for i in range(len(columns))], labels, rotation=60, ha="right", fontsize=8)
        axis.set_yticks([])
        axis.set_title(f"Reconstructions under identical random masks (ratio {meta['mask_ratio']})", fontsize=10)
        figure.tight_layout()
        figure.savefig(report / "reconstructions.png", dpi=110)
        plt.close(figure)
        written.append("reconstructions.png")
    return written


README_START, README_END = "<!-- ablations:start -->", "<!-- ablations:end -->"


def update_readme(readme: Path, block: str) -> None:
    """Replace what stands between a Markdown file's ablation markers with `block` (its table is generated too)."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise SystemExit(f"{readme} has no {README_START} ... {README_END} markers: add them where the table goes")
    head, rest = text.split(README_START, 1)
    tail = rest.split(README_END, 1)[1]
    readme.write_text(f"{head}{README_START}\n{block}\n{README_END}{tail}")


def preset_text(name: str = "mae_vit_tiny_patch4") -> str:
    from models import MAE_PRESETS

    c = MAE_PRESETS[name]
    return (f"encoder width {c['embed_dim']}, depth {c['depth']}, {c['num_heads']} heads, patch {c['patch_size']}, "
            f"{c['img_size']} px; decoder width {c['decoder_embed_dim']}, depth {c['decoder_depth']}")


def outcome_line(claims: list[dict]) -> str:
    """How many claims held, reversed or stayed unresolved, in one sentence."""
    counts: dict = {}
    for claim in claims:
        kind = {"reproduced": "held", "reversed": "reversed"}.get(claim["outcome"], "unresolved")
        counts[kind] = counts.get(kind, 0) + 1
    return (f"Of {len(claims)} claims tested at this budget: {counts.get('held', 0)} held, "
            f"{counts.get('reversed', 0)} reversed, {counts.get('unresolved', 0)} unresolved (a difference within the "
            "seed spread, or a smaller gain than claimed).")


def write_report(out: Path, report: Path, chosen, budget_name: str, budget: dict, command: str,
                 readme: Path | None = None, skipped: tuple[str, ...] = ()) -> Path:
    """Collect every run under `out`; write results.json, RESULTS.md and the plots to `report` (and the table into
    `readme` between its ablation markers). `skipped`: the variants this budget does not run."""
    report.mkdir(parents=True, exist_ok=True)
    records, curves = collect(out, chosen)
    summary = summarize(records)
    order = [v.name for v in chosen if v.name in summary] + [name for name in BASELINES if name in summary]
    claims_md, claims = claims_table(summary)
    stages = read_jsonl(out / "stages.jsonl")
    latest = {row["stage"]: row for row in stages}
    total_minutes = sum(row["seconds"] for row in latest.values()) / 60
    wall_minutes = wall_clock_minutes(latest.values())
    machines = sorted({row["machine"] for row in latest.values()})
    (report / "results.json").write_text(json.dumps(
        {"budget": budget_name, "budget_settings": budget, "command": command, "machine": machines,
         "stage_minutes_total": round(total_minutes, 1),
         "wall_minutes": round(wall_minutes, 1), "records": records, "claims": claims}, indent=2))
    pictures = plots(summary, curves, order, report, out / "compare")
    settings = "; ".join(f"{stage}: " + ", ".join(f"{k} {v}" for k, v in options.items())
                         for stage, options in budget.items() if isinstance(options, dict))
    examples = {}
    for row in latest.values():  # (records of older versions name the interpreter by its full path)
        examples.setdefault(row["stage"].rsplit("/", 1)[-1], "python " + row["command"].split(" ", 1)[1])
    text = [
        f"# Fashion-MNIST ablations ({budget_name} budget)",
        "",
        f"Generated by `{command}` (experiments/run_ablations.py) from the run folders; "
        "every number below comes from their `results.json` / `metrics.jsonl`.",
        "",
        f"- Machine: {', '.join(machines)}. Wall time of the whole run: {wall_minutes:.0f} min (stages' wall times "
        f"summed: {total_minutes:.0f} min; with --jobs 2 two stages share the cores, so each stage's time, the "
        "pretraining column included, is that of half the machine).",
        f"- Budget: {settings}. Model: `mae_vit_tiny_patch4` ({preset_text()}).",
        "- Two probes of the frozen encoder: the official one (BatchNorm without affine + linear layer, LARS, on the "
        "global-pooled features) and logistic regression (L-BFGS) on the cls token beside the mean patch token, "
        "standardised; the pixel baseline is the same logistic regression on raw pixels. Probes and fine-tuning "
        "evaluate on the Fashion-MNIST test split; masked PSNR and HF error are measured "
        f"on {budget['compare_images']} test images under the same random 75% masks for every model "
        "(compare_reconstructions.py).",
        *([f"- Not run here: {', '.join(skipped)} (their claims are left out below)."] if skipped else []),
        "- mean ± std over seeds where a variant has several; **bold**: best variant per column (baselines excluded).",
        "",
        table(summary, order),
        "",
        "## The claims at this scale",
        "",
        "A difference within the spread over seeds (the larger std of the two; a one-seed variant borrows the "
        "other's) counts as no difference.",
        "",
        outcome_line(claims),
        "",
        claims_md,
        "",
        "## Plots",
        "",
        *[f"![{name}]({name})" for name in pictures],
        "",
        "## Commands (one per stage kind; every stage's command is in stages.jsonl)",
        "",
        *[f"- {kind}: `{example}`" for kind, example in sorted(examples.items())],
        "",
    ]
    (report / "RESULTS.md").write_text("\n".join(text))
    if readme is not None:
        update_readme(readme, "\n".join([
            f"Generated by `{command}` ({budget_name} budget; {', '.join(machines)}; {wall_minutes:.0f} min wall "
            f"time). Full table with descriptions, verdicts and plots: "
            f"[{report.as_posix()}/RESULTS.md]({report.as_posix()}/RESULTS.md).", "",
            table(summary, order, descriptions=False), "", outcome_line(claims), "", claims_md]))
    return report / "RESULTS.md"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    logreg = commands.add_parser("logreg", help="Logistic regression on raw Fashion-MNIST pixels.")
    features = commands.add_parser("featprobe", help="Logistic regression on a frozen encoder's cls + mean features.")
    features.add_argument("--weights", default=None,
                          help="A pretraining run's final/ folder (default: a random encoder).")
    features.add_argument("--seed", type=int, default=0, help="Seed of the random encoder (without --weights).")
    for command in (logreg, features):
        command.add_argument("--max_samples", type=int, default=0, help="First N training images (0: all 60k).")
        command.add_argument("--max_val_samples", type=int, default=0, help="First N test images (0: all 10k).")
        command.add_argument("--weight_decay", type=float, default=1e-4, help="L2 penalty on the weights.")
        command.add_argument("--out", required=True, help="Folder for results.json.")
    args = parser.parse_args(argv)
    if args.command == "logreg":
        result = logistic_regression(args.max_samples, args.max_val_samples, args.weight_decay)
    else:
        result = feature_probe(args.weights, args.seed, args.max_samples, args.max_val_samples, args.weight_decay)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(result, indent=2))
    print(f"{args.command}: top-1 {result['top1']:.2f}% (train {result['train_top1']:.2f}%)")


if __name__ == "__main__":
    main()
