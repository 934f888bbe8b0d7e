"""experiments/run_ablations.py: every variant's pretraining command is valid; the smoke budget runs a variant of
each kind end to end and reports finite numbers; the verdict logic; the logistic-regression baseline."""
import json
import math
import statistics

import matplotlib.image
import pytest
import torch
from conftest import run_script

import pretrain_mae
from engine.setup import bf16_is_native
from experiments import ablation_report
from experiments.run_ablations import parse_args, plan, variants
from models import MaskedAutoencoder, mae_config
from pipeline.transforms import FASHION_MNIST_MEAN, FASHION_MNIST_STD, Normalize

# One variant of each kind of pretraining code path (plain, the improved recipe's three terms, another mask ratio,
# structured masks, PCA targets): the smoke test runs these end to end. The others differ from them only in flag
# values, which test_every_variant_command_is_accepted_by_pretrain_mae checks without training.
SMOKE_VARIANTS = ["mae", "improved", "ratio_0.9", "block", "pca_bottom"]


# What each variant's pretraining run must be, written out here rather than read from run_ablations' Variant list:
# the plain MAE's settings, and what each variant changes.
PLAIN = dict(mask_ratio=0.75, norm_pix_loss=True, mask_strategy="random", target="pixels", pca_variance=0.25,
             recipe="original", mask_ratio_start=None, mask_curriculum_epochs=0.0, hf_loss_weight=0.0,
             uniformity_weight=0.0, eigenspace_metrics=True, max_samples=256, epochs=2)
CHANGES = {
    "mae": {}, "mae_raw_pixels": dict(norm_pix_loss=False),
    "improved": dict(recipe="improved", mask_ratio_start=0.5, mask_curriculum_epochs=0.5, hf_loss_weight=0.5,
                     uniformity_weight=0.05),
    "ratio_0.5": dict(mask_ratio=0.5), "ratio_0.9": dict(mask_ratio=0.9),
    "block": dict(mask_strategy="block"), "grid": dict(mask_strategy="grid"),
    "pca_bottom": dict(target="pca_bottom"), "pca_top": dict(target="pca_top"),
    "curriculum": dict(mask_ratio_start=0.5, mask_curriculum_epochs=0.5),
    "hf_loss": dict(hf_loss_weight=0.5), "uniformity": dict(uniformity_weight=0.05),
}


def test_every_variant_command_is_accepted_by_pretrain_mae(tmp_path):
    chains, _, chosen = plan(parse_args(["--budget", "smoke", "--out", str(tmp_path)]))
    pretraining = {chain[0].name.split("/")[0]: chain[0].command for chain in chains if chain[0].name.endswith("/pretrain")}
    assert list(pretraining) == [v.name for v in chosen] == [v.name for v in variants(2)]
    assert set(pretraining) == set(CHANGES)
    assert set(SMOKE_VARIANTS) <= set(pretraining)
    for name, command in pretraining.items():
        args = pretrain_mae.parse_args(command[2:])
        MaskedAutoencoder(**pretrain_mae.resolve_defaults(args))  # valid flags, and the sizes build a model
        expected = {**PLAIN, **CHANGES[name]}
        assert {key: getattr(args, key) for key in expected} == expected, name


def option(command: list[str], flag: str) -> str | None:
    return command[command.index(flag) + 1] if flag in command else None


def test_gpu_budget_seeds_every_row_and_max_samples_caps_every_stage(tmp_path):
    chains, finals, chosen = plan(parse_args(["--budget", "gpu", "--out", str(tmp_path), "--max_samples", "300"]))
    stages = [stage for chain in chains for stage in chain] + finals
    names = {stage.name for stage in stages}
    for variant in chosen:
        for seed in range(3):
            for kind in ("pretrain", "linear_probe", "feature_probe", "finetune"):
                assert f"{variant.name}/seed{seed}/{kind}" in names
    assert len(chosen) == len(variants(8)) and len(names) == len(stages)
    for stage in [stage for chain in chains for stage in chain]:
        assert int(option(stage.command, "--max_samples")) <= 300, stage.name
        assert int(option(stage.command, "--per_gpu_batch_size") or 0) <= 300, stage.name
    for stage in stages:
        if stage.name.endswith("/pretrain"):
            assert int(option(stage.command, "--pca_samples")) == 300
        elif "--max_val_samples" in stage.command:
            assert int(option(stage.command, "--max_val_samples")) <= 300
    assert int(option(finals[0].command, "--num_images")) == 300


def test_cpu_budget_fine_tunes_the_plain_mae_only_and_runs_the_longest_chains_first(tmp_path):
    chains, _, chosen = plan(parse_args(["--budget", "cpu", "--out", str(tmp_path)]))
    finetuned = sorted({chain[-1].name.split("/")[0] for chain in chains if chain[-1].name.endswith("/finetune")})
    assert finetuned == ["mae"]
    assert [v.name for v in chosen] == ["mae"]
    assert sum(chain[0].name.startswith("mae/") for chain in chains) == 3
    assert sum(chain[0].name.endswith("/scratch") for chain in chains) == 3
    first = [chain[-1].name for chain in chains[:3]]
    assert all(name.endswith("/finetune") for name in first), first
    assert all("--max_samples" not in stage.command for chain in chains for stage in chain)  # all 60k images


@pytest.mark.slow
def test_smoke_budget_runs_a_variant_of_each_kind_and_writes_table_and_plots(tmp_path, fashion_mnist_dir):
    out, report = tmp_path / "runs", tmp_path / "report"
    run_script("experiments/run_ablations.py", "--budget", "smoke", "--out", out, "--report_dir", report,
               "--jobs", "2", "--variants", *SMOKE_VARIANTS, timeout=1800)
    summary = json.loads((report / "results.json").read_text())
    records = summary["records"]
    names = SMOKE_VARIANTS
    by_variant = {name: [r for r in records if r["variant"] == name] for name in names}
    for name, rows in by_variant.items():
        assert len(rows) == 1, f"{name}: {len(rows)} records"
        for key in ("linear_probe_top1", "feature_probe_top1", "finetune_top1", "masked_psnr", "hf_error",
                    "pretrain_minutes"):
            value = rows[0][key]
            assert value is not None and math.isfinite(value), f"{name} {key} = {value}"
        assert 0 <= rows[0]["linear_probe_top1"] <= 100 and 0 <= rows[0]["feature_probe_top1"] <= 100
        assert rows[0]["masked_psnr"] > 0
    baselines = {r["variant"]: r for r in records if r["variant"] not in names}
    assert set(baselines) == {"logistic_regression", "random_probe", "scratch"}
    # Even on 256 images, raw-pixel logistic regression is far above chance (10 classes).
    assert baselines["logistic_regression"]["feature_probe_top1"] > 50
    assert math.isfinite(baselines["scratch"]["finetune_top1"])
    assert all(math.isfinite(baselines["random_probe"][key]) for key in ("linear_probe_top1", "feature_probe_top1"))

    # Variants really differ: their flags reached the pretraining runs.
    for name, strategy, target in (("block", "block", "pixels"), ("pca_bottom", "random", "pca_bottom"),
                                   ("mae", "random", "pixels")):
        args = json.loads((out / name / "seed0" / "pretrain" / "args.json").read_text())
        assert (args["mask_strategy"], args["target"], args["norm_pix_loss"]) == (strategy, target, True)
    assert json.loads((out / "ratio_0.9/seed0/pretrain/args.json").read_text())["mask_ratio"] == 0.9
    improved = json.loads((out / "improved/seed0/pretrain/args.json").read_text())
    assert improved["hf_loss_weight"] > 0 and improved["uniformity_weight"] > 0 and improved["mask_ratio_start"] == 0.5

    for picture in ("accuracy.png", "mask_ratio.png", "pretrain_loss.png", "eigenspace_error.png",
                    "reconstructions.png"):
        image = matplotlib.image.imread(report / picture)
        assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0, picture
    text = (report / "RESULTS.md").read_text()
    for name in names + list(ablation_report.BASELINES):
        assert f"| {name} (" in text, name
    assert "nan" not in text.lower()
    stages = [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines()]
    # 4 stages per variant (pretrain, two probes, fine-tune); scratch, two random probes, logreg; compare
    assert len(stages) == 4 * len(names) + 4 + 1
    assert all(s["seconds"] > 0 and s["command"].startswith("python ") for s in stages)

    # A second call finds every stage done and only rewrites the report.
    again = run_script("experiments/run_ablations.py", "--budget", "smoke", "--out", out, "--report_dir", report,
                       "--variants", *SMOKE_VARIANTS, timeout=300)
    assert "started" not in again.stdout and again.stdout.count("done already") == len(stages)
    assert json.loads((report / "results.json").read_text())["records"] == records


def summary_of(values: dict) -> dict:
    records = [{"variant": name, "seed": seed, "description": name, metric: value}
               for name, (metric, seeds) in values.items() for seed, value in enumerate(seeds)]
    return ablation_report.summarize(records)


def test_verdict_counts_a_difference_within_the_seed_spread_as_none():
    summary = summary_of({"mae": ("linear_probe_top1", [80.0, 81.0, 82.0]),  # std 1.0
                          "improved": ("linear_probe_top1", [81.5, 82.5, 83.5]),  # +1.5: beyond the spread
                          "curriculum": ("linear_probe_top1", [81.5]),  # +0.5: within mae's spread
                          "hf_loss": ("linear_probe_top1", [77.0])})  # -4: reversed
    assert summary["mae"]["stats"]["linear_probe_top1"] == (81.0, 1.0, 3)
    improved = ablation_report.verdict(summary, "improved", "mae", "linear_probe_top1")
    assert improved["outcome"] == "reproduced" and improved["gain"] == pytest.approx(1.5)
    assert improved["spread"] == pytest.approx(1.0)
    assert ablation_report.verdict(summary, "curriculum", "mae", "linear_probe_top1")["outcome"] == "no difference"
    assert ablation_report.verdict(summary, "hf_loss", "mae", "linear_probe_top1")["outcome"] == "reversed"
    assert ablation_report.verdict(summary, "mae", "missing", "linear_probe_top1") is None


def test_verdict_on_a_lower_is_better_metric():
    summary = summary_of({"hf_loss": ("hf_error", [0.20, 0.21]), "mae": ("hf_error", [0.25, 0.26])})
    result = ablation_report.verdict(summary, "hf_loss", "mae", "hf_error")
    assert result["gain"] == pytest.approx(0.05) and result["outcome"] == "reproduced"
    assert result["spread"] == pytest.approx(statistics.stdev([0.20, 0.21]))


def test_logistic_regression_on_raw_pixels(fashion_mnist_dir):
    result = ablation_report.logistic_regression(max_samples=2000, max_val_samples=1000)
    # Fashion-MNIST's published raw-pixel logistic regression is ~84% on all 60k; 2k images land a little lower.
    assert 75 < result["top1"] < 90 and result["train_top1"] > result["top1"]
    assert result["train_samples"] == 2000 and result["val_samples"] == 1000



def test_feature_probe_reads_the_saved_encoder_and_seeds_the_random_one(tmp_path, fashion_mnist_dir):
    torch.manual_seed(3)
    MaskedAutoencoder(**mae_config("mae_vit_tiny_patch4")).save_pretrained(tmp_path / "final")
    saved = ablation_report.feature_probe(str(tmp_path / "final"), seed=0, max_samples=1000, max_val_samples=500)
    same = ablation_report.feature_probe(None, seed=3, max_samples=1000, max_val_samples=500)
    other = ablation_report.feature_probe(None, seed=4, max_samples=1000, max_val_samples=500)
    assert saved["top1"] == same["top1"] and saved["train_top1"] == same["train_top1"]
    assert (other["top1"], other["train_top1"]) != (same["top1"], same["train_top1"])
    # Even a random encoder's features carry the image: far above chance (10 classes).
    assert 50 < same["top1"] < 95 and same["train_samples"] == 1000 and same["val_samples"] == 500


def test_encoder_features_are_the_cls_token_beside_the_mean_patch_token():
    torch.manual_seed(0)
    encoder = MaskedAutoencoder(**mae_config("mae_vit_tiny_patch4")).encoder
    images = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    features = ablation_report.encoder_features(encoder, images, batch_size=2)
    normalize = Normalize(FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    with torch.no_grad():
        tokens = encoder.forward_features(normalize(images)).float()
    assert features.shape == (5, 2 * encoder.embed_dim)
    tolerance = 0.1 if bf16_is_native() else 1e-5  # bf16 autocast where it is native
    torch.testing.assert_close(features, torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], 1), atol=tolerance,
                               rtol=tolerance)


def test_cross_metric_claim_compares_fine_tuning_with_the_pixel_probe():
    records = [{"variant": "mae", "seed": s, "description": "", "finetune_top1": v} for s, v in enumerate([86, 87, 88])]
    records.append({"variant": "logistic_regression", "seed": 0, "description": "", "feature_probe_top1": 84.0})
    summary = ablation_report.summarize(records)
    result = ablation_report.verdict(summary, "mae", "logistic_regression", "finetune_top1", 0.0, "feature_probe_top1")
    assert result["gain"] == pytest.approx(3.0) and result["spread"] == pytest.approx(1.0)
    assert result["outcome"] == "reproduced"
    assert ablation_report.verdict(summary, "mae", "logistic_regression", "finetune_top1") is None


def test_readme_table_goes_between_the_markers_only(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\nbefore\n{ablation_report.README_START}\nold table\n{ablation_report.README_END}\nafter\n")
    ablation_report.update_readme(readme, "| new | table |")
    assert readme.read_text() == (f"# title\nbefore\n{ablation_report.README_START}\n| new | table |\n"
                                  f"{ablation_report.README_END}\nafter\n")
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="no <!-- ablations:start -->"):
        ablation_report.update_readme(readme, "x")
