"""``--decode dali``: NVIDIA DALI's pipeline (run on the CPU here) cuts the loader's seeded windows, so its views are
the default path's within a grey level, a batch with a broken JPEG falls back to the per-image decode, and a resumed
run equals an uninterrupted one."""
import sys

import numpy as np
import pytest
import torch
from conftest import copy_stopped_after, read_metrics, run_in_process, run_script, without_timing
from PIL import Image
from torch.utils.data import DataLoader

from pipeline.datasets import build_image_dataset
from pipeline.samples import SeededSamples, collate_skipping_bad
from pipeline.sampling import StepBatchSampler
from pipeline.transforms import RandomResizedCropFlip

SMALL = ["--model", "mae_vit_tiny_patch4", "--img_size", 32, "--input_channels", 3, "--encoder_embed_dim", 32,
         "--encoder_depth", 1, "--encoder_num_heads", 2, "--decoder_embed_dim", 16, "--decoder_depth", 1,
         "--decoder_num_heads", 2, "--log_with", "none", "--seed", 1, "--vis_every", 0]


def photos(root, count: int, seed: int = 0):
    """Smooth, slightly noisy colour images of many sizes (every fifth grayscale, every seventh with an EXIF
    orientation, which every decode path ignores), as JPEGs in two class folders."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        size = (60 + 11 * index % 97, 80 + 17 * index % 113)
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size[::-1], Image.BICUBIC)
        noisy = np.clip(np.asarray(coarse, np.int16) + rng.integers(-12, 13, (*size, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(noisy).convert("L" if index % 5 == 2 else "RGB")
        exif = Image.Exif()
        if index % 7 == 3:
            exif[0x0112] = 3  # "rotated 180 degrees"
        (root / f"class{index % 2}").mkdir(parents=True, exist_ok=True)
        image.save(root / f"class{index % 2}" / f"{index:03d}.jpg", quality=90, exif=exif)


def first_batch(folder, decode: str, count: int, size: int = 48) -> dict:
    """The first ``count`` training samples of pretrain_mae.py's pipeline on the CPU, decoded as ``decode`` says."""
    from pipeline.loading import move_to_device

    base = build_image_dataset("folder", str(folder), "train", 3, size, encoded_jpeg=decode != "cpu")
    samples = SeededSamples(base, RandomResizedCropFlip(size), 7, 16)
    loader = DataLoader(samples, batch_sampler=StepBatchSampler(count, count, 1, seed=3),
                        collate_fn=collate_skipping_bad)
    return move_to_device(next(iter(loader)), torch.device("cpu"), decode=decode)


def assert_views_agree(views: torch.Tensor, expected: torch.Tensor) -> None:
    """DALI's bicubic resize rounds a little differently from torch's: one level on a few pixels in a hundred."""
    assert views.shape == expected.shape and views.dtype == torch.uint8
    apart = (views.int() - expected.int()).abs()
    assert apart.max() <= 2 and (apart > 0).float().mean() < 0.1 and (apart > 1).float().mean() < 1e-3, \
        (apart.max(), (apart > 0).float().mean())


def test_dali_views_are_the_default_paths_views(tmp_path, dali, caplog):
    photos(tmp_path, 24)
    plain, fused = first_batch(tmp_path, "cpu", 24), first_batch(tmp_path, "dali", 24)
    assert not [record for record in caplog.records if "DALI" in record.message]  # DALI made these views
    assert "jpeg" not in fused and "crop" not in fused
    assert_views_agree(fused["pixel_values"], plain["pixel_values"])
    assert torch.equal(fused["label"], plain["label"]) and torch.equal(fused["noise"], plain["noise"])
    shifted = torch.roll(plain["pixel_values"], 1, dims=0)  # another image's view is far apart: the test can fail
    assert (shifted.int() - fused["pixel_values"].int()).abs().float().mean() > 10


def test_a_jpeg_dali_cannot_decode_sends_the_batch_to_the_per_image_decode(tmp_path, dali):
    photos(tmp_path, 8)
    good = (tmp_path / "class0" / "000.jpg").read_bytes()
    (tmp_path / "class1" / "broken.jpg").write_bytes(good[:len(good) // 2])  # a readable header, truncated data
    plain, fused = first_batch(tmp_path, "cpu", 9), first_batch(tmp_path, "dali", 9)
    assert plain["num_skipped"] == fused["num_skipped"] == 1 and len(fused["pixel_values"]) == 8
    assert torch.equal(fused["label"], plain["label"]) and torch.equal(fused["noise"], plain["noise"])
    assert_views_agree(fused["pixel_values"], plain["pixel_values"])  # this batch went through decode_jpeg


def run_pretraining(folder, run_dir, name: str, decode: str, *extra):
    return run_script("pretrain_mae.py", "--path_to_data", folder, "--working_directory", run_dir, "--experiment_name",
                      name, "--decode", decode, "--per_gpu_batch_size", 8, "--max_train_steps", 8, "--log_every", 2,
                      "--checkpointing_steps", 3, "--keep_checkpoints", 0, "--warmup_epochs", 1, *extra, *SMALL)


@pytest.mark.parametrize("decode", ["dali", pytest.param("device", marks=pytest.mark.slow),
                                    pytest.param("cpu", marks=pytest.mark.slow)])
def test_a_resumed_run_equals_an_uninterrupted_one_with_each_decode(tmp_path, decode, request):
    """20 JPEGs, 8 per step: steps 1-8 cross three epoch boundaries; the resume at step 6 is mid-epoch."""
    if decode == "dali":
        request.getfixturevalue("dali")
    photos(tmp_path / "images", 20, seed=4)
    run_pretraining(tmp_path / "images", tmp_path, "whole", decode)
    copy_stopped_after(tmp_path / "whole", tmp_path / "resumed", 6)
    result = run_pretraining(tmp_path / "images", tmp_path, "resumed", decode, "--resume_from_checkpoint", "latest")
    assert "step_00000006 at step 6" in result.stderr
    whole, resumed = (without_timing(read_metrics(tmp_path / name)) for name in ("whole", "resumed"))
    assert [row["step"] for row in whole] == [2, 4, 6, 8] and resumed == whole  # bit-identical
    if decode == "dali":  # the same samples as the workers' decode: losses within the views' rounding
        run_pretraining(tmp_path / "images", tmp_path, "workers", "cpu")
        workers = read_metrics(tmp_path / "workers")
        assert all(abs(a["loss"] - b["loss"]) < 2e-3 for a, b in zip(workers, whole)), (workers, whole)


def test_decode_dali_without_dali_installed_is_a_one_line_error(tmp_path, monkeypatch):
    photos(tmp_path / "images", 4)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import nvidia.dali now raises ImportError
    code, stderr = run_in_process("pretrain_mae.py", "--path_to_data", tmp_path / "images", "--working_directory",
                                  tmp_path, "--decode", "dali", "--max_train_steps", 1, "--per_gpu_batch_size", 4,
                                  *SMALL)
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, stderr
    assert lines[0].startswith("pretrain_mae.py: error: --decode dali needs NVIDIA DALI, which is not installed: "
                               "pip install nvidia-dali-cuda130"), stderr


def test_dali_batches_made_ahead_in_a_thread_are_the_inline_ones(tmp_path, dali):
    """--decode dali --decode_ahead: the pipeline is driven from the thread of each epoch in turn."""
    from pipeline.loading import DeviceBatches, build_loader

    photos(tmp_path, 16, seed=2)
    base = build_image_dataset("folder", str(tmp_path), "train", 3, 32, encoded_jpeg=True)
    sampler = StepBatchSampler(len(base), 8, 2, seed=4)
    loader = build_loader(SeededSamples(base, RandomResizedCropFlip(32), 7, 16), sampler, 1, torch.device("cpu"))

    def epochs(ahead: bool) -> list:
        batches, taken = DeviceBatches(loader, torch.device("cpu"), ahead=ahead, decode="dali"), []
        for epoch in range(2):
            batches.close()
            sampler.set_epoch(epoch)
            taken += list(batches)
        batches.close()
        return taken

    inline, ahead = epochs(False), epochs(True)
    loader.close()
    assert len(inline) == len(ahead) == 8
    for expected, batch in zip(inline, ahead):
        assert torch.equal(batch["pixel_values"], expected["pixel_values"])
        assert torch.equal(batch["noise"], expected["noise"])


def test_dali_failing_batch_after_batch_hands_over_to_decode_jpeg(tmp_path, dali, monkeypatch, caplog):
    """Not a bad JPEG but DALI itself failing (memory, a library): after GIVE_UP_AFTER batches in a row, one
    warning and decode_jpeg from then on; every batch still comes, with the default path's views."""
    from pipeline import dali_decode

    photos(tmp_path, 8)
    monkeypatch.setattr(dali_decode, "_FAILURES", {"in_a_row": 0, "given_up": False})
    monkeypatch.setattr(dali_decode.DaliCrops, "__call__", lambda self, *args: (_ for _ in ()).throw(
        RuntimeError("CUDA out of memory in DALI's pool")))
    plain = first_batch(tmp_path, "device", 8)
    for _ in range(dali_decode.GIVE_UP_AFTER + 2):
        batch = first_batch(tmp_path, "dali", 8)
        assert torch.equal(batch["pixel_values"], plain["pixel_values"])  # decode_jpeg's views exactly
    assert dali_decode._FAILURES["given_up"]
    assert sum("decode_jpeg decodes from here on" in record.message for record in caplog.records) == 1
