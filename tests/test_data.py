import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pipeline.datasets import build_image_dataset
from pipeline.samples import SeededSamples, collate_skipping_bad
from pipeline.sampling import StepBatchSampler
from pipeline.sources import ImageFolderDataset, load_fashion_mnist, resolve_image_folder
from pipeline.transforms import RandomResizedCropFlip, to_channels
from utils.errors import DataError


def test_fashion_mnist_is_read_from_the_idx_files(fashion_mnist_dir):
    images, labels = load_fashion_mnist("train")
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [6000] * 10
    test_images, test_labels = load_fashion_mnist("test")
    assert test_images.shape == (10000, 28, 28) and np.bincount(test_labels).tolist() == [1000] * 10
    assert 0.25 < images.mean() / 255 < 0.32  # the known mean pixel of Fashion-MNIST is 0.286


@pytest.mark.parametrize("mode,channels", [("L", 3), ("RGBA", 3), ("P", 3), ("CMYK", 3), ("RGB", 1), ("LA", 1),
                                           ("I;16", 3), ("RGBA", 4)])
def test_image_modes_convert_to_model_channels(mode, channels):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (10, 12, 3), dtype=np.uint8))
    image = rgb.convert(mode) if mode != "I;16" else rgb.convert("L").convert("I;16")
    tensor = to_channels(image, channels)
    assert tensor.shape == (channels, 10, 12) and tensor.dtype == torch.uint8


def test_16_bit_images_are_scaled_not_clipped():
    values = np.array([[0, 256, 32768, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)  # mode I;16
    assert to_channels(image, 1)[0].tolist() == [[0, 1, 128, 255]]
    assert to_channels(values, 3)[2].tolist() == [[0, 1, 128, 255]]
    assert to_channels(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), 1)[0].tolist() == [[0, 128, 255]]


def test_gray_to_rgb_repeats_and_rgb_to_gray_averages():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    rgb = to_channels(gray, 3)
    assert torch.equal(rgb[0], rgb[2]) and torch.equal(rgb[1], torch.from_numpy(gray))
    stack = np.stack([gray, gray + 3, gray + 6], axis=-1)  # (H, W, 3) array: mean is gray + 3
    assert torch.equal(to_channels(stack, 1)[0], torch.from_numpy(gray + 3))
    with pytest.raises(DataError, match="set --input_channels 3"):
        to_channels(stack, 5)


def make_folder(root, layout):
    """layout: {relative path: kind}, kind in png / rgba / jpg / truncated / garbage / npy5."""
    rng = np.random.default_rng(0)
    for relative, kind in layout.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
        if kind == "png":
            Image.fromarray(pixels).save(path)
        elif kind == "rgba":
            Image.fromarray(pixels).convert("RGBA").save(path)
        elif kind == "jpg":
            Image.fromarray(pixels).save(path, quality=90)
        elif kind == "truncated":
            Image.fromarray(pixels).save(path, quality=90)
            path.write_bytes(path.read_bytes()[:200])
        elif kind == "garbage":
            path.write_bytes(b"this is not an image")
        elif kind == "npy5":
            np.save(path, rng.integers(0, 255, (20, 24, 5), dtype=np.uint8))


def test_imagenet_layout_detected_with_class_labels(tmp_path):
    make_folder(tmp_path, {"train/cat/a.png": "png", "train/cat/b.jpg": "jpg", "train/dog/c.png": "rgba",
                           "val/cat/d.png": "png", "val/dog/e.png": "png"})
    train = ImageFolderDataset(resolve_image_folder(str(tmp_path), "train"), 3)
    assert train.classes == ["cat", "dog"] and [r.label for r in train.records] == [0, 0, 1]
    val = build_image_dataset("folder", str(tmp_path), "val", 3, 16)
    assert len(val) == 2 and val[1][1] == 1
    (tmp_path / "validation").mkdir()
    (tmp_path / "val").rename(tmp_path / "validation" / "x")
    assert resolve_image_folder(str(tmp_path), "val").name == "validation"


def test_flat_unlabeled_folder_and_many_channel_arrays(tmp_path):
    make_folder(tmp_path, {"a.npy": "npy5", "nested/b.npy": "npy5", "c.png": "png"})
    Image.open(tmp_path / "c.png").convert("L").save(tmp_path / "c.png")  # grayscale fills all channels
    data = ImageFolderDataset(tmp_path, 5)
    assert data.classes == [] and len(data) == 3 and {r.label for r in data.records} == {-1}
    assert all(tuple(data[i][0].shape) == (5, 20, 24) for i in range(3))
    rgb_only = ImageFolderDataset(tmp_path, 3)
    with pytest.raises(DataError, match="has 5 channels but the model expects 3: set --input_channels 5"):
        rgb_only[0]


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    make_folder(tmp_path, {"a.png": "png", "b.jpg": "truncated", "c.png": "png", "d.jpg": "garbage", "e.jpg": "jpg"})
    data = SeededSamples(build_image_dataset("folder", str(tmp_path), "train", 3, 16), RandomResizedCropFlip(16), 0, 4)
    loader = DataLoader(data, batch_sampler=StepBatchSampler(5, 5, 1, shuffle=False), collate_fn=collate_skipping_bad)
    (batch,) = list(loader)
    assert batch["num_skipped"] == 2
    assert batch["pixel_values"].shape == (3, 3, 16, 16) and batch["noise"].shape == (3, 4)


def test_missing_or_empty_folder_errors(tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        build_image_dataset("folder", str(tmp_path / "nope"), "train", 3, 16)
    with pytest.raises(DataError, match="no images"):
        build_image_dataset("folder", str(tmp_path), "train", 3, 16)
    with pytest.raises(DataError, match="no Fashion-MNIST IDX files"):
        load_fashion_mnist("train", str(tmp_path))
    with pytest.raises(DataError, match="unknown --dataset"):
        build_image_dataset("imagenet21k", None, "train", 3, 16)


def steps_of(sampler, epoch=0, start_step=0):
    sampler.set_epoch(epoch, start_step)
    batches = list(sampler)
    per_step = sampler.accumulation_steps
    return [[key for micro in batches[i:i + per_step] for key in micro] for i in range(0, len(batches), per_step)]


def test_step_sampler_same_global_batches_for_any_process_count():
    one = steps_of(StepBatchSampler(50, 8, 2, num_processes=1, rank=0, seed=3))
    two = [steps_of(StepBatchSampler(50, 4, 2, num_processes=2, rank=r, seed=3)) for r in range(2)]
    assert len(one) == 6 == len(two[0])  # 50 // 8, the incomplete last step dropped
    for step in range(6):
        assert one[step] == two[0][step] + two[1][step]
    seen = [key[0] for step in one for key in step]
    assert len(set(seen)) == len(seen) == 48  # each sample at most once per epoch


def test_step_sampler_resumes_mid_epoch_and_reshuffles_per_epoch():
    sampler = StepBatchSampler(40, 4, 1, seed=0)
    full = steps_of(sampler, epoch=1)
    assert steps_of(sampler, epoch=1, start_step=3) == full[3:]
    assert len(sampler) == 10 - 3
    assert steps_of(sampler, epoch=2) != full
    with pytest.raises(DataError, match="not divisible by --gradient_accumulation_steps 4"):
        StepBatchSampler(40, 10, 4)
    with pytest.raises(DataError, match="fewer than one global batch"):
        StepBatchSampler(10, 8, 1, num_processes=2)


def test_seeded_samples_are_functions_of_seed_epoch_and_index(fashion_mnist_dir):
    base = build_image_dataset("fashion_mnist", None, "train", 1, 28, max_samples=100)
    samples = SeededSamples(base, RandomResizedCropFlip(28), seed=7, num_patches=49)
    a, b = samples[(5, 0)], samples[(5, 0)]
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["noise"], b["noise"])
    assert not torch.equal(samples[(5, 1)]["noise"], a["noise"])
    other_seed = SeededSamples(base, RandomResizedCropFlip(28), seed=8, num_patches=49)
    assert not torch.equal(other_seed[(5, 0)]["noise"], a["noise"])
    assert a["pixel_values"].dtype == torch.uint8 and a["pixel_values"].shape == (1, 28, 28)


@pytest.mark.parametrize("channels", [1, 3])
def test_timm_rand_augment_is_timms_transform_seeded_by_the_sample(channels):
    import random

    import torchvision.transforms.v2.functional as TF

    from pipeline.draws import AUGMENT_SLOT, SampleDraws
    from pipeline.transforms import ClassifierTrainTransform, timm_rand_augment

    def draws(index):
        return SampleDraws.of(0, [0], [index])

    augment = timm_rand_augment("rand-m9-mstd0.5-inc1", 32, (0.5,) * channels)
    image = torch.randint(0, 256, (channels, 32, 32), dtype=torch.uint8)
    views = []
    for seed in range(12):
        random.seed(100 + seed)  # whatever the global RNGs hold: the view depends on the sample's draws only
        np.random.seed(seed)
        views.append(augment(image, draws(seed)))
        assert random.random() == random.Random(100 + seed).random()  # the global state is put back
    assert torch.equal(views[0], augment(image, draws(0)))
    assert len({bytes(view.numpy()) for view in views}) >= 6  # different samples, mostly different views
    draw = draws(3).seed(AUGMENT_SLOT)
    random.seed(draw)
    np.random.seed(draw % 2**32)
    assert torch.equal(views[3], TF.pil_to_tensor(augment.op(TF.to_pil_image(image))))  # timm's own op, same draws
    transform = ClassifierTrainTransform(16, auto_augment=augment)
    assert transform(image, draws(1)).shape == (channels, 16, 16)


def test_timm_rand_augment_posterizes_to_zero_bits_as_black():
    from pipeline.draws import SampleDraws
    from pipeline.transforms import timm_rand_augment

    augment = timm_rand_augment("rand-m10-mstd0.5-inc1", 16, (0.5, 0.5, 0.5))  # magnitude 10: 0 bits kept
    posterize = [op for op in augment.op.ops if op.name == "PosterizeIncreasing"][0]
    image = Image.fromarray(np.full((16, 16, 3), 200, dtype=np.uint8))
    assert np.asarray(posterize.aug_fn(image, 0)).max() == 0 and np.array_equal(posterize.aug_fn(image, 8), image)
    pixels = torch.full((3, 16, 16), 200, dtype=torch.uint8)
    views = [augment(pixels, SampleDraws.of(0, [0], [index])) for index in range(200)]  # every op drawn, none fails
    assert any(view.max() == 0 for view in views)


def test_hub_dataset_from_disk_with_image_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)) for _ in range(6)]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    split = datasets.Dataset.from_dict({"img": images, "label": [0, 1] * 3}, features=features)
    datasets.DatasetDict({"train": split, "test": split.select(range(2))}).save_to_disk(str(tmp_path / "hub"))
    train = build_image_dataset(f"hf:{tmp_path / 'hub'}", None, "train", 1, 16)
    assert len(train) == 6 and train.classes == ["a", "b"]
    image, label = train[1]
    assert image.shape == (1, 20, 20) and image.dtype == torch.uint8 and label == 1
    assert len(build_image_dataset(f"hf:{tmp_path / 'hub'}", None, "val", 3, 16)) == 2
    with pytest.raises(DataError, match="cannot open 🤗 dataset"):
        build_image_dataset(f"hf:{tmp_path / 'missing'}", None, "train", 3, 16)


def test_hub_parquet_folder_with_named_splits_and_columns(tmp_path):
    datasets = pytest.importorskip("datasets")
    from pipeline.sources import HubOptions

    rng = np.random.default_rng(1)
    data = tmp_path / "parquet" / "data"
    data.mkdir(parents=True)
    for split, count in (("train", 6), ("holdout", 3)):
        images = [Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)) for _ in range(count)]
        features = datasets.Features({"picture": datasets.Image(), "coarse": datasets.Value("int64"),
                                      "fine": datasets.ClassLabel(names=["x", "y", "z"])})
        columns = {"picture": images, "coarse": [7] * count, "fine": [i % 3 for i in range(count)]}
        table = datasets.Dataset.from_dict(columns, features=features)
        table.to_parquet(str(data / f"{split}-00000-of-00001.parquet"))
    options = HubOptions(val_split="holdout", image_column="picture", label_column="fine")
    train = build_image_dataset(f"hf:{tmp_path / 'parquet'}", None, "train", 3, 12, hub=options)
    val = build_image_dataset(f"hf:{tmp_path / 'parquet'}", None, "val", 3, 12, hub=options)
    assert (len(train), len(val)) == (6, 3) and [val[i][1] for i in range(3)] == [0, 1, 2]  # the "fine" labels
    assert train[0][0].shape == (3, 12, 12)
    with pytest.raises(DataError, match="has no split 'valid'.*--val_split"):
        build_image_dataset(f"hf:{tmp_path / 'parquet'}", None, "val", 3, 12, hub=HubOptions(val_split="valid"))


def photo_like_jpegs(root, count, rng):
    """Smooth colour fields of varying sizes (a few grayscale), saved as JPEGs in two class folders."""
    for index in range(count):
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((90 + 7 * index, 70 + 3 * index), Image.BICUBIC)
        if index % 5 == 2:
            image = image.convert("L")
        (root / f"class{index % 2}").mkdir(parents=True, exist_ok=True)
        image.save(root / f"class{index % 2}" / f"{index:03d}.jpg", quality=90)


def views(folder, encoded: bool, count: int):
    """The first ``count`` training samples of pretrain_mae.py's pipeline, made on the CPU device."""
    from pipeline.loading import move_to_device

    base = build_image_dataset("folder", str(folder), "train", 3, 32, encoded_jpeg=encoded)
    samples = SeededSamples(base, RandomResizedCropFlip(32), 7, 16)
    loader = DataLoader(samples, batch_sampler=StepBatchSampler(count, count, 1, seed=3),
                        collate_fn=collate_skipping_bad)
    return move_to_device(next(iter(loader)), torch.device("cpu"))


@pytest.mark.parametrize("variant", ["baseline", "progressive", "444", "422", "gray", "q40", "cmyk", "odd_size"])
def test_jpegs_decode_to_pils_pixels(variant):
    """RGB and gray JPEGs are decoded by torchvision's libjpeg-turbo straight into a tensor (faster); the pixels must
    be exactly PIL's, whose decode the rest (CMYK, ...) keeps."""
    import io

    from pipeline.sources import image_from_bytes

    rng = np.random.default_rng(5)
    size = (37, 53) if variant == "odd_size" else (96, 128)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size[::-1], Image.BICUBIC)
    image = Image.fromarray(np.clip(np.asarray(coarse, np.int16) + rng.integers(-25, 26, (*size, 3)), 0, 255)
                            .astype(np.uint8))
    options = {"progressive": dict(progressive=True), "444": dict(subsampling=0), "422": dict(subsampling=1),
               "q40": dict(quality=40)}.get(variant, {})
    image = image.convert({"gray": "L", "cmyk": "CMYK"}.get(variant, "RGB"))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    with Image.open(io.BytesIO(buffer.getvalue())) as decoded:
        expected = torch.from_numpy(np.asarray(decoded.convert("RGB")).copy()).permute(2, 0, 1)
    assert torch.equal(image_from_bytes(buffer.getvalue(), ".jpg", 3), expected)


def test_jpegs_decoded_on_the_device_give_the_workers_views(tmp_path):
    photo_like_jpegs(tmp_path, 12, np.random.default_rng(0))
    plain, deferred = views(tmp_path, False, 12), views(tmp_path, True, 12)
    assert "jpeg" not in deferred and deferred["pixel_values"].dtype == torch.uint8
    assert deferred["pixel_values"].shape == (12, 3, 32, 32)
    assert torch.equal(deferred["pixel_values"], plain["pixel_values"])  # same crop, flip, decoder: same pixels
    assert torch.equal(deferred["noise"], plain["noise"]) and torch.equal(deferred["label"], plain["label"])


def test_deferred_decode_drops_a_broken_jpeg_with_its_label_and_handles_mixed_folders(tmp_path):
    photo_like_jpegs(tmp_path, 6, np.random.default_rng(1))
    good = (tmp_path / "class0" / "000.jpg").read_bytes()
    (tmp_path / "class1" / "broken.jpg").write_bytes(good[:len(good) // 2])  # readable header, truncated data
    plain, deferred = views(tmp_path, False, 7), views(tmp_path, True, 7)
    assert plain["num_skipped"] == deferred["num_skipped"] == 1
    assert deferred["pixel_values"].shape[0] == deferred["noise"].shape[0] == deferred["label"].shape[0] == 6
    assert torch.equal(deferred["pixel_values"], plain["pixel_values"])
    assert torch.equal(deferred["label"], plain["label"]) and torch.equal(deferred["noise"], plain["noise"])

    Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(tmp_path / "class1" / "flat.png")  # not a JPEG
    plain, deferred = views(tmp_path, False, 8), views(tmp_path, True, 8)
    assert deferred["pixel_values"].shape[0] == 7  # views made in the collate when a batch mixes formats
    assert torch.equal(deferred["pixel_values"], plain["pixel_values"])


def test_epoch_chain_is_the_samplers_epochs_from_a_step_in_one_iterator(tmp_path):
    """EpochChain (the scripts' training loaders): the sampler's epochs in order, the first from the resumed step,
    and through a loader with 2 workers the same batches as the loader read epoch by epoch."""
    from pipeline.loading import build_loader
    from pipeline.sampling import EpochChain

    sampler = StepBatchSampler(10, 4, 2, seed=3)  # 2 steps of 2 micro-batches per epoch
    expected = []
    for epoch, start_step in ((0, 1), (1, 0), (2, 0)):
        sampler.set_epoch(epoch, start_step)
        expected += list(sampler)
    chain = EpochChain(sampler, first_step=1)
    assert [batch for _, batch in zip(range(10), chain)] == expected  # 2 (epoch 0 from step 1) + 4 + 4
    assert [key[1] for batch in expected for key in batch] == [0] * 4 + [1] * 8 + [2] * 8
    assert sampler.epoch_of_step(2) == 0 and sampler.epoch_of_step(3) == 1 and sampler.epoch_of_step(0) == 0

    photo_like_jpegs(tmp_path, 24, np.random.default_rng(5))
    samples = SeededSamples(build_image_dataset("folder", str(tmp_path), "train", 3, 32), RandomResizedCropFlip(32), 7,
                            16)
    by_epoch = StepBatchSampler(len(samples), 8, 2, seed=4)
    loader = build_loader(samples, by_epoch, 2, torch.device("cpu"))
    plain = []
    for epoch in range(2):
        by_epoch.set_epoch(epoch, start_step=1 if epoch == 0 else 0)
        plain += list(loader)
    chained = build_loader(samples, EpochChain(StepBatchSampler(len(samples), 8, 2, seed=4), first_step=1), 2,
                           torch.device("cpu"))
    taken = [batch for _, batch in zip(range(len(plain)), chained)]
    loader.close()
    chained.close()
    assert len(taken) == len(plain) == 4 + 6
    for expected_batch, batch in zip(plain, taken):
        assert torch.equal(batch["pixel_values"], expected_batch["pixel_values"])
        assert torch.equal(batch["noise"], expected_batch["noise"])


def test_batches_made_ahead_in_a_thread_are_the_batches_made_inline(tmp_path):
    """DeviceBatches(ahead=True) (--decode_ahead): the same batches in the same order, across epochs, an epoch left
    half read (a stop, a run's last partial epoch) and persistent workers; errors in the thread reach the caller."""
    from pipeline.loading import DeviceBatches, build_loader
    from pipeline.sampling import EpochChain

    photo_like_jpegs(tmp_path, 24, np.random.default_rng(2))
    (tmp_path / "class1" / "broken.jpg").write_bytes((tmp_path / "class0" / "000.jpg").read_bytes()[:300])
    base = build_image_dataset("folder", str(tmp_path), "train", 3, 32, encoded_jpeg=True)
    sampler = StepBatchSampler(len(base), 8, 2, seed=4)
    loader = build_loader(SeededSamples(base, RandomResizedCropFlip(32), 7, 16), sampler, 2, torch.device("cpu"))

    def epochs(ahead: bool) -> list:
        batches, taken = DeviceBatches(loader, torch.device("cpu"), ahead=ahead), []
        for epoch, limit in ((0, 3), (1, None), (2, None)):  # epoch 0 is left after 3 of its 6 micro-batches
            batches.close()  # the thread of the last epoch stops before the sampler changes
            sampler.set_epoch(epoch)
            for number, batch in enumerate(batches):
                if number == limit:
                    break
                taken.append(batch)
        batches.close()
        return taken

    inline, ahead = epochs(False), epochs(True)
    assert len(inline) == len(ahead) == 3 + 6 + 6
    assert sum(batch["num_skipped"] for batch in ahead) >= 1  # the broken JPEG was met (and dropped) on the way
    for expected, batch in zip(inline, ahead):
        assert batch.keys() == expected.keys() and "jpeg" not in batch
        assert all(torch.equal(batch[key], expected[key]) if isinstance(expected[key], torch.Tensor)
                   else batch[key] == expected[key] for key in expected)

    # as pretrain_mae.py: one iteration over an EpochChain, from a resumed step, across epochs
    chained_loader = build_loader(SeededSamples(base, RandomResizedCropFlip(32), 7, 16),
                                  EpochChain(StepBatchSampler(len(base), 8, 2, seed=4), first_step=1), 2,
                                  torch.device("cpu"))

    def chained(ahead: bool) -> list:
        batches = DeviceBatches(chained_loader, torch.device("cpu"), ahead=ahead)
        taken = [batch for _, batch in zip(range(4 + 6 + 2), batches)]  # the rest of epoch 0, epoch 1, 2 of epoch 2
        batches.close()
        return taken

    chained_inline, chained_ahead = chained(False), chained(True)
    loader.close()
    chained_loader.close()
    assert len(chained_ahead) == 12
    for expected, batch in zip(chained_inline, chained_ahead):
        assert torch.equal(batch["pixel_values"], expected["pixel_values"])
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(chained_inline[4:10], inline[3:9]))

    class Unreadable(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, key):
            raise DataError("shard-000003.tar cannot be read: check the URL")

    broken = build_loader(Unreadable(), StepBatchSampler(16, 8, 1), 1, torch.device("cpu"))
    with pytest.raises(Exception, match="shard-000003.tar cannot be read"):
        next(iter(DeviceBatches(broken, torch.device("cpu"), ahead=True)))
    broken.close()
