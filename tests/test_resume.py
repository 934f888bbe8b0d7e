"""Runs that die or move: a kill during a checkpoint write, and resuming on 2 processes or on another count."""
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, copy_stopped_after, read_metrics, run_script, without_timing
from safetensors.torch import load_file

SMALL = ["--encoder_embed_dim", 64, "--encoder_depth", 2, "--encoder_num_heads", 2, "--decoder_embed_dim", 32,
         "--decoder_depth", 1, "--decoder_num_heads", 2, "--log_with", "none", "--seed", 1, "--vis_every", 0]

# Runs a script with accelerate's save_state replaced: the Nth save is written, one of its files is cut to half its
# size (as a kill part-way through would leave it), and the process is SIGKILLed before the checkpoint is complete.
DIE_WHILE_SAVING = """
import os, runpy, signal, sys
from pathlib import Path

import accelerate

save_state, saves = accelerate.Accelerator.save_state, []


def save_state_then_die(self, output_dir=None, **kwargs):
    result = save_state(self, output_dir, **kwargs)
    saves.append(output_dir)
    if len(saves) == int(os.environ["DIE_AT_SAVE"]):
        for written in Path(output_dir).glob("*.safetensors"):
            written.write_bytes(written.read_bytes()[: written.stat().st_size // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return result


accelerate.Accelerator.save_state = save_state_then_die
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def final_weights(run) -> dict:
    return load_file(run / "final" / "model.safetensors")


@pytest.mark.slow
def test_a_kill_during_a_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, fashion_mnist_dir):
    # 64 samples, 8 per step: 8 steps; checkpoints at steps 2, 4, 6 and 8; the kill hits the write of step 4's
    common = ["--working_directory", tmp_path, "--max_samples", 64, "--per_gpu_batch_size", 8, "--epochs", 1,
              "--checkpointing_steps", 2, "--keep_checkpoints", 1, "--log_every", 1, *SMALL]
    run_script("pretrain_mae.py", "--experiment_name", "whole", *common)
    killed = ["--experiment_name", "killed", "--resume_from_checkpoint", "auto", *common]
    wrapper = tmp_path / "die_while_saving.py"
    wrapper.write_text(DIE_WHILE_SAVING)
    result = subprocess.run([sys.executable, str(wrapper), str(ROOT / "pretrain_mae.py"), *map(str, killed)], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT), DIE_AT_SAVE="2"), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    checkpoints = tmp_path / "killed" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [".partial_step_00000004", "step_00000002"]

    resumed = run_script("pretrain_mae.py", *killed)  # the same command, requeued
    assert "step_00000002 at step 2" in resumed.stderr  # the half-written checkpoint was not loaded
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000008"]  # cleaned up; keep-K kept the last
    whole, again = final_weights(tmp_path / "whole"), final_weights(tmp_path / "killed")
    assert all(torch.equal(whole[k], again[k]) for k in whole)
    assert without_timing(read_metrics(tmp_path / "killed")) == without_timing(read_metrics(tmp_path / "whole"))


@pytest.mark.slow
def test_damaged_checkpoints_are_set_aside_and_the_run_resumes_from_the_last_good_one(tmp_path, fashion_mnist_dir):
    # 8 steps, checkpoints at 2, 4, 6, 8, all kept; then step 8's weights are cut short and one byte of step 6's
    # optimizer state is changed, as a disk or a copy could do long after the saves completed
    common = ["--working_directory", tmp_path, "--experiment_name", "run", "--max_samples", 64, "--per_gpu_batch_size", 8,
              "--epochs", 1, "--checkpointing_steps", 2, "--keep_checkpoints", 0, "--log_every", 1, *SMALL]
    run_script("pretrain_mae.py", *common)
    run, checkpoints = tmp_path / "run", tmp_path / "run" / "checkpoints"
    whole = final_weights(run)
    weights = checkpoints / "step_00000008" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    optimizer_state = next((checkpoints / "step_00000006").glob("optimizer*"))
    data = bytearray(optimizer_state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    optimizer_state.write_bytes(bytes(data))

    explicit = run_script("pretrain_mae.py", *common, "--resume_from_checkpoint", checkpoints / "step_00000008", check=False)
    assert explicit.returncode != 0 and "Traceback" not in explicit.stderr
    assert "step_00000008 is damaged" in explicit.stderr and "model.safetensors has" in explicit.stderr

    resumed = run_script("pretrain_mae.py", *common, "--resume_from_checkpoint", "auto")
    assert "step_00000004 at step 4" in resumed.stderr and "SHA-256 mismatch" in resumed.stderr
    assert sorted(p.name for p in (checkpoints / "damaged").iterdir()) == ["step_00000006", "step_00000008"]
    assert [p.name for p in sorted(checkpoints.glob("step_*"))] == [f"step_{s:08d}" for s in (2, 4, 6, 8)]
    again = final_weights(run)  # steps 5-8 redone from step 4: the same weights as the first time
    assert all(torch.equal(whole[k], again[k]) for k in whole)


def test_a_run_whose_every_checkpoint_is_damaged_stops_instead_of_starting_afresh(tmp_path):
    from engine.checkpoint import DAMAGED_DIR, resolve_checkpoint, write_manifest
    from utils.errors import UserError

    for step in (2, 4):
        folder = tmp_path / f"step_{step:08d}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"weights" * 100)
        write_manifest(folder)
    assert resolve_checkpoint("auto", tmp_path) == tmp_path / "step_00000004"
    (tmp_path / "step_00000004" / "model.safetensors").write_bytes(b"weights" * 99 + b"weighs")  # same size, changed
    assert resolve_checkpoint("auto", tmp_path) == tmp_path / "step_00000002"
    (tmp_path / "step_00000002" / "model.safetensors").unlink()
    with pytest.raises(UserError, match="every checkpoint under .* is damaged"):
        resolve_checkpoint("latest", tmp_path)
    assert sorted(p.name for p in (tmp_path / DAMAGED_DIR).iterdir()) == ["step_00000002", "step_00000004"]
    assert resolve_checkpoint("auto", tmp_path / "elsewhere") is None  # no checkpoint yet: a fresh start


@pytest.mark.slow
def test_two_processes_resume_and_a_resume_on_one_process_reshards(tmp_path, fashion_mnist_dir):
    # 2 processes x 8 (2 micro-batches of 4) = 16 per step, 4 steps per epoch; checkpoints at 2, 4, 6; step 2 is
    # mid-epoch
    common = ["--working_directory", tmp_path, "--max_samples", 64, "--per_gpu_batch_size", 8,
              "--gradient_accumulation_steps", 2, "--max_train_steps", 6, "--warmup_epochs", 0.5,
              "--checkpointing_steps", 2, "--keep_checkpoints", 0, "--log_every", 1, *SMALL]
    run_script("pretrain_mae.py", "--experiment_name", "whole", *common, processes=2)
    whole = tmp_path / "whole"
    for name in ("two", "one"):
        copy_stopped_after(whole, tmp_path / name, 2)

    result = run_script("pretrain_mae.py", "--experiment_name", "two", "--resume_from_checkpoint", "auto", *common,
                        processes=2)
    assert "step_00000002 at step 2" in result.stderr
    assert without_timing(read_metrics(tmp_path / "two")) == without_timing(read_metrics(whole))  # bit-identical
    a, b = final_weights(whole), final_weights(tmp_path / "two")
    assert all(torch.equal(a[k], b[k]) for k in a)

    # The same command on one process: it keeps the global batch of 16 (one process x 16) and says so.
    result = run_script("pretrain_mae.py", "--experiment_name", "one", "--resume_from_checkpoint", "auto", *common)
    assert "resharding" in result.stderr and "each process now takes 16" in result.stderr
    rows, reference = read_metrics(tmp_path / "one"), read_metrics(whole)
    assert [r["step"] for r in rows] == [r["step"] for r in reference] == [1, 2, 3, 4, 5, 6]
    for row, expected in zip(rows, reference):
        assert row["lr"] == pytest.approx(expected["lr"], rel=1e-12)
        assert row["loss"] == pytest.approx(expected["loss"], rel=1e-4, abs=1e-6)  # same samples, same order
    b = final_weights(tmp_path / "one")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-5)


def test_resumed_layout_splits_the_checkpoint_batch_or_refuses(tmp_path):
    import argparse
    import json

    from engine.checkpoint import COMPLETE_MARKER, TRAINER_STATE, resolve_checkpoint, resumed_layout
    from utils.errors import UserError

    checkpoint = tmp_path / "step_00000002"
    checkpoint.mkdir()
    (checkpoint / COMPLETE_MARKER).write_text("ok\n")

    def resumed(processes, saved_processes=2, dataset="folder", per_gpu=8, accumulation=2, resume="auto"):
        state = {"step": 2, "global_batch": 16, "steps_per_epoch": 4}
        if saved_processes is not None:
            state["num_processes"] = saved_processes
        (checkpoint / TRAINER_STATE).write_text(json.dumps(state))
        args = argparse.Namespace(resume_from_checkpoint=resume, dataset=dataset, per_gpu_batch_size=per_gpu,
                                  gradient_accumulation_steps=accumulation)
        layout = resumed_layout(args, processes, resolve_checkpoint(resume, tmp_path) if resume else None)
        resumed.shard_resume = layout.get("shard_resume")
        return layout.get("per_gpu_batch_size", per_gpu)

    assert resumed(2) == 8  # same count: nothing changes
    assert resumed(1) == 16 and resumed(4) == 4  # the global batch of 16 is kept
    assert resumed(1, saved_processes=None) == 8  # a checkpoint from before the count was saved: as given
    assert resumed(1, resume=None) == 8  # a fresh start
    assert resumed(8) == 2  # 2 per process = 2 micro-batches of 1
    for processes, accumulation in ((3, 1), (16, 2)):  # 16 / 3 is no whole batch; 1 image is no 2 micro-batches
        with pytest.raises(UserError, match="cannot share in whole micro-batches"):
            resumed(processes, accumulation=accumulation)
    assert resumed(1, dataset="shards") == 16  # tar shards: the epoch in progress keeps the 2 processes' layout
    assert resumed.shard_resume == {"steps_per_epoch": 4, "shard_layout": [0, 2]}
    assert resumed(2, dataset="shards") == 8 and resumed.shard_resume is None  # nothing to carry


def test_only_the_plain_ok_marker_skips_the_manifest_check(tmp_path):
    from engine.checkpoint import COMPLETE_MARKER, damage

    folder = tmp_path / "step_00000002"
    folder.mkdir()
    (folder / COMPLETE_MARKER).write_text("ok\n")  # written before markers listed the files
    assert damage(folder) is None
    for text in ("", "o", '{"file": {}}'):  # cut short by a crash, or not ours
        (folder / COMPLETE_MARKER).write_text(text)
        assert "marker can't be read" in damage(folder)
