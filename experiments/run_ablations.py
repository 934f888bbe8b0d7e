"""Do the claims hold on Fashion-MNIST? Every MAE variant is pretrained, linear-probed and fine-tuned
through this project's own scripts with the same encoder, data, budget and evaluation, next to three baselines
(logistic regression on raw pixels, the ViT trained from scratch, a linear probe of a random encoder).

    python experiments/run_ablations.py --budget smoke|cpu|gpu --out DIR [--seeds N] [--jobs J]

Each stage is a run folder under DIR/<variant>/seed<k>/, skipped once finished (an interrupted one resumes from its
last checkpoint) and logged to DIR/stages.jsonl; the report (results.json, RESULTS.md, plots) goes to --report_dir.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from experiments import ablation_report  # noqa: E402

# Budgets: what each stage trains on. Fashion-MNIST's first N training images (all 60k where no max_samples is set);
# evaluation always on the 10k test images, except in the smoke budget. `variants`: the ones the budget runs (None:
# all); `finetuned`: the variants that are also fine-tuned (None: all).
BUDGETS = {
    "smoke": dict(pretrain=dict(max_samples=256, epochs=2, per_gpu_batch_size=64, warmup_epochs=0.5, pca_samples=256),
                  linear_probe=dict(max_samples=256, max_val_samples=256, epochs=3, warmup_epochs=1, per_gpu_batch_size=128),
                  feature_probe=dict(max_samples=256, max_val_samples=256),
                  finetune=dict(max_samples=256, max_val_samples=256, epochs=1, per_gpu_batch_size=64, warmup_epochs=0.25),
                  compare_images=32, seeds=1, every_row_seeded=False, variants=None, finetuned=None),
    # About 1.5 h on 2 cores with --jobs 2: the plain MAE and every baseline with 3 seeds on all 60k images, the
    # claims that a CPU can settle; the variants need the gpu budget's longer pretraining to separate.
    "cpu": dict(pretrain=dict(epochs=2, per_gpu_batch_size=128, warmup_epochs=0.25, pca_samples=2000),
                linear_probe=dict(epochs=90, warmup_epochs=10, per_gpu_batch_size=1024),
                feature_probe=dict(),
                finetune=dict(epochs=3, per_gpu_batch_size=128, warmup_epochs=0.2),
                compare_images=512, seeds=3, every_row_seeded=False, variants=("mae",), finetuned=("mae",)),
    # Every variant with 3 seeds in about 10 minutes on one H100/H200 with 16 cores (--jobs 12): see docs/variants.md
    # for the estimate; all stages of a lane share one GPU.
    "gpu": dict(pretrain=dict(epochs=8, per_gpu_batch_size=256, warmup_epochs=1, pca_samples=10000),
                linear_probe=dict(epochs=90, warmup_epochs=10, per_gpu_batch_size=1024),
                feature_probe=dict(),
                finetune=dict(epochs=4, per_gpu_batch_size=128, warmup_epochs=0.2),
                compare_images=2000, seeds=3, every_row_seeded=True, variants=None, finetuned=None),
}


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    flags: tuple[str, ...]  # pretrain_mae.py flags on top of the plain MAE (75% random masking, pixels, norm_pix)
    headline: bool = False  # run with --seeds seeds (the others with one)
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True


def variants(epochs: float) -> list[Variant]:
    """The pretraining variants; each differs from `mae` in one thing, except `improved` (the improved-MAE recipe)."""
    return [
        Variant("mae", "plain MAE: 75% random masking, pixel targets, norm_pix_loss", (), headline=True),
        Variant("improved", "curriculum + HF loss + uniformity (--recipe improved)", ("--recipe", "improved"),
                headline=True),
        Variant("mae_raw_pixels", "plain MAE without norm_pix_loss", (), norm_pix_loss=False),
        Variant("ratio_0.5", "mask ratio 0.5", ("--mask_ratio", "0.5"), mask_ratio=0.5),
        Variant("ratio_0.9", "mask ratio 0.9", ("--mask_ratio", "0.9"), mask_ratio=0.9),
        Variant("block", "block masking at 0.75", ("--mask_strategy", "block")),
        Variant("grid", "grid masking at 0.75", ("--mask_strategy", "grid")),
        Variant("pca_bottom", "target: PCA-filtered, bottom components (25% of the variance)",
                ("--target", "pca_bottom", "--pca_variance", "0.25")),
        Variant("pca_top", "target: PCA-filtered, top components (75% of the variance)",
                ("--target", "pca_top", "--pca_variance", "0.25")),
        Variant("curriculum", "the improved recipe's curriculum alone (ratio 0.5 -> 0.75 over the first quarter)",
                ("--mask_ratio_start", "0.5", "--mask_curriculum_epochs", f"{epochs / 4:g}")),
        Variant("hf_loss", "the improved recipe's Laplacian loss alone (weight 0.5)", ("--hf_loss_weight", "0.5")),
        Variant("uniformity", "the improved recipe's uniformity regulariser alone (weight 0.05)",
                ("--uniformity_weight", "0.05")),
    ]


@dataclass
class Stage:
    """One script run; `done` exists once it finished."""
    name: str  # e.g. mae/seed0/pretrain
    done: Path
    command: list[str] = field(default_factory=list)


def flags(options: dict) -> list[str]:
    return [part for key, value in options.items() for part in (f"--{key}", str(value))]


def machine() -> str:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{os.cpu_count()} CPU cores"
    return f"{device}, {platform.machine()}, torch {torch.__version__}"


def precision() -> str:
    """bf16 autocast where the hardware computes it natively (a GPU, or a CPU with AVX-512 BF16 / AMX), else fp32."""
    from engine.setup import bf16_is_native

    return "bf16" if bf16_is_native() else "no"


def budget_of(args) -> dict:
    """The budget's settings, with every stage's images capped at --max_samples where given."""
    budget = BUDGETS[args.budget]
    if not args.max_samples:
        return budget
    cap = args.max_samples
    capped = {}
    for stage, options in budget.items():
        if isinstance(options, dict):
            capped[stage] = {**options, "max_samples": min(options.get("max_samples", cap), cap)}
            if "per_gpu_batch_size" in options:  # at least one step per epoch
                capped[stage]["per_gpu_batch_size"] = min(options["per_gpu_batch_size"], cap)
            if stage != "pretrain":
                capped[stage]["max_val_samples"] = min(options.get("max_val_samples", cap), cap)
            if "pca_samples" in options:
                capped[stage]["pca_samples"] = min(options["pca_samples"], cap)
    return {**budget, **capped, "compare_images": min(budget["compare_images"], cap)}


def loader_workers(jobs: int) -> int:
    """Loader workers per stage: none on a CPU (the step needs the cores); on a GPU, the cores left per lane."""
    import torch

    from engine.setup import default_num_workers

    return default_num_workers(torch.device("cuda" if torch.cuda.is_available() else "cpu"), processes=jobs)


def plan(args) -> tuple[list[list[Stage]], list[Stage], list[Variant]]:
    """Chains of stages (each chain runs in order; chains run side by side with --jobs) and the final stages."""
    budget = budget_of(args)
    out = Path(args.out)
    python = [sys.executable]
    common = ["--log_with", "none", "--resume_from_checkpoint", "latest", "--keep_checkpoints", "1",
              "--mixed_precision", precision(), "--num_workers", str(loader_workers(args.jobs))]
    runs = args.variants or budget["variants"]
    chosen = [v for v in variants(budget["pretrain"]["epochs"]) if runs is None or v.name in runs]
    seeds = args.seeds if args.seeds is not None else budget["seeds"]
    report = [python[0], str(ROOT / "experiments" / "ablation_report.py")]

    def classifier(where: Path, name: str, mode: list[str], seed: int) -> Stage:
        options = budget["linear_probe" if "--linear_probe" in mode else "finetune"]
        return Stage(f"{where.relative_to(out)}/{name}", where / name / "results.json",
                     python + [str(ROOT / "finetune_classifier.py"), "--working_directory", str(where),
                               "--experiment_name", name, "--seed", str(seed), *mode, *flags(options), *common])

    def feature_probe(where: Path, name: str, source: list[str]) -> Stage:
        return Stage(f"{where.relative_to(out)}/{name}", where / name / "results.json",
                     report + ["featprobe", *source, *flags(budget["feature_probe"]), "--out", str(where / name)])

    chains = []  # baselines first: they are cheap and every comparison needs them
    baselines = out / "baselines"
    for seed in range(seeds):
        where = baselines / f"seed{seed}"
        chains.append([classifier(where, "scratch", ["--from_scratch"], seed)])
        chains.append([classifier(where, "random_probe", ["--from_scratch", "--linear_probe"], seed),
                       feature_probe(where, "random_features", ["--seed", str(seed)])])
    chains.append([Stage("baselines/logistic_regression", baselines / "logistic_regression" / "results.json",
                         report + ["logreg", *flags(budget["feature_probe"]), "--out",
                                   str(baselines / "logistic_regression")])])
    for variant in chosen:
        finetuned = budget["finetuned"] is None or variant.name in budget["finetuned"]
        for seed in range(seeds if variant.headline or budget["every_row_seeded"] else 1):
            where = out / variant.name / f"seed{seed}"
            pretrained = str(where / "pretrain" / "final")
            norm = ["--norm_pix_loss"] if variant.norm_pix_loss else []
            chains.append([
                Stage(f"{variant.name}/seed{seed}/pretrain", where / "pretrain" / "final" / "model.safetensors",
                      python + [str(ROOT / "pretrain_mae.py"), "--working_directory", str(where), "--experiment_name",
                                "pretrain", "--seed", str(seed), *norm, *variant.flags, "--eigenspace_metrics",
                                "--num_vis_images", "64", "--log_every", "10", *flags(budget["pretrain"]), *common]),
                classifier(where, "linear_probe", ["--linear_probe", "--path_to_pretrained_mae_weights", pretrained], seed),
                feature_probe(where, "feature_probe", ["--weights", pretrained]),
                *([classifier(where, "finetune", ["--path_to_pretrained_mae_weights", pretrained], seed)]
                  if finetuned else []),
            ])
    models = [str(chain[0].done.parent) for chain in chains if chain[0].name.endswith("/pretrain")]
    # Longest chains first (fine-tuning is the longest stage), so that --jobs lanes finish together.
    chains.sort(key=lambda chain: -(len(chain) + 2 * any(s.name.endswith(("/finetune", "/scratch")) for s in chain)))
    compare = Stage("compare_reconstructions", out / "compare" / "metrics.json",
                    python + [str(ROOT / "compare_reconstructions.py"), "--models", *models, "--mask_ratio", "0.75",
                              "--num_images", str(budget["compare_images"]), "--grid_images", "6",
                              "--out", str(out / "compare")])
    return chains, [compare], chosen


def run_stage(stage: Stage, out: Path, env: dict) -> None:
    if stage.done.exists():
        print(f"== {stage.name}: done already", flush=True)
        return
    log = out / "logs" / f"{stage.name.replace('/', '_')}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"== {stage.name}: started (log {log})", flush=True)
    start = time.time()
    with open(log, "a") as handle:
        code = subprocess.run(stage.command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT).returncode
    seconds = round(time.time() - start, 1)
    if code != 0 or not stage.done.exists():
        raise RuntimeError(f"{stage.name} failed (exit code {code}) after {seconds} s: see {log}")
    command = " ".join(["python", *stage.command[1:]]).replace(str(ROOT) + "/", "")
    record = {"stage": stage.name, "seconds": seconds, "command": command,
              "machine": machine(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with open(out / "stages.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")
    print(f"== {stage.name}: finished in {seconds:.0f} s", flush=True)


def run_chain(chain: list[Stage], out: Path, env: dict) -> str | None:
    try:
        for stage in chain:
            run_stage(stage, out, env)
    except RuntimeError as error:
        print(f"!! {error}", flush=True)
        return str(error)
    return None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="smoke",
                        help="smoke: minutes, a pipeline check; cpu: the table in docs/variants.md (~1.5 h on 2 cores "
                             "with --jobs 2); gpu: a longer one for a GPU.")
    parser.add_argument("--out", default=None, help="Folder of the runs (default: runs/ablations_<budget>).")
    parser.add_argument("--report_dir", default=None, help="Where results.json, RESULTS.md and the plots go "
                                                           "(default: --out).")
    parser.add_argument("--readme", default=None,
                        help="Also write the table into this Markdown file (docs/variants.md), between its "
                             "<!-- ablations:start/end --> markers.")
    parser.add_argument("--seeds", type=int, default=None,
                        help="Seeds of the headline runs: plain MAE, improved recipe, scratch (default: the budget's; "
                             "the other variants get one).")
    parser.add_argument("--max_samples", type=int, default=None,
                        help="Cap every stage's training and test images at N: the budget's whole pipeline at a "
                             "reduced size, as a check that it runs.")
    parser.add_argument("--jobs", type=int, default=1,
                        help="Stage chains run side by side, each on cpu_count / jobs threads (2 suits 2 cores: "
                             "small models use two single-threaded processes better than one two-threaded).")
    parser.add_argument("--variants", nargs="+", default=None,
                        help=f"Only these variants (default: the budget's; all of them: "
                             f"{', '.join(v.name for v in variants(4))}).")
    args = parser.parse_args(argv)
    if args.jobs < 1 or (args.seeds is not None and args.seeds < 1) or (args.max_samples is not None
                                                                        and args.max_samples < 1):
        parser.error("--jobs, --seeds and --max_samples must be at least 1")
    known = {v.name for v in variants(4)}
    if args.variants and not set(args.variants) <= known:
        parser.error(f"unknown variants {sorted(set(args.variants) - known)}: choose from {sorted(known)}")
    args.out = args.out or f"runs/ablations_{args.budget}"
    args.report_dir = args.report_dir or args.out
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    args.out = str(out)
    chains, finals, chosen = plan(args)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    env = {**os.environ, "MAE_CPU_THREADS": str(threads), "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    start = time.time()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        failures = [error for error in pool.map(lambda chain: run_chain(chain, out, env), chains) if error]
    if not failures:
        failures = [error for error in [run_chain(finals, out, env)] if error]
    if failures:
        print(f"{len(failures)} stage(s) failed; rerun the same command to retry them:\n  " + "\n  ".join(failures))
        return 1
    budget = budget_of(args)
    report = ablation_report.write_report(out, Path(args.report_dir), chosen, args.budget, budget,
                                          " ".join(["python", "experiments/run_ablations.py", *(argv or sys.argv[1:])]),
                                          Path(args.readme) if args.readme else None,
                                          tuple(v.name for v in variants(4) if v.name not in {c.name for c in chosen}))
    print(f"finished in {time.time() - start:.0f} s; report in {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
