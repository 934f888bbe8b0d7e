"""End-to-end runs of pretrain_mae.py on real Fashion-MNIST images, each in a fresh process (except the
argument-error checks, which call main() in the pytest process)."""
import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import (copy_stopped_after, read_metrics, run_in_process, run_script, sigterm_script, without_key_bias,
                      without_timing)
from models import MaskedAutoencoder

# A small model so that every run takes seconds on two cores.
SMALL = ["--encoder_embed_dim", 64, "--encoder_depth", 2, "--encoder_num_heads", 2, "--decoder_embed_dim", 32,
         "--decoder_depth", 1, "--decoder_num_heads", 2, "--log_with", "none", "--seed", 1]


def test_loss_decreases_on_fashion_mnist_and_outputs_are_written(tmp_path, fashion_mnist_dir):
    run_script("pretrain_mae.py", "--working_directory", tmp_path, "--experiment_name", "short", "--max_samples", 4096,
               "--per_gpu_batch_size", 64, "--epochs", 2, "--warmup_epochs", 0.1, "--base_learning_rate", 2e-3,
               "--log_every", 1, "--vis_every", 1, *SMALL)
    run = tmp_path / "short"
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 129))
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    assert {"step", "epoch", "loss", "lr", "images_per_sec"} <= set(rows[0])
    assert rows[-1]["epoch"] == 2.0 and rows[-1]["images_per_sec"] > 0
    assert len(list((run / "reconstructions").glob("epoch_*.png"))) == 2
    validation = read_metrics(run, reconstruction_rows=True)  # fixed images and masks, at each picture
    assert [r["step"] for r in validation] == [64, 128]
    assert validation[-1]["val_loss"] < validation[0]["val_loss"] and validation[-1]["val_psnr_masked"] > 10
    assert validation[-1]["val_psnr_masked"] > validation[0]["val_psnr_masked"] and validation[-1]["val_hf_error"] > 0
    args = json.loads((run / "args.json").read_text())
    assert args["model"] == "mae_vit_tiny_patch4" and args["dataset"] == "fashion_mnist" and args["input_channels"] == 1
    model = MaskedAutoencoder.from_pretrained(run / "final")
    assert model.encoder.embed_dim == 64 and len(model.encoder.blocks) == 2
    final_weights = load_file(run / "final" / "model.safetensors")
    checkpoint = load_file(run / "checkpoints" / "step_00000128" / "model.safetensors")
    assert final_weights.keys() == checkpoint.keys()
    assert all(torch.equal(final_weights[k], checkpoint[k]) for k in final_weights)


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run(tmp_path, fashion_mnist_dir):
    # 32 samples, 8 per step: 4 steps per epoch; 10 steps cross two epoch boundaries; step 6 is mid-epoch.
    common = ["--working_directory", tmp_path, "--max_samples", 32, "--per_gpu_batch_size", 8,
              "--gradient_accumulation_steps", 2, "--max_train_steps", 10, "--warmup_epochs", 1, "--log_every", 4,
              "--checkpointing_steps", 3, "--keep_checkpoints", 0, "--vis_every", 0, "--max_grad_norm", 1.0, *SMALL]
    run_script("pretrain_mae.py", "--experiment_name", "full", *common)
    full = tmp_path / "full"
    resumed = copy_stopped_after(full, tmp_path / "resumed", 6)
    result = run_script("pretrain_mae.py", "--experiment_name", "resumed", "--resume_from_checkpoint", "latest", *common)
    assert "step_00000006 at step 6" in result.stderr  # resumed mid-epoch (a fresh start would give the same rows)
    full_rows, resumed_rows = read_metrics(full), read_metrics(resumed)
    # Rows every 4 steps: the one at step 8 averages steps 5-8 across the resume at step 6.
    assert [r["step"] for r in resumed_rows] == [4, 8, 10]
    assert [r["loss"] for r in resumed_rows] == [r["loss"] for r in full_rows]  # bit-identical
    assert [r["lr"] for r in resumed_rows] == [r["lr"] for r in full_rows]
    a, b = load_file(full / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path, fashion_mnist_dir):
    common = ["--working_directory", tmp_path, "--max_samples", 64, "--max_train_steps", 6, "--warmup_epochs", 0.5,
              "--log_every", 1, "--vis_every", 0, "--gradient_accumulation_steps", 2, *SMALL]
    run_script("pretrain_mae.py", "--experiment_name", "one", "--per_gpu_batch_size", 16, *common)
    run_script("pretrain_mae.py", "--experiment_name", "two", "--per_gpu_batch_size", 8, *common, processes=2)
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert len(one) == len(two) == 6
    for a, b in zip(one, two):
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
    wa = load_file(tmp_path / "one" / "final" / "model.safetensors")
    wb = load_file(tmp_path / "two" / "final" / "model.safetensors")
    for key in wa:
        torch.testing.assert_close(without_key_bias(key, wa[key]), without_key_bias(key, wb[key]), rtol=1e-3, atol=1e-5)


def test_non_finite_loss_stops_the_run_keeping_the_last_checkpoint(tmp_path, fashion_mnist_dir):
    result = run_script("pretrain_mae.py", "--working_directory", tmp_path, "--experiment_name", "boom",
                        "--max_samples", 64, "--per_gpu_batch_size", 8, "--max_train_steps", 40, "--warmup_epochs", 0,
                        "--base_learning_rate", 1e12, "--checkpointing_steps", 1, "--keep_checkpoints", 0,
                        "--max_bad_steps", 3, "--log_every", 1, "--vis_every", 0, *SMALL, check=False)
    assert result.returncode != 0
    assert "consecutive steps had a non-finite loss" in result.stderr and "Traceback" not in result.stderr
    # Step 1's loss is finite (computed before its update) and checkpointed; its huge update blows the weights
    # up, so steps 2-4 are skipped, never applied, and the run stops after 3 in a row with its step-1 checkpoint intact.
    rows = read_metrics(tmp_path / "boom")
    assert [r["step"] for r in rows] == [1] and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert result.stderr.count("skipped: non-finite loss") == 3
    checkpoints = sorted(p.name for p in (tmp_path / "boom" / "checkpoints").glob("step_*"))
    assert checkpoints == ["step_00000001"]
    assert not (tmp_path / "boom" / "final").exists()


@pytest.mark.parametrize("flags,message", [
    (["--img_size", 30], "img_size 30x30 is not divisible by patch_size 4"),
    (["--per_gpu_batch_size", 10, "--gradient_accumulation_steps", 4], "not divisible by --gradient_accumulation_steps 4"),
    (["--path_to_data", "/nonexistent/images"], "--path_to_data /nonexistent/images is not a folder"),
    (["--encoder_embed_dim", 30], "embed_dim must be divisible by 4"),
    (["--resume_from_checkpoint", "/nonexistent/ckpt"], "is not a complete checkpoint folder"),
    (["--mask_ratio", 1.5], "--mask_ratio must be between 0 and 1 (exclusive), got 1.5"),
    (["--mask_ratio", 0], "--mask_ratio must be between 0 and 1 (exclusive), got 0"),
    (["--patch_size", 0], "--patch_size must be positive, got 0"),
    (["--encoder_depth", -1], "--encoder_depth must be positive, got -1"),
    (["--max_train_steps", 0], "--max_train_steps must be positive, got 0"),
    (["--dataset", "folder"], "--dataset folder needs --path_to_data DIR"),
    (["--log_with", "wandb"], None),  # fine when wandb is installed; a one-line install hint when not
])
def test_bad_arguments_give_one_line_errors(tmp_path, flags, message, fashion_mnist_dir):
    if message is None:
        if importlib.util.find_spec("wandb") is not None:
            pytest.skip("wandb is installed")
        message = "needs the wandb package: pip install wandb"
    code, stderr = run_in_process("pretrain_mae.py", "--working_directory", tmp_path, "--max_train_steps", 1,
                                  "--max_samples", 16, "--per_gpu_batch_size", 8, "--vis_every", 0, "--log_with",
                                  "none", *flags)
    assert code == 2, stderr
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("pretrain_mae.py: error:"), stderr


def test_a_bad_argument_on_the_command_line_is_one_line_without_a_traceback(tmp_path):
    result = run_script("pretrain_mae.py", "--working_directory", tmp_path, "--img_size", 30, "--max_train_steps", 1,
                        "--max_samples", 16, "--log_with", "none", check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == "pretrain_mae.py: error: img_size 30x30 is not divisible by patch_size 4: choose " \
                                    "an image size that is a multiple of 4", result.stderr


def test_fresh_start_refuses_to_overwrite_an_earlier_run(tmp_path, fashion_mnist_dir):
    marker = tmp_path / "earlier" / "checkpoints" / "step_00000005"
    marker.mkdir(parents=True)
    (marker / "COMPLETE").write_text("ok")
    result = run_script("pretrain_mae.py", "--working_directory", tmp_path, "--experiment_name", "earlier",
                        "--max_train_steps", 1, "--max_samples", 16, "--per_gpu_batch_size", 8, *SMALL, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "already holds checkpoints of an earlier run: continue it with --resume_from_checkpoint latest" in result.stderr
    assert marker.exists()


def test_bf16_norm_pix_loss_run_with_accumulation(tmp_path, fashion_mnist_dir, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # as accelerate launch with fsdp.yaml sets it, here on a CPU
    result = run_script("pretrain_mae.py", "--working_directory", tmp_path, "--experiment_name", "bf16", "--max_samples",
                        64, "--per_gpu_batch_size", 16, "--gradient_accumulation_steps", 2, "--max_train_steps", 4,
                        "--mixed_precision", "bf16", "--norm_pix_loss", "--log_every", 1, "--vis_every", 1, *SMALL)
    assert "asks for FSDP, but accelerate runs FSDP only on GPUs: this run on cpu is one process" in result.stderr
    rows = read_metrics(tmp_path / "bf16")
    assert len(rows) == 4 and all(0.0 < r["loss"] < 10.0 for r in rows)
    model = MaskedAutoencoder.from_pretrained(tmp_path / "bf16" / "final")
    assert model.norm_pix_loss and next(model.parameters()).dtype == torch.float32
    assert list((tmp_path / "bf16" / "reconstructions").glob("*.png"))


@pytest.mark.parametrize("suffix, decode", [("png", "cpu"), ("jpg", "device"), ("jpg", "ahead")])
def test_a_corrupt_image_is_skipped_during_a_run(tmp_path, suffix, decode):
    import numpy as np
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(15):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(images / f"{i:02d}.{suffix}")
    (images / f"15.{suffix}").write_bytes(b"not an image")
    result = run_script("pretrain_mae.py", "--working_directory", tmp_path, "--experiment_name", "corrupt",
                        "--path_to_data", images, "--model", "mae_vit_tiny_patch4", "--img_size", 32,
                        "--input_channels", 3, "--per_gpu_batch_size", 8, "--epochs", 1, "--log_every", 1,
                        "--vis_every", 0, *(["--decode", "device", "--decode_ahead", "--num_workers", 2]
                                            if decode == "ahead" else ["--decode", decode]), *SMALL)
    rows = read_metrics(tmp_path / "corrupt")
    assert [r["step"] for r in rows] == [1, 2] and rows[-1]["skipped_images"] == 1
    assert "skipping unreadable image" in result.stderr and "1 unreadable images were skipped" in result.stderr


@pytest.mark.slow
def test_pretraining_continues_from_an_official_checkpoint(tmp_path, fashion_mnist_dir):
    """--resume_from_pretrained with a facebookresearch/mae-style .pth: the run starts from those weights (at a
    learning rate of ~0 they come out unchanged) with the checkpoint's sizes, not the preset's."""
    torch.manual_seed(5)
    source = MaskedAutoencoder(img_size=28, patch_size=4, in_chans=1, embed_dim=64, depth=2, num_heads=2,
                               decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    state = {key.removeprefix("encoder."): value for key, value in source.state_dict().items()}
    torch.save({"model": state, "epoch": 10}, tmp_path / "checkpoint-10.pth")
    run_script("pretrain_mae.py", "--working_directory", tmp_path, "--experiment_name", "continued",
               "--resume_from_pretrained", tmp_path / "checkpoint-10.pth", "--encoder_num_heads", 2,
               "--decoder_num_heads", 2, "--max_train_steps", 1, "--max_samples", 64, "--per_gpu_batch_size", 32,
               "--base_learning_rate", 1e-12, "--log_with", "none")
    continued = MaskedAutoencoder.from_pretrained(tmp_path / "continued" / "final")
    assert continued.encoder.embed_dim == 64 and len(continued.decoder_blocks) == 1
    for key, value in source.state_dict().items():
        torch.testing.assert_close(continued.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)


@pytest.mark.slow
def test_compiled_and_checkpointed_runs_match_eager(tmp_path, fashion_mnist_dir):
    """--compile (torch.compile of the blocks and the regions between them) and --gradient_checkpointing change speed
    and memory, not results: the losses of a short run match the eager run's, and the saved weights keep their
    names. The mask-ratio curriculum varies the encoder's token count every few steps; it must not break the
    compiled run."""
    common = ["--max_samples", 256, "--per_gpu_batch_size", 32, "--max_train_steps", 8, "--log_every", 1,
              "--vis_every", 0, "--mask_ratio_start", 0.5, "--mask_curriculum_epochs", 1, *SMALL]
    for name, extra in (("eager", []), ("compiled", ["--compile"]), ("checkpointed", ["--gradient_checkpointing"])):
        run_script("pretrain_mae.py", "--working_directory", tmp_path, "--experiment_name", name, *common, *extra,
                   timeout=600)
    eager = [r["loss"] for r in read_metrics(tmp_path / "eager")]
    assert len(eager) == 8
    assert [r["loss"] for r in read_metrics(tmp_path / "checkpointed")] == pytest.approx(eager, rel=1e-5)
    assert [r["loss"] for r in read_metrics(tmp_path / "compiled")] == pytest.approx(eager, rel=2e-3)
    weights = {name: load_file(tmp_path / name / "final" / "model.safetensors") for name in ("eager", "compiled")}
    assert weights["eager"].keys() == weights["compiled"].keys()
    for key, value in weights["eager"].items():
        torch.testing.assert_close(weights["compiled"][key], value, rtol=1e-2, atol=1e-3)


@pytest.mark.slow
def test_repeated_sigterms_and_auto_resumes_equal_an_uninterrupted_run(tmp_path, fashion_mnist_dir):
    """SIGTERM mid-run, three times: each time the run finishes its optimizer step, writes a checkpoint and exits
    with code 75; the same command with --resume_from_checkpoint auto continues, and in the end the rows and the
    weights are exactly those of a run never stopped."""
    common = ["--max_samples", 512, "--per_gpu_batch_size", 32, "--epochs", 12, "--log_every", 1, "--vis_every", 4,
              "--resume_from_checkpoint", "auto", *SMALL]
    run_script("pretrain_mae.py", "--working_directory", tmp_path, "--experiment_name", "whole", *common)
    stopped = ["--working_directory", tmp_path, "--experiment_name", "stopped", *common]
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    done = 0
    for rows_before_stop in (20, 60, 110):
        returncode, stderr = sigterm_script(
            "pretrain_mae.py", *stopped,
            ready=lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= rows_before_stop)
        assert returncode == 75, stderr[-2000:]
        assert "--resume_from_checkpoint auto" in stderr
        stopped_rows = read_metrics(tmp_path / "stopped")
        assert done < stopped_rows[-1]["step"] < 192  # it trained further, and stopped part-way (192 steps in all)
        done = stopped_rows[-1]["step"]
        checkpoints = sorted((tmp_path / "stopped" / "checkpoints").glob("step_*"))
        assert checkpoints[-1].name == f"step_{done:08d}"  # a checkpoint at the step it stopped
        assert (tmp_path / "stopped" / "checkpoints" / "PREEMPTED").read_text() == f"{done}\n"  # for job scripts
        assert not (tmp_path / "stopped" / "final").exists()

    run_script("pretrain_mae.py", *stopped)  # the same command line, requeued
    assert not (tmp_path / "stopped" / "checkpoints" / "PREEMPTED").exists()  # cleared when it started again
    whole, resumed = without_timing(read_metrics(tmp_path / "whole")), without_timing(read_metrics(tmp_path / "stopped"))
    assert resumed == whole  # bit-identical losses, learning rates and gradient norms, step by step
    assert read_metrics(tmp_path / "stopped", reconstruction_rows=True) == read_metrics(tmp_path / "whole",
                                                                                      reconstruction_rows=True)
    for name, tensor in load_file(tmp_path / "whole" / "final" / "model.safetensors").items():
        assert torch.equal(tensor, load_file(tmp_path / "stopped" / "final" / "model.safetensors")[name]), name
