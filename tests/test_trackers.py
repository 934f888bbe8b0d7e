"""Experiment trackers: a wandb run (offline here) that a resumed run continues, with its curves and pictures."""
import argparse
import re

import numpy as np
import pytest
from accelerate.state import AcceleratorState, GradientState

from engine.records import MetricsLog
from engine.setup import WANDB_ID, RunDir, build_accelerator

wandb = pytest.importorskip("wandb")


def run_ids(wandb_dir) -> list[str]:
    """The run id of every offline start: `offline-run-<time>-<id>`, with `-<n>` added when two starts share a second."""
    names = sorted(path.name for path in wandb_dir.glob("offline-run-*"))
    return [re.fullmatch(r"offline-run-\d{8}_\d{6}-([a-z0-9]+)(?:-\d+)?", name).group(1) for name in names]


def start_and_log(run_dir: RunDir, args, step: int) -> str:
    """One start of the run: the Accelerator with its trackers, a metrics row and a picture; returns the wandb id."""
    accelerator = build_accelerator(args, run_dir)
    try:
        metrics = MetricsLog(accelerator, run_dir.metrics, resume_step=step - 1)
        metrics.log({"step": step, "loss": 1.0 / step})
        metrics.log_image("reconstructions", np.zeros((8, 8, 3), dtype=np.uint8), step)
        return accelerator.get_tracker("wandb", unwrap=True).id
    finally:
        accelerator.end_training()
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def test_a_resumed_run_continues_the_same_offline_wandb_run(tmp_path, monkeypatch):
    import pretrain_mae

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = pretrain_mae.parse_args(["--log_with", "wandb", "--per_gpu_batch_size", "8", "--experiment_name", "run",
                                    "--wandb_entity", "team"])
    run_dir = RunDir(tmp_path / "run")
    first = start_and_log(run_dir, args, step=1)
    assert (run_dir.root / WANDB_ID).read_text().strip() == first
    resumed = argparse.Namespace(**{**vars(args), "resume_from_checkpoint": "auto"})
    assert start_and_log(run_dir, resumed, step=2) == first  # the requeued job writes to the same run
    assert run_ids(run_dir.root / "wandb") in ([first], [first, first])  # every start: one run id
    assert list((run_dir.root / "wandb").glob("offline-run-*/files/media/images/reconstructions_*.png"))  # the picture
    other = RunDir(tmp_path / "other")
    assert start_and_log(other, args, step=1) != first  # a new run folder is a new wandb run
    assert start_and_log(run_dir, args, step=1) != first  # so is a fresh start in the same folder


@pytest.mark.slow
def test_the_imagenet_style_command_with_wandb_resumes_the_same_offline_run(tmp_path, monkeypatch):
    from PIL import Image

    from conftest import run_script, sigterm_script

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    rng = np.random.default_rng(0)
    for split, count in (("train", 16), ("val", 8)):
        for index in range(count):
            folder = tmp_path / "images" / split / f"class{index % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    command = ["--experiment_name", "MAEPretraining", "--wandb_run_name", "pretrain_mae",
               "--path_to_data", tmp_path / "images", "--working_directory", tmp_path / "work", "--img_size", 32,
               "--input_channels", 3, "--epochs", 60, "--warmup_epochs", 1, "--per_gpu_batch_size", 8,
               "--gradient_accumulation_steps", 2, "--base_learning_rate", 1.5e-4, "--weight_decay", 0.05,
               "--encoder_embed_dim", 32, "--encoder_depth", 1, "--encoder_num_heads", 2, "--encoder_mlp_ratio", 4,
               "--decoder_embed_dim", 32, "--decoder_depth", 1, "--decoder_num_heads", 2, "--decoder_mlp_ratio", 4,
               "--patch_size", 8, "--num_workers", 0, "--norm_pix_loss", "--custom_weight_init", "--log_wandb",
               "--log_every", 1, "--vis_every", 0]
    run = tmp_path / "work" / "MAEPretraining"
    metrics = run / "metrics.jsonl"
    code, stderr = sigterm_script("pretrain_mae.py", *command,
                                  ready=lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3)
    assert code == 75, stderr[-2000:]
    run_script("pretrain_mae.py", *command, "--resume_from_checkpoint", "auto")
    run_id = (run / WANDB_ID).read_text().strip()
    assert run_ids(run / "wandb") == [run_id, run_id]  # both starts: one wandb run
