"""Experiment trackers: a wandb run (offline here) that a resumed run continues, with its curves and pictures."""
import numpy as np
import pytest
from accelerate.state import AcceleratorState, GradientState

from engine.records import MetricsLog
from engine.setup import WANDB_ID, RunDir, build_accelerator

wandb = pytest.importorskip("wandb")


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
    assert start_and_log(run_dir, args, step=2) == first  # the requeued job writes to the same run
    runs = sorted((run_dir.root / "wandb").glob(f"offline-run-*-{first}"))
    assert len(runs) == 2  # one folder per start, one run id: `wandb sync` merges them into one run
    assert list(runs[-1].glob("files/media/images/reconstructions_*.png"))  # the picture went to wandb
    other = RunDir(tmp_path / "other")
    assert start_and_log(other, args, step=1) != first  # a new run folder is a new wandb run
