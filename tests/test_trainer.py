"""engine.Trainer on a toy task, in this process, in seconds: exact resume after a preemption, accumulation equal to
one big batch, skipped non-finite steps and the stop after too many, the checkpoint cadence."""
import argparse
import json
import os
import signal

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from conftest import ROOT
from huggingface_hub import PyTorchModelHubMixin
from PIL import Image

from engine import Task, TrainConfig, Trainer
from engine.optim import build_adamw
from engine.preemption import EXIT_PREEMPTED, PREEMPTED_MARKER
from engine.schedule import warmup_cosine
from engine.setup import RunDir
from pipeline.loading import STOP_SIGNALS, build_loader
from pipeline.samples import TensorSamples
from pipeline.sampling import EpochChain
from pipeline.shards import build_step_sampler


class Regression(Task):
    """Fit y = x @ w + noise with a linear layer; a NaN loss at the steps in ``bad_steps``; SIGTERM to this process
    after step ``stop_after``."""

    name, script = "toy", "toy.py"

    def __init__(self, args, bad_steps=(), stop_after=None):  # args: per_gpu_batch_size, accumulation, seed
        self.args, self.bad_steps, self.stop_after, self.step = args, set(bad_steps), stop_after, 0
        self.evaluations = []

    def build(self, accelerator):
        generator = torch.Generator().manual_seed(0)
        inputs = torch.randn(64, 4, generator=generator)
        targets = inputs @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(64, generator=generator)
        self.samples = TensorSamples(inputs, torch.zeros(64))
        self.targets = targets
        torch.manual_seed(0)
        model = Linear(4, 1)
        args = self.args
        sampler = build_step_sampler(self.samples, args.per_gpu_batch_size, args.gradient_accumulation_steps,
                                     accelerator.num_processes, accelerator.process_index, args.seed)
        loader = build_loader(IndexedSamples(self.samples), EpochChain(sampler), 0, accelerator.device)
        return model, build_adamw([{"params": model.parameters(), "weight_decay": 0.0}], 0.1), sampler, loader

    def learning_rate(self, step, total_steps, steps_per_epoch):
        return warmup_cosine(step, total_steps, 2, 0.5)

    def step_values(self, step, steps_per_epoch):
        self.step = step + 1
        return {}

    def loss(self, model, batch, values):
        loss = F.mse_loss(model(batch["pixel_values"]).squeeze(-1), self.targets[batch["index"]])
        if self.step in self.bad_steps:
            loss = loss * float("nan")
        return loss, {}

    def after_step(self, model):
        if self.step == self.stop_after:
            os.kill(os.getpid(), signal.SIGTERM)

    def evaluate(self, model, step):
        self.evaluations.append(step)
        return {}


class Linear(torch.nn.Linear, PyTorchModelHubMixin):
    """A linear layer that saves like the project's models (config.json + model.safetensors)."""


class IndexedSamples(torch.utils.data.Dataset):
    """The samples with their index, so the loss can look up the target."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        return {**self.samples[key], "index": key[0]}


def fit(tmp_path, name, bad_steps=(), stop_after=None, **overrides):
    """One run of the toy task in this process; returns (exit code, metrics rows, final weights, task)."""
    config = TrainConfig(**{"epochs": 2, "log_every": 1, "keep_checkpoints": 0, **overrides})
    run_dir = RunDir(tmp_path / name)
    handlers = {stop: signal.getsignal(stop) for stop in STOP_SIGNALS}
    batches = argparse.Namespace(per_gpu_batch_size=8, gradient_accumulation_steps=config.gradient_accumulation_steps,
                                 seed=0)
    task = Regression(batches, bad_steps, stop_after)
    code = 0
    try:
        Trainer(config, Accelerator(cpu=True), run_dir, task).fit()
    except SystemExit as stop:
        code = stop.code
    finally:
        for stop, handler in handlers.items():
            signal.signal(stop, handler)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    rows = [json.loads(line) for line in run_dir.metrics.read_text().splitlines()] if run_dir.metrics.exists() else []
    weights = None
    if (run_dir.final / "model.safetensors").exists():
        from safetensors.torch import load_file

        weights = load_file(run_dir.final / "model.safetensors")
    return code, [{k: v for k, v in row.items() if k != "images_per_sec"} for row in rows], weights, task


def test_a_preempted_run_resumes_to_the_same_weights_and_rows(tmp_path):
    _, whole_rows, whole, task = fit(tmp_path, "whole")
    assert len(whole_rows) == 16 and whole_rows[-1]["loss"] < whole_rows[0]["loss"] / 4  # it learns
    assert task.evaluations == [8, 16]  # once per epoch
    assert Image.open(tmp_path / "whole" / "curves.png").size == (480, 400)  # loss and lr, one panel each
    code, _, weights, _ = fit(tmp_path, "stopped", stop_after=5)
    checkpoints = tmp_path / "stopped" / "checkpoints"
    assert code == EXIT_PREEMPTED and weights is None
    assert (checkpoints / PREEMPTED_MARKER).read_text() == "5\n"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000005"]
    code, rows, again, task = fit(tmp_path, "stopped", resume_from_checkpoint="auto")
    assert code == 0 and rows == whole_rows and task.evaluations == [8, 16]
    assert all(torch.equal(whole[key], again[key]) for key in whole)
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000005", "step_00000008", "step_00000016"]


def test_a_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_resumes(tmp_path):
    _, whole_rows, whole, _ = fit(tmp_path, "whole")
    fit(tmp_path, "stopped", stop_after=5, checkpointing_steps=2)
    checkpoints = tmp_path / "stopped" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000002", "step_00000004", "step_00000005"]
    weights = next((checkpoints / "step_00000005").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # cut short on disk after it was completed
    code, rows, again, _ = fit(tmp_path, "stopped", resume_from_checkpoint="auto", checkpointing_steps=2)
    assert code == 0 and (checkpoints / "damaged" / "step_00000005").is_dir()
    assert [row["step"] for row in rows] == [*range(1, 5), *range(5, 17)]  # steps 5 onwards again, from step 4
    assert rows[4:] == whole_rows[4:] and all(torch.equal(whole[key], again[key]) for key in whole)


def test_accumulation_equals_one_big_batch(tmp_path):
    _, rows, whole, _ = fit(tmp_path, "one")
    _, accumulated_rows, accumulated, _ = fit(tmp_path, "two", gradient_accumulation_steps=2)
    for row, other in zip(rows, accumulated_rows):
        assert row["loss"] == pytest.approx(other["loss"], rel=1e-5)
    for key in whole:
        torch.testing.assert_close(whole[key], accumulated[key])


def test_non_finite_steps_are_skipped_and_too_many_stop_the_run(tmp_path):
    _, rows, _, _ = fit(tmp_path, "skips", bad_steps={3, 4}, checkpointing_steps=1)
    assert [row["step"] for row in rows] == [1, 2, *range(5, 17)]  # a skipped step gets no row
    checkpoints = sorted(p.name for p in (tmp_path / "skips" / "checkpoints").glob("step_*"))
    assert "step_00000003" not in checkpoints and "step_00000004" not in checkpoints and "step_00000005" in checkpoints
    _, clean_rows, _, _ = fit(tmp_path, "clean")
    assert rows[:2] == clean_rows[:2] and rows[2]["loss"] != clean_rows[4]["loss"]  # two updates fewer
    _, _, _, _ = fit(tmp_path, "epoch_end", bad_steps={8})  # an epoch's last step skipped: still checkpointed
    assert sorted(p.name for p in (tmp_path / "epoch_end" / "checkpoints").glob("step_*")) == ["step_00000008",
                                                                                              "step_00000016"]
    code, rows, weights, _ = fit(tmp_path, "boom", bad_steps=set(range(3, 17)), max_bad_steps=3, checkpointing_steps=1)
    assert "3 consecutive steps had a non-finite loss" in str(code) and weights is None
    assert [row["step"] for row in rows] == [1, 2]
    assert sorted(p.name for p in (tmp_path / "boom" / "checkpoints").glob("step_*")) == ["step_00000001",
                                                                                         "step_00000002"]


def test_the_loop_settings_are_checked_once_and_frozen():
    import dataclasses

    from utils.errors import UserError

    with pytest.raises(UserError, match="no length: pass --epochs or --max_train_steps"):
        TrainConfig()
    with pytest.raises(UserError, match="--log_every must be positive, got 0"):
        TrainConfig(epochs=1, log_every=0)
    config = TrainConfig.from_args(argparse.Namespace(epochs=3, log_every=5, per_gpu_batch_size=8))
    assert (config.epochs, config.log_every, config.max_grad_norm, config.max_train_steps) == (3, 5, 0.0, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 4


def test_curves_have_a_panel_per_logged_metric_and_follow_the_values(tmp_path):
    import numpy as np

    from utils.visualize import curves_picture

    rows = [{"step": step, "loss": 1.0 / step, "lr": 0.1} for step in range(1, 11)] + [{"step": 10, "top1": 50.0}]
    picture = np.asarray(curves_picture(rows, ["loss", "top1", "missing"]))
    assert picture.shape == (400, 480, 3)  # loss and top1; a metric no row has gets no panel
    blue = (picture == (31, 119, 180)).all(axis=-1)
    rows_with_line = np.flatnonzero(blue[:200].any(axis=1))
    columns_at_top = np.flatnonzero(blue[rows_with_line[0]])
    assert columns_at_top.min() < 100 and rows_with_line.max() > 150  # falling loss: starts high on the left, ends low
    code = os.system(f"cd {tmp_path} && python {ROOT / 'plot_curves.py'} {tmp_path} 2> err.txt")
    assert code != 0 and "metrics.jsonl does not exist" in (tmp_path / "err.txt").read_text()
