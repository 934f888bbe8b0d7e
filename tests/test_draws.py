import itertools
import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from conftest import copy_stopped_after, read_metrics, run_in_process, run_script, without_timing
from torchvision.transforms import InterpolationMode

from pipeline.draws import CROP_SLOT, FLIP_SLOT, GAMMA, MIX1, MIX2, SampleDraws, signed
from pipeline.loading import DeviceBatches
from pipeline.resident import ResidentBatches, hold_on_device, resident_batches
from pipeline.samples import SeededSamples, collate_skipping_bad
from pipeline.sampling import EpochChain, StepBatchSampler
from pipeline.sources import SyntheticDataset
from pipeline.transforms import (
    ClassifierTrainTransform, RandomResizedCropFlip, crop_view, resized_crops, resized_windows,
)
from utils.errors import UserError

MASK64 = (1 << 64) - 1


def splitmix64(state: int) -> int:
    """Reference finaliser on Python integers (Steele, Lea and Flood's SplitMix64)."""
    state &= MASK64
    state = ((state ^ (state >> 30)) * MIX1) & MASK64
    state = ((state ^ (state >> 27)) * MIX2) & MASK64
    return state ^ (state >> 31)


def test_draws_are_splitmix64_streams_keyed_by_seed_epoch_and_index():
    keys = [(7, 0, 5), (7, 3, 5), (7, 3, 123456), (2**40 + 1, 1, 0)]
    for seed, epoch, index in keys:
        key = splitmix64(splitmix64(splitmix64(seed * GAMMA) + epoch) + index)
        bits = SampleDraws.of(seed, [epoch], [index]).bits(60, 6)[0].tolist()
        assert bits == [signed(splitmix64(key + (slot + 1) * GAMMA)) for slot in range(60, 66)]
    batch = SampleDraws.of(7, [0, 3, 3], [5, 5, 123456]).uniform(0, 8)
    assert len({tuple(row) for row in batch.tolist()}) == 3  # epoch and index both change the draws
    assert torch.equal(batch[1], SampleDraws.of(7, [3], [5]).uniform(0, 8)[0])  # a row is the same alone or batched


def test_uniform_draws_are_uniform_and_exact_in_both_precisions():
    draws = SampleDraws.of(0, torch.zeros(50_000, dtype=torch.int64), torch.arange(50_000))
    wide, narrow = draws.uniform(0, 4), draws.uniform(0, 4, torch.float32)
    for values in (wide, narrow):
        assert values.min() >= 0 and values.max() < 1
        assert abs(values.mean().item() - 0.5) < 0.005 and abs(values.var().item() - 1 / 12) < 0.002
    assert torch.equal(narrow, (wide * 2**24).floor().float() / 2**24)  # the top 24 of the same 53 bits
    histogram = torch.histc(wide[:, 0], bins=10, min=0, max=1)
    assert histogram.min() > 4700 and histogram.max() < 5300


def reference_crop(height: int, width: int, tries: list[float], flip_draw: float, scale, ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params on Python floats, fed the same uniforms."""
    area = height * width
    for attempt in range(10):
        u = tries[4 * attempt:4 * attempt + 4]
        target = area * (scale[0] + u[0] * (scale[1] - scale[0]))
        aspect = math.exp(math.log(ratio[0]) + u[1] * (math.log(ratio[1]) - math.log(ratio[0])))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return [int(u[2] * (height - h + 1)), int(u[3] * (width - w + 1)), h, w, int(flip_draw < 0.5)]
    if width / height < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif width / height > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return [(height - h) // 2, (width - w) // 2, h, w, int(flip_draw < 0.5)]


@pytest.mark.parametrize("height,width,scale", [(30, 40, (0.2, 1.0)), (28, 28, (0.08, 1.0)), (8, 200, (0.5, 1.0))])
def test_crops_are_torchvisions_random_resized_crop_for_the_same_uniforms(height, width, scale):
    transform = RandomResizedCropFlip(16, scale=scale)
    draws = SampleDraws.of(1, torch.zeros(400, dtype=torch.int64), torch.arange(400))
    crops = transform.crops(torch.full((400,), height), torch.full((400,), width), draws)
    tries, flips = draws.uniform(CROP_SLOT, 40).tolist(), draws.uniform(FLIP_SLOT, 1)[:, 0].tolist()
    expected = [reference_crop(height, width, tries[i], flips[i], scale) + [16] for i in range(400)]
    assert crops.tolist() == expected
    assert 0 < crops[:, 4].sum() < 400
    if width / height > 20:  # no try fits such a strip often: the centred fallback is taken and checked too
        assert (crops[:, 2] == height).float().mean() > 0.2


def test_batched_resized_crops_equal_one_view_at_a_time():
    images = torch.randint(0, 256, (300, 3, 40, 90), dtype=torch.uint8)
    transform = RandomResizedCropFlip(16, scale=(0.08, 1.0))
    draws = SampleDraws.of(3, torch.zeros(300, dtype=torch.int64), torch.arange(300))
    crops = transform.crops(torch.full((300,), 40), torch.full((300,), 90), draws)
    one_by_one = torch.stack([crop_view(image, crop) for image, crop in zip(images, crops.tolist())])
    difference = (resized_crops(images, crops, 16).int() - one_by_one.int()).abs()
    assert difference.max() <= 1 and (difference == 0).float().mean() > 0.999  # float rounding at half a level
    wide = resized_crops(images, crops, 16, torch.float64, chunk=7)  # the GPU's precision, in odd chunks
    assert (wide.int() - one_by_one.int()).abs().max() <= 1
    assert torch.equal(resized_crops(images, crops, 16, chunk=7), resized_crops(images, crops, 16))
    top, left, h, w, flip, size = crops[0].tolist()
    torchvision = TF.resized_crop(images[0].float(), top, left, h, w, [16, 16], interpolation=InterpolationMode.BICUBIC,
                                  antialias=True).clamp(0, 255).round().to(torch.uint8)
    assert torch.equal(one_by_one[0], torchvision.flip(-1) if flip else torchvision)


def collated(samples: SeededSamples, keys: list) -> dict:
    return collate_skipping_bad(samples.__getitems__(keys))


def test_resident_batches_are_the_seeded_samples_batches_from_any_step():
    base = SyntheticDataset(96, 3, 20)
    samples = SeededSamples(base, RandomResizedCropFlip(16, scale=(0.2, 1.0)), seed=5, num_patches=16)
    images, labels = hold_on_device(base, torch.device("cpu"))
    assert torch.equal(images, base.images) and torch.equal(labels, base.labels)
    chain = EpochChain(StepBatchSampler(len(base), 32, 2, seed=5))
    resident = ResidentBatches(images, labels, samples, chain)
    chain.first_step = 2  # as the trainer resumes: the last step of epoch 0, then into epoch 1 (3 steps per epoch)
    made = DeviceBatches(resident, torch.device("cpu"), ahead=True)  # (made in a thread, as --decode_ahead does)
    expected_keys = EpochChain(StepBatchSampler(len(base), 32, 2, seed=5), first_step=2)
    epochs = []
    for batch, keys in itertools.islice(zip(made, expected_keys), 8):  # 2 micro-batches of epoch 0, 6 of epoch 1
        expected = collated(samples, keys)
        epochs.append(keys[0][1])
        assert torch.equal(batch["label"], expected["label"]) and torch.equal(batch["noise"], expected["noise"])
        difference = (batch["pixel_values"].int() - expected["pixel_values"].int()).abs()
        assert difference.max() <= 1 and (difference == 0).float().mean() > 0.999
    made.close()
    assert epochs == [0, 0, 1, 1, 1, 1, 1, 1]


def test_data_on_device_on_refuses_per_image_augmentation_and_mask_strategies():
    base = SyntheticDataset(64, 1, 16)
    chain = EpochChain(StepBatchSampler(64, 32, 1))
    randaug = SeededSamples(base, ClassifierTrainTransform(16, randaug_magnitude=9), 0)
    with pytest.raises(UserError, match="RandAugment"):
        resident_batches("on", base, randaug, chain, torch.device("cpu"))
    assert resident_batches("auto", base, randaug, chain, torch.device("cpu")) is None
    block = SeededSamples(base, RandomResizedCropFlip(16), 0, 16, noise_fn=lambda generator: torch.rand(16))
    with pytest.raises(UserError, match="mask_strategy random"):
        resident_batches("on", base, block, chain, torch.device("cpu"))
    light = SeededSamples(base, ClassifierTrainTransform(16), 0)
    assert resident_batches("auto", base, light, chain, torch.device("cpu")) is None  # auto: GPUs only
    assert isinstance(resident_batches("on", base, light, chain, torch.device("cpu")), ResidentBatches)


def test_pretraining_on_the_device_matches_the_loader_and_resumes_exactly(tmp_path, fashion_mnist_dir):
    common = ["--max_samples", "256", "--per_gpu_batch_size", "32", "--gradient_accumulation_steps", "2", "--epochs",
              "2", "--log_every", "1", "--log_with", "none", "--num_vis_images", "4", "--working_directory", tmp_path,
              "--checkpointing_steps", "4", "--keep_checkpoints", "10"]
    run_script("pretrain_mae.py", *common, "--experiment_name", "loader", "--data_on_device", "off")
    run_script("pretrain_mae.py", *common, "--experiment_name", "held", "--data_on_device", "on")
    loader, held = read_metrics(tmp_path / "loader"), read_metrics(tmp_path / "held")
    assert len(held) == 16 and held[-1]["loss"] < held[0]["loss"]
    for a, b in zip(loader, held):  # the same samples, up to half-level rounding of a few pixels
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3)
    copy_stopped_after(tmp_path / "held", tmp_path / "resumed", 4)
    run_script("pretrain_mae.py", *common, "--experiment_name", "resumed", "--data_on_device", "on",
               "--resume_from_checkpoint", "latest")
    assert without_timing(read_metrics(tmp_path / "resumed")) == without_timing(held)


def test_data_on_device_on_with_randaugment_is_a_one_line_error(fashion_mnist_dir, tmp_path):
    code, stderr = run_in_process("finetune_classifier.py", "--from_scratch", "--max_samples", "64",
                                  "--per_gpu_batch_size", "32", "--epochs", "1", "--random_aug_magnitude", "9",
                                  "--data_on_device", "on", "--working_directory", tmp_path, "--log_with", "none")
    assert code == 2 and "--data_on_device on cannot make this run's views in batches" in stderr.splitlines()[-1]


def test_the_gpu_check_of_held_data_agrees_on_the_cpu():
    from bench import check_resident

    row = check_resident.main(["--device", "cpu"])
    assert row["draw_bits_equal"] and row["noise_and_labels_equal"]
    assert row["pixels_max_abs_diff"] <= 1 and row["pixels_equal_share"] > 0.999


def test_windows_of_images_of_any_size_resized_together_equal_one_view_at_a_time():
    """resized_windows (the batched crops after a GPU decode): images of many sizes, windows padded in groups."""
    generator = torch.Generator().manual_seed(0)
    sizes = [(int(h), int(w)) for h, w in torch.randint(20, 90, (40, 2), generator=generator)]
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator) for h, w in sizes]
    draws = SampleDraws.of(5, torch.zeros(40, dtype=torch.int64), torch.arange(40))
    crops = RandomResizedCropFlip(24).crops(*torch.tensor(sizes).T, draws)
    one_by_one = torch.stack([crop_view(image, crop) for image, crop in zip(images, crops.tolist())])
    for budget in (2**25, 3 * 90 * 90 * 3):  # one group; groups of about three
        difference = (resized_windows(images, crops, 24, budget=budget).int() - one_by_one.int()).abs()
        assert difference.max() <= 1 and (difference == 0).float().mean() > 0.999
    wide = resized_windows(images, crops, 24, torch.float64, budget=3 * 90 * 90 * 3)
    assert (wide.int() - one_by_one.int()).abs().max() <= 1
