"""Tar shards: make_shards.py, the byte-range reader (local and fsspec URLs) and the per-process shard sampler."""
import io
import json
import shutil
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import copy_stopped_after, read_metrics, run_script, without_timing
from PIL import Image
from safetensors.torch import load_file

from make_shards import main as make_shards
from pipeline.datasets import build_image_dataset
from pipeline.shards import ShardStepSampler, TarShardDataset, assign_shards
from utils.errors import DataError


def image_folder(root, counts=(("train", 30), ("val", 6)), seed=0):
    """ImageNet layout: train/ and val/ with three class folders; JPEGs, a few PNGs and an .npy array."""
    rng = np.random.default_rng(seed)
    for split, count in counts:
        for i in range(count):
            folder = root / split / f"class{i % 3}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)
            if i == 7:
                np.save(folder / f"{i:03d}.npy", pixels)
            else:
                Image.fromarray(pixels).save(folder / f"{i:03d}.{'png' if i % 5 == 0 else 'jpg'}")
    return root


def as_dict(dataset):
    """image bytes -> (decoded tensor, label) for every item, to compare data sets whatever their order."""
    items = {}
    for index in range(len(dataset)):
        image, label = dataset[index]
        items[image.numpy().tobytes()] = label
    return items


def test_shards_hold_every_image_and_label_of_the_folder(tmp_path):
    folder = image_folder(tmp_path / "images")
    make_shards(["--input_dir", str(folder), "--output_dir", f"file://{tmp_path}/shards", "--samples_per_shard", "4"])
    assert len(list((tmp_path / "shards" / "train").glob("shard-*.tar"))) == 8  # 30 images, 4 per shard
    for split in ("train", "val"):
        plain = build_image_dataset("folder", str(folder), split, 3, 32)
        sharded = build_image_dataset("shards", f"file://{tmp_path}/shards", split, 3, 32)
        assert isinstance(sharded, TarShardDataset) and sharded.classes == ["class0", "class1", "class2"]
        assert len(sharded) == len(plain)
        assert as_dict(sharded) == as_dict(plain)  # same pixels, same labels (images were copied, not re-encoded)
    assert build_image_dataset("shards", str(tmp_path / "shards"), "train", 3, 32, max_samples=9).shard_ranges == \
        [(0, 4), (4, 4), (8, 1)]


def test_shards_written_elsewhere_are_indexed(tmp_path):
    """webdataset's layout: <key>.jpg + <key>.cls, keys with folders in them, other members ignored."""
    (tmp_path / "wds").mkdir()
    rng = np.random.default_rng(1)
    expected = {}
    for shard in range(3):
        with tarfile.open(tmp_path / "wds" / f"part-{shard}.tar", "w") as tar:
            for i in range(5):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buffer, "PNG")
                label = (shard * 5 + i) % 4
                members = ((f"n{shard}/{i}.png", buffer.getvalue()), (f"n{shard}/{i}.cls", str(label).encode()),
                           (f"n{shard}/{i}.json", b"{}"), (f"n{shard}/{i}.seg.png", buffer.getvalue()))  # a mask
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                expected[np.asarray(Image.open(io.BytesIO(buffer.getvalue()))).transpose(2, 0, 1).tobytes()] = label
    with pytest.raises(DataError, match="make_shards.py --index_only"):
        TarShardDataset(str(tmp_path / "wds"), 3)
    make_shards(["--index_only", str(tmp_path / "wds")])
    dataset = TarShardDataset(str(tmp_path / "wds"), 3)
    assert len(dataset) == 15 and as_dict(dataset) == expected  # one image per key: the .seg.png is not one
    assert dataset.classes == ["0", "1", "2", "3"]  # named after the labels found


def test_reindexing_keeps_class_names_and_held_out_splits_are_required(tmp_path):
    folder = image_folder(tmp_path / "images", counts=(("train", 12),))
    make_shards(["--input_dir", str(folder), "--output_dir", str(tmp_path / "shards"), "--samples_per_shard", "5"])
    make_shards(["--index_only", str(tmp_path / "shards" / "train")])
    assert TarShardDataset(str(tmp_path / "shards" / "train"), 3).classes == ["class0", "class1", "class2"]
    with pytest.raises(DataError, match="no shards.json"):  # evaluation never falls back to training images
        build_image_dataset("shards", str(tmp_path / "shards"), "val", 3, 32, require_split=True)
    assert len(build_image_dataset("shards", str(tmp_path / "shards"), "val", 3, 32)) == 12  # pictures may


def test_jpegs_from_shards_decoded_on_the_device_give_the_folder_views(tmp_path):
    from pipeline.loading import move_to_device
    from pipeline.samples import SeededSamples, collate_skipping_bad
    from pipeline.transforms import RandomResizedCropFlip

    folder = image_folder(tmp_path / "images", counts=(("train", 10),), seed=4)
    make_shards(["--input_dir", str(folder), "--output_dir", str(tmp_path / "shards"), "--samples_per_shard", "4",
                 "--no_shuffle"])  # the folder's order: item i is the same image in both
    bases = {name: build_image_dataset(name, str(folder if name == "folder" else tmp_path / "shards"), "train", 3,
                                       16, encoded_jpeg=name == "shards") for name in ("folder", "shards")}
    jpegs = [i for i, record in enumerate(bases["folder"].records) if record.path.suffix == ".jpg"]
    for keys in (jpegs, range(10)):  # JPEGs only: decoded by decode_deferred; with the PNGs and the .npy: in the collate
        made = []
        for name, base in bases.items():
            samples = SeededSamples(base, RandomResizedCropFlip(16), 5, 4)
            batch = collate_skipping_bad([samples[(i, 2)] for i in keys])
            assert ("jpeg" in batch) == (name == "shards" and keys is jpegs)
            made.append(move_to_device(batch, torch.device("cpu")))
        assert torch.equal(made[0]["pixel_values"], made[1]["pixel_values"])
        assert torch.equal(made[0]["noise"], made[1]["noise"]) and torch.equal(made[0]["label"], made[1]["label"])


def test_each_process_reads_its_own_shards_and_every_sample_once_per_epoch():
    ranges = [(10 * n, 10) for n in range(8)]  # 8 shards of 10 samples
    samplers = [ShardStepSampler(ranges, 8, 2, num_processes=2, rank=rank, seed=3) for rank in range(2)]
    assert samplers[0].steps_per_epoch == 5 and samplers[0].global_batch == 16
    orders = []
    for epoch in range(2):
        seen = Counter()
        for rank, sampler in enumerate(samplers):
            sampler.set_epoch(epoch)
            batches = list(sampler)
            assert len(batches) == 10 and all(len(b) == 4 for b in batches)  # 5 steps x 2 micro-batches of 4
            keys = [key for batch in batches for key in batch]
            assert {e for _, e in keys} == {epoch}
            own = {i for shard in sampler.assignment[rank] for i in range(ranges[shard][0], sum(ranges[shard]))}
            assert {i for i, _ in keys} <= own  # only this process's shards
            seen.update(i for i, _ in keys)
            orders.append([i for i, _ in keys])
        assert seen == Counter(range(80))  # every sample exactly once per epoch, across the processes
    assert orders[0] != orders[2]  # reshuffled every epoch

    # resumed mid-epoch: exactly the batches the uninterrupted epoch still had to give, in the same order
    sampler = samplers[1]
    sampler.set_epoch(1)
    whole = list(sampler)
    sampler.set_epoch(1, start_step=3)
    assert list(sampler) == whole[3 * 2:]


def test_unequal_shards_give_every_process_the_same_number_of_steps():
    ranges = [(0, 30), (30, 7), (37, 12), (49, 5), (54, 20)]
    assignment = assign_shards(ranges, 2)
    assert sorted(sum(assignment, [])) == list(range(5))
    samplers = [ShardStepSampler(ranges, 5, 1, num_processes=2, rank=rank) for rank in range(2)]
    shares = [sum(ranges[n][1] for n in shards) for shards in assignment]
    assert samplers[0].steps_per_epoch == samplers[1].steps_per_epoch == min(shares) // 5
    assert [len(list(s)) for s in samplers] == [min(shares) // 5] * 2
    with pytest.raises(DataError, match="at least as many shards as processes"):
        ShardStepSampler(ranges[:1], 5, 1, num_processes=2)


@pytest.mark.slow
def test_pretraining_streams_shards_and_resumes_mid_epoch(tmp_path):
    folder = image_folder(tmp_path / "images", counts=(("train", 48),), seed=2)
    url = f"file://{tmp_path}/shards"
    make_shards(["--input_dir", str(folder), "--output_dir", url, "--samples_per_shard", "5"])
    # 48 images in 10 shards, 8 per step: 6 steps per epoch; 9 steps cross an epoch; step 4 is mid-epoch
    common = ["--working_directory", tmp_path, "--path_to_data", url, "--model", "mae_vit_tiny_patch4",
              "--img_size", 16, "--patch_size", 4, "--input_channels", 3, "--encoder_embed_dim", 32, "--encoder_depth", 1,
              "--encoder_num_heads", 2, "--decoder_embed_dim", 32, "--decoder_depth", 1, "--decoder_num_heads", 2,
              "--per_gpu_batch_size", 8, "--max_train_steps", 9, "--checkpointing_steps", 4, "--keep_checkpoints", 0,
              "--log_every", 1, "--vis_every", 0, "--log_with", "none", "--num_workers", 2]
    run_script("pretrain_mae.py", "--experiment_name", "full", *common)
    full = tmp_path / "full"
    assert json.loads((full / "args.json").read_text())["dataset"] == "shards"  # found by its shards.json
    assert read_metrics(full)[0]["epoch"] == round(1 / 6, 4)  # 6 steps per epoch
    resumed = copy_stopped_after(full, tmp_path / "resumed", 4)
    result = run_script("pretrain_mae.py", "--experiment_name", "resumed", "--resume_from_checkpoint", "auto", *common)
    assert "step_00000004 at step 4" in result.stderr  # it did resume mid-epoch (a fresh start would match too)
    assert without_timing(read_metrics(resumed)) == without_timing(read_metrics(full))  # bit-identical from step 5 on
    a, b = load_file(full / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_url_whose_filesystem_is_not_installed_is_a_one_line_error(monkeypatch):
    import fsspec

    def not_installed(url, **kwargs):  # what fsspec says for s3:// without s3fs
        raise ImportError("Install s3fs to access S3")

    monkeypatch.setattr(fsspec.core, "url_to_fs", not_installed)
    with pytest.raises(DataError, match="s3fs.*pip install"):
        build_image_dataset("shards", "s3://bucket/imagenet-shards", "train", 3, 32)


def test_a_truncated_shard_is_an_error_not_skipped_images(tmp_path):
    make_shards(["--input_dir", str(image_folder(tmp_path / "images", counts=(("train", 6),))), "--output_dir",
                 str(tmp_path / "shards"), "--samples_per_shard", "6"])
    shard = tmp_path / "shards" / "train" / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # an upload cut short
    dataset = TarShardDataset(str(tmp_path / "shards" / "train"), 3)
    last = max(range(6), key=lambda i: dataset.records[i][1])
    with pytest.raises(DataError, match="truncated shard"):
        dataset[last]
    with pytest.raises(DataError, match="truncated shard"):
        dataset.prefetch(list(range(6)))


def test_a_batch_of_shard_images_is_read_with_one_request(tmp_path, monkeypatch):
    """On an object store each request has tens of ms of latency: a batch's ranged reads go out together
    (fsspec's cat_ranges, concurrent on s3fs/gcsfs), and give what one-by-one reads give."""
    from torch.utils.data import DataLoader

    from pipeline.samples import SeededSamples, collate_skipping_bad
    from pipeline.sampling import StepBatchSampler
    from pipeline.transforms import RandomResizedCropFlip

    make_shards(["--input_dir", str(image_folder(tmp_path / "images", counts=(("train", 24),))), "--output_dir",
                 str(tmp_path / "shards"), "--samples_per_shard", "5"])
    samples = SeededSamples(TarShardDataset(str(tmp_path / "shards" / "train"), 3), RandomResizedCropFlip(16), 0, 4)
    one_by_one = [samples[(i, 0)] for i in range(24)]
    fs = samples.base.fs
    batches, cat_ranges = [], fs.cat_ranges
    monkeypatch.setattr(fs, "cat_ranges", lambda paths, *a, **k: batches.append(len(paths)) or cat_ranges(paths, *a, **k))
    reads, cat_file = [], fs.cat_file  # the local filesystem's cat_ranges reads range by range with cat_file
    monkeypatch.setattr(fs, "cat_file", lambda *a, **k: reads.append(a) or cat_file(*a, **k))
    loader = DataLoader(samples, batch_sampler=StepBatchSampler(24, 8, 1, shuffle=False), collate_fn=collate_skipping_bad)
    together = torch.cat([batch["pixel_values"] for batch in loader])
    assert batches == [8, 8, 8] and len(reads) == 24  # every image came through a batch's request, once
    assert torch.equal(together, torch.stack([sample["pixel_values"] for sample in one_by_one]))


def test_a_resume_on_another_process_count_keeps_the_epoch_in_progress():
    ranges = [(10 * n, 10) for n in range(8)]
    old = [ShardStepSampler(ranges, 4, 1, num_processes=2, rank=rank, seed=1) for rank in range(2)]
    for sampler in old:
        sampler.set_epoch(3)
    per_step = [[i for s in old for i, _ in list(s)[step]] for step in range(old[0].steps_per_epoch)]
    assert old[0].state_dict(3 * old[0].steps_per_epoch + 1) == {"shard_layout": [3, 2]}
    resume = {"steps_per_epoch": old[0].steps_per_epoch, "shard_layout": [3, 2]}
    for processes in (1, 4):  # stopped after step 2 of epoch 3, resumed on 1 and on 4 processes (global batch 8)
        new = [ShardStepSampler(ranges, 8 // processes, 1, num_processes=processes, rank=rank, seed=1, resume=resume)
               for rank in range(processes)]
        for sampler in new:
            sampler.set_epoch(3, start_step=2)
        batches = [list(sampler) for sampler in new]
        assert [[i for b in batches for i, _ in b[step]] for step in range(len(batches[0]))] == per_step[2:]
        # after step 2 of epoch 3: still the epoch the 2 processes laid out
        assert new[0].state_dict(3 * new[0].steps_per_epoch + 2) == {"shard_layout": [3, 2]}
        for sampler in new:
            sampler.set_epoch(4)  # the next epoch: the shards split over the new processes, the same step count
        assert new[0].state_dict(4 * new[0].steps_per_epoch + 1) == {"shard_layout": [4, processes]}
        # the sampler is in epoch 4 now (as a loader over an EpochChain runs ahead): the state is still its step's
        assert new[0].state_dict(3 * new[0].steps_per_epoch + 2) == {"shard_layout": [3, 2]}
        assert new[0].state_dict(4 * new[0].steps_per_epoch) == {"shard_layout": [3, 2]}  # the last step of epoch 3
        assert all(len(list(sampler)) == old[0].steps_per_epoch for sampler in new)
        seen = Counter(i for sampler in new for batch in sampler for i, _ in batch)
        assert set(seen) <= set(range(80)) and sum(seen.values()) == old[0].steps_per_epoch * 8


@pytest.mark.slow
def test_pretraining_from_shards_resumed_on_one_process_continues_the_epoch(tmp_path):
    url = f"file://{tmp_path}/shards"
    make_shards(["--input_dir", str(image_folder(tmp_path / "images", counts=(("train", 48),), seed=2)),
                 "--output_dir", url, "--samples_per_shard", "6"])  # 8 shards of 6: 24 images and 3 steps per process
    common = ["--working_directory", tmp_path, "--path_to_data", url, "--model", "mae_vit_tiny_patch4",
              "--img_size", 16, "--patch_size", 4, "--input_channels", 3, "--encoder_embed_dim", 32, "--encoder_depth", 1,
              "--encoder_num_heads", 2, "--decoder_embed_dim", 32, "--decoder_depth", 1, "--decoder_num_heads", 2,
              "--per_gpu_batch_size", 8, "--max_train_steps", 5, "--checkpointing_steps", 1, "--keep_checkpoints", 0,
              "--log_every", 1, "--vis_every", 0, "--log_with", "none",
              "--num_workers", 2]  # (the loader's prefetch takes the sampler into epoch 1 before step 1's checkpoint)
    run_script("pretrain_mae.py", "--experiment_name", "two", *common, processes=2)
    two = tmp_path / "two"
    copy_stopped_after(two, tmp_path / "one", 1)
    result = run_script("pretrain_mae.py", "--experiment_name", "one", "--resume_from_checkpoint", "auto", *common)
    assert "step_00000001 at step 1" in result.stderr and "split anew from the next epoch" in result.stderr
    rows, reference = read_metrics(tmp_path / "one"), read_metrics(two)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and [r["epoch"] for r in rows] == [r["epoch"] for r in reference]
    for row, expected in zip(rows[:3], reference[:3]):  # the rest of epoch 0: the same images in every step
        assert row["loss"] == pytest.approx(expected["loss"], rel=1e-4, abs=1e-6)
    assert all(np.isfinite(row["loss"]) for row in rows[3:])  # epoch 1: the shards split over one process


@pytest.mark.slow
def test_fine_tuning_reads_labelled_shards_and_evaluates_on_their_val_split(tmp_path):
    folder = image_folder(tmp_path / "images", counts=(("train", 48), ("val", 15)))
    make_shards(["--input_dir", str(folder), "--output_dir", str(tmp_path / "shards"), "--samples_per_shard", "8"])
    result = run_script("finetune_classifier.py", "--path_to_data", tmp_path / "shards", "--from_scratch",
                        "--img_size", 16, "--input_channels", 3, "--model", "mae_vit_tiny_patch4",
                        "--per_gpu_batch_size", 8, "--epochs", 1, "--working_directory", tmp_path, "--experiment_name",
                        "probe", "--log_with", "none")
    assert "48 training samples, 3 classes, 6 steps/epoch" in result.stderr
    results = json.loads((tmp_path / "probe" / "results.json").read_text())
    assert results["args"]["dataset"] == "shards" and 0 <= results["top1"] <= 100
    shutil.rmtree(tmp_path / "shards" / "val")  # without held-out shards evaluation refuses (no training images)
    result = run_script("finetune_classifier.py", "--path_to_data", tmp_path / "shards", "--from_scratch",
                        "--working_directory", tmp_path, "--experiment_name", "no_val", check=False)
    assert result.returncode == 2 and "no shards.json" in result.stderr.strip().splitlines()[-1]
