"""The decoded pixel cache: make_pixel_cache.py and the memory-mapped reader give the source's images at its indices,
so training on the cache is training on the source."""
import json

import numpy as np
import pytest
import torch
from conftest import read_metrics, run_script, without_timing
from PIL import Image
from safetensors.torch import load_file
from test_shards import image_folder

from make_pixel_cache import main as make_pixel_cache
from pipeline.datasets import build_image_dataset
from pipeline.pixel_cache import PixelCacheDataset
from utils.errors import DataError

TINY = ["--model", "mae_vit_tiny_patch4", "--img_size", 16, "--patch_size", 4, "--input_channels", 3,
        "--encoder_embed_dim", 32, "--encoder_depth", 1, "--encoder_num_heads", 2, "--decoder_embed_dim", 32,
        "--decoder_depth", 1, "--decoder_num_heads", 2]


def folder_with_a_bad_jpeg(root, counts=(("train", 30), ("val", 6))):
    folder = image_folder(root, counts)
    (folder / "train" / "class1" / "bad.jpg").write_bytes(b"\xff\xd8 not a JPEG")  # index 15: a gap in the cache
    return folder


def test_cache_holds_the_sources_images_at_the_same_indices(tmp_path):
    folder = folder_with_a_bad_jpeg(tmp_path / "images")
    make_pixel_cache(["--path_to_data", str(folder), "--output_dir", str(tmp_path / "cache"), "--num_workers", "2"])
    for split, size in (("train", 31), ("val", 6)):
        plain = build_image_dataset("folder", str(folder), split, 3, 32)
        cached = build_image_dataset("cache", str(tmp_path / "cache"), split, 3, 32)
        assert isinstance(cached, PixelCacheDataset) and len(cached) == len(plain) == size
        assert cached.classes == plain.classes == ["class0", "class1", "class2"]
        for index in range(size):
            if plain[index] is None:
                assert cached[index] is None
                continue
            (image, label), (expected, expected_label) = cached[index], plain[index]
            assert label == expected_label and image.dtype == torch.uint8 and torch.equal(image, expected)
    meta = json.loads((tmp_path / "cache" / "train" / "cache.json").read_text())
    assert (meta["images"], meta["gaps"], meta["source"]["dataset"]) == (30, 1, "folder")
    cached = build_image_dataset("cache", str(tmp_path / "cache"), "train", 3, 32)
    assert [cached[i] is None for i in range(31)].count(True) == 1  # the bad JPEG is a gap, not a shifted index
    assert len(build_image_dataset("cache", str(tmp_path / "cache"), "train", 3, 32, max_samples=9)) == 9


def test_max_size_shrinks_the_longer_side_and_keeps_the_shape(tmp_path):
    folder = image_folder(tmp_path / "images", counts=(("train", 12),))  # images of (20 + i) x 24
    make_pixel_cache(["--path_to_data", str(folder), "--output_dir", str(tmp_path / "cache"), "--max_size", "22",
                      "--num_workers", "0"])
    plain = build_image_dataset("folder", str(folder), "train", 3, 32)
    cached = build_image_dataset("cache", str(tmp_path / "cache"), "train", 3, 32)
    for index in range(len(plain)):
        (height, width), (image_h, image_w) = plain[index][0].shape[-2:], cached[index][0].shape[-2:]
        if max(height, width) <= 22:
            assert torch.equal(cached[index][0], plain[index][0])
        else:
            assert max(image_h, image_w) == 22 and abs(image_h / image_w - height / width) < 0.05


@pytest.mark.slow
def test_pretraining_on_the_cache_is_pretraining_on_the_folder(tmp_path):
    folder = image_folder(tmp_path / "images", counts=(("train", 40),), seed=3)
    make_pixel_cache(["--path_to_data", str(folder), "--output_dir", str(tmp_path / "cache"), "--num_workers", "1"])
    common = ["--working_directory", tmp_path, *TINY, "--per_gpu_batch_size", 8, "--max_train_steps", 7,
              "--log_every", 1, "--vis_every", 0, "--log_with", "none", "--num_workers", 2]
    run_script("pretrain_mae.py", "--experiment_name", "folder", "--path_to_data", folder, *common)
    run_script("pretrain_mae.py", "--experiment_name", "cache", "--path_to_data", tmp_path / "cache", *common)
    assert json.loads((tmp_path / "cache" / "args.json").read_text())["dataset"] == "cache"  # found by cache.json
    rows = read_metrics(tmp_path / "cache")
    assert len(rows) == 7 and without_timing(rows) == without_timing(read_metrics(tmp_path / "folder"))
    a, b = (load_file(tmp_path / name / "final" / "model.safetensors") for name in ("folder", "cache"))
    assert all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.slow
def test_fine_tuning_on_the_cache_is_fine_tuning_on_the_folder(tmp_path):
    folder = folder_with_a_bad_jpeg(tmp_path / "images", counts=(("train", 32), ("val", 12)))
    make_pixel_cache(["--path_to_data", str(folder), "--output_dir", str(tmp_path / "cache"), "--num_workers", "1"])
    common = ["--from_scratch", *TINY[:4], "--input_channels", 3, "--per_gpu_batch_size", 8, "--epochs", 1, "--working_directory", tmp_path,
              "--log_with", "none"]
    results = {}
    for name, data in (("folder", folder), ("cache", tmp_path / "cache")):
        run_script("finetune_classifier.py", "--experiment_name", name, "--path_to_data", data, *common)
        results[name] = json.loads((tmp_path / name / "results.json").read_text())
    assert results["cache"]["args"]["dataset"] == "cache"
    assert [results["cache"][key] for key in ("top1", "top5")] == [results["folder"][key] for key in ("top1", "top5")]
    assert without_timing(read_metrics(tmp_path / "cache")) == without_timing(read_metrics(tmp_path / "folder"))


@pytest.mark.slow
def test_bad_caches_get_one_line_errors(tmp_path):
    folder = image_folder(tmp_path / "images", counts=(("train", 6),))
    make_pixel_cache(["--path_to_data", str(folder), "--output_dir", str(tmp_path / "cache"), "--num_workers", "0"])
    with pytest.raises(DataError, match="set --input_channels 3 or write a cache with make_pixel_cache.py"):
        build_image_dataset("cache", str(tmp_path / "cache"), "train", 1, 32)
    with pytest.raises(DataError, match="no cache.json under"):
        build_image_dataset("cache", str(folder), "train", 3, 32)
    with pytest.raises(DataError, match="no cache.json under"):  # no held-out split: evaluation must not use train
        build_image_dataset("cache", str(tmp_path / "cache"), "val", 3, 32, require_split=True)
    pixels = tmp_path / "cache" / "train" / "pixels.u8"
    pixels.write_bytes(pixels.read_bytes()[:-10])
    with pytest.raises(DataError, match="shorter than its index says"):
        build_image_dataset("cache", str(tmp_path / "cache"), "train", 3, 32)
    result = run_script("make_pixel_cache.py", "--path_to_data", tmp_path / "cache", "--output_dir", tmp_path / "again",
                        check=False)
    assert result.returncode == 2 and "is already a pixel cache" in result.stderr
    result = run_script("pretrain_mae.py", "--path_to_data", tmp_path / "missing", "--dataset", "cache",
                        "--working_directory", tmp_path, "--log_with", "none", check=False)
    assert result.returncode == 2 and "no cache.json under" in result.stderr.strip().splitlines()[-1]


def test_a_hub_dataset_with_unnamed_labels_caches_with_the_label_numbers_as_classes(tmp_path):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(4)
    images = [Image.fromarray(rng.integers(0, 255, (18 + i, 20, 3), dtype=np.uint8)) for i in range(8)]
    split = datasets.Dataset.from_dict({"image": images, "label": [0, 2, 1, 2, 0, 1, 2, 0]},
                                       features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}))
    datasets.DatasetDict({"train": split}).save_to_disk(str(tmp_path / "hub"))
    old_val = tmp_path / "cache" / "val"
    old_val.mkdir(parents=True)
    (old_val / "cache.json").write_text("{}")  # an older cache's split that the source no longer has
    make_pixel_cache(["--dataset", f"hf:{tmp_path / 'hub'}", "--output_dir", str(tmp_path / "cache"), "--num_workers", "0"])
    assert not old_val.exists()  # removed: evaluation must not read a stale split
    plain = build_image_dataset(f"hf:{tmp_path / 'hub'}", None, "train", 3, 16)
    cached = build_image_dataset("cache", str(tmp_path / "cache"), "train", 3, 16)
    assert cached.classes == ["0", "1", "2"]  # fine-tuning needs classes: the label numbers found, as make_shards.py
    assert all(torch.equal(cached[i][0], plain[i][0]) and cached[i][1] == plain[i][1] for i in range(8))


@pytest.mark.slow
def test_in_memory_data_sets_are_not_cached(tmp_path):
    for args in ([], ["--dataset", "synthetic", "--path_to_data", str(tmp_path)]):
        result = run_script("make_pixel_cache.py", "--output_dir", tmp_path / "cache", *args, check=False)
        assert result.returncode == 2 and ("held in memory already" in result.stderr)
