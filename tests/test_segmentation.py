"""finetune_segmentation.py and its data: joint transforms, sources, one-line errors, whole runs on the canvases."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port, read_metrics, run_script, sigterm_script
from PIL import Image
from safetensors.torch import load_file

from models.upernet import ViTUperNet
from pipeline.segmentation import (
    IGNORE_INDEX, FashionMNISTCanvases, SegmentationEvalTransform, SegmentationTrainTransform,
    build_segmentation_dataset, default_zero_is_ignore,
)
from pipeline.transforms import Normalize, channel_stats
from utils.errors import DataError
from utils.metrics import SegmentationMetric

RUN = ["--log_with", "none", "--img_size", 32, "--per_gpu_batch_size", 16, "--max_val_samples", 128,
       "--num_pictures", 4]
SMALL_MAE = ["--encoder_embed_dim", 64, "--encoder_depth", 4, "--encoder_num_heads", 2, "--decoder_embed_dim", 32,
             "--decoder_depth", 1, "--decoder_num_heads", 2, "--log_with", "none", "--max_train_steps", 4,
             "--per_gpu_batch_size", 32]


def blocky_pair(height=40, width=56, block=8):
    """A mask of block x block squares with labels 0..9 and an image whose every pixel is 20 x its label."""
    generator = torch.Generator().manual_seed(0)
    coarse = torch.randint(0, 10, (height // block, width // block), generator=generator)
    mask = coarse.repeat_interleave(block, 0).repeat_interleave(block, 1)
    return (mask * 20).to(torch.uint8).expand(3, -1, -1).contiguous(), mask


def test_joint_transform_keeps_the_mask_aligned_with_the_image():
    image, mask = blocky_pair(height=48, width=64, block=16)
    transform = SegmentationTrainTransform(crop_size=48, base_size=40, scale_range=(0.5, 2.0), photometric=False)
    for seed in range(12):
        out_image, out_mask = transform(image, mask, torch.Generator().manual_seed(seed))
        assert out_image.shape == (3, 48, 48) and out_mask.shape == (48, 48) and out_mask.dtype == torch.int64
        padded = out_mask == IGNORE_INDEX
        assert (out_image[:, padded] == 0).all()
        # two pixels away from block edges (where antialiased bilinear resizing blends), every pixel still reads 20 x its label
        labels = out_mask.float()
        neighbours = torch.nn.functional.max_pool2d(labels[None, None], 5, 1, 2)[0, 0]
        low = -torch.nn.functional.max_pool2d(-labels[None, None], 5, 1, 2)[0, 0]
        interior = (neighbours == low) & ~padded
        interior[:2], interior[-2:], interior[:, :2], interior[:, -2:] = False, False, False, False  # crop edges
        assert interior.sum() > 100
        assert (out_image[0][interior].float() - 20 * labels[interior]).abs().max() <= 2
        assert set(out_mask[~padded].unique().tolist()) <= set(range(10))
    filled = SegmentationTrainTransform(crop_size=96, base_size=48, scale_range=(1.0, 1.0), photometric=False,
                                        fill=(10, 20, 30))
    out_image, out_mask = filled(image, mask, torch.Generator().manual_seed(0))  # 48x64 padded to 96x96
    assert (out_mask[48:] == IGNORE_INDEX).all() and (out_mask[:, 64:] == IGNORE_INDEX).all()
    assert out_image[:, 60:, 70:].flatten(1).unique(dim=1).tolist() == [[10], [20], [30]]
    jittered = SegmentationTrainTransform(48, 40, (0.5, 2.0), photometric=True)
    changed = 0
    for seed in range(6):  # the jitter touches the image only: same geometry, same mask
        plain = transform(image, mask, torch.Generator().manual_seed(seed))
        shaken = jittered(image, mask, torch.Generator().manual_seed(seed))
        assert torch.equal(plain[1], shaken[1])
        changed += int(not torch.equal(plain[0], shaken[0]))
    assert changed > 0


def test_eval_transform_resizes_the_image_and_keeps_the_original_mask():
    image, mask = blocky_pair(height=40, width=120)
    out_image, out_mask = SegmentationEvalTransform(base_size=20)(image, mask)
    assert out_image.shape == (3, 20, 60) and torch.equal(out_mask, mask)
    image, mask = blocky_pair(height=40, width=200)  # the long side stops at 4x the base (mmseg's 2048 x 512)
    assert SegmentationEvalTransform(base_size=20)(image, mask)[0].shape == (3, 16, 80)


def test_canvases_are_fixed_and_labelled_by_garment(fashion_mnist_dir):
    canvases = FashionMNISTCanvases("val", size=48, num_canvases=50)
    assert len(canvases) == 50 and len(canvases.classes) == 11
    for index in range(20):
        image, mask = canvases[index]
        again_image, again_mask = canvases[index]
        assert torch.equal(image, again_image) and torch.equal(mask, again_mask)
        assert image.shape == (1, 48, 48) and mask.shape == (48, 48)
        assert 0 <= mask.min() and mask.max() <= 10 and (mask > 0).any()
        assert (image[0][mask > 0] > 10).all() and (image[0][mask == 0] < 16).all()
    train_image, _ = FashionMNISTCanvases("train", size=48)[0]
    assert not torch.equal(train_image, canvases[0][0])  # training canvases come from the other split


def write_pairs(root, split, labels_by_name, size=(24, 32), mask_folder="annotations"):
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / mask_folder / split).mkdir(parents=True, exist_ok=True)
    for name, labels in labels_by_name.items():
        Image.fromarray(np.full((*size, 3), 128, np.uint8)).save(root / "images" / split / f"{name}.jpg")
        if labels is not None:
            mask = np.zeros(size, np.uint8)
            mask[:, : size[1] // 2], mask[:, size[1] // 2:] = labels
            Image.fromarray(mask).save(root / mask_folder / split / f"{name}.png")


def test_ade20k_layout_shifts_labels_and_ignores_zero(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    write_pairs(root, "training", {"a": (0, 1), "b": (150, 7), "c": (255, 2)})
    assert default_zero_is_ignore("folder", str(tmp_path)) and default_zero_is_ignore("folder", str(root))
    assert default_zero_is_ignore("hf:scene_parse_150", None) and not default_zero_is_ignore("hf:user/facade", None)
    data = build_segmentation_dataset("folder", str(tmp_path), "train", 3, zero_is_ignore=True)
    _, mask = data[0]
    assert mask[0, 0] == IGNORE_INDEX and mask[0, -1] == 0
    _, mask = data[1]
    assert mask[0, 0] == 149 and mask[0, -1] == 6
    _, mask = data[2]
    assert mask[0, 0] == IGNORE_INDEX and mask[0, -1] == 1  # an explicit 255 stays ignored
    # a plain folder of pairs keeps labels as they are
    write_pairs(tmp_path / "plain", "train", {"a": (0, 3)}, mask_folder="masks")
    _, mask = build_segmentation_dataset("folder", str(tmp_path / "plain"), "train", 3)[0]
    assert mask[0, 0] == 0 and mask[0, -1] == 3
    with pytest.raises(DataError, match="no images/validation or images/val"):
        build_segmentation_dataset("folder", str(tmp_path), "val", 3)


def test_image_without_mask_is_one_line_error(tmp_path):
    write_pairs(tmp_path, "train", {"a": (1, 2), "b": None})
    write_pairs(tmp_path, "val", {"c": (1, 2)})
    result = run_script("finetune_segmentation.py", "--path_to_data", tmp_path, "--num_classes", 3, "--from_scratch",
                        "--working_directory", tmp_path / "runs", *RUN, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "b.jpg has no mask" in lines[0] and "Traceback" not in result.stderr


def test_label_above_num_classes_is_one_line_error(tmp_path):
    write_pairs(tmp_path, "train", {f"{i}": (1, 7) for i in range(16)})
    write_pairs(tmp_path, "val", {"c": (1, 2)})
    result = run_script("finetune_segmentation.py", "--path_to_data", tmp_path, "--num_classes", 5, "--from_scratch",
                        "--model", "mae_vit_tiny_patch4", "--input_channels", 3, "--working_directory",
                        tmp_path / "runs", *RUN, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    message = result.stderr.strip().splitlines()[-1]
    assert "holds label 7 but --num_classes is 5" in message and "Traceback" not in result.stderr


def _metric_worker(rank, world, port, result_file):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    generator = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (7, 8, 8), generator=generator)
    prediction = torch.randint(0, 4, (7, 8, 8), generator=generator)
    metric = SegmentationMetric(4, IGNORE_INDEX, torch.device("cpu"))
    metric.update(prediction[rank::world], target[rank::world])  # each process sees its share only
    result = metric.compute()
    if rank == 0:
        with open(result_file, "w") as handle:
            json.dump(result, handle)
    dist.destroy_process_group()


@pytest.mark.slow
def test_miou_is_summed_over_processes(tmp_path):
    mp.spawn(_metric_worker, args=(2, free_port(), str(tmp_path / "result.json")), nprocs=2)
    generator = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (7, 8, 8), generator=generator)
    prediction = torch.randint(0, 4, (7, 8, 8), generator=generator)
    single = SegmentationMetric(4, IGNORE_INDEX, torch.device("cpu"))
    single.update(prediction, target)
    expected = single.compute()
    gathered = json.loads((tmp_path / "result.json").read_text())
    assert gathered["mIoU"] == pytest.approx(expected["mIoU"]) and gathered["pixel_acc"] == pytest.approx(expected["pixel_acc"])


def constant_prediction_miou(num_val: int, size: int) -> float:
    """The best mIoU a constant prediction gets on the first ``num_val`` validation canvases."""
    canvases = FashionMNISTCanvases("val", size=size, num_canvases=num_val)
    counts = torch.bincount(torch.stack([canvases[i][1] for i in range(num_val)]).flatten(), minlength=11)
    present = int((counts > 0).sum())
    return max(100.0 * counts[c].item() / counts.sum().item() / present for c in range(11))


@pytest.fixture(scope="module")
def pretrained_backbone(tmp_path_factory, fashion_mnist_dir):
    out = tmp_path_factory.mktemp("pretrain")
    run_script("pretrain_mae.py", "--working_directory", out, "--experiment_name", "mae", *SMALL_MAE)
    return out / "mae" / "final"


def test_short_run_beats_a_constant_prediction_and_writes_the_run(tmp_path, pretrained_backbone):
    run_script("finetune_segmentation.py", "--dataset", "fashion_mnist_seg", "--path_to_backbone_checkpoint",
               pretrained_backbone, "--max_samples", 1280, "--epochs", 1, "--eval_every", 40, "--learning_rate", 2e-3,
               "--working_directory", tmp_path, "--experiment_name", "seg", *RUN, timeout=600)
    run = tmp_path / "seg"
    report = json.loads((run / "weights_report.json").read_text())
    model = ViTUperNet.from_pretrained(run / "final")
    assert report["new"] == [] and report["loaded"] == sorted(model.backbone.state_dict())  # every encoder tensor
    assert len(report["loaded"]) == 3 + 4 * 12  # patch projection (weight, bias), cls token, 4 blocks
    results = json.loads((run / "results.json").read_text())
    baseline = constant_prediction_miou(128, 32)
    assert results["mIoU"] > baseline + 5, (results["mIoU"], baseline)
    assert 0 <= results["pixel_acc"] <= 100 and len(results["per_class_iou"]) == 11
    assert "background" in results["per_class_iou"]
    rows = read_metrics(run)
    assert [row["step"] for row in rows] == [40, 80]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert (run / "predictions" / "step_00000080.png").exists()
    assert model.num_classes == 11 and model.backbone.patch_embed.img_size == (32, 32)


@pytest.mark.slow
def test_resumed_run_matches_an_uninterrupted_one(tmp_path):
    common = ["--dataset", "fashion_mnist_seg", "--from_scratch", "--max_samples", 64, "--max_train_steps", 4,
              "--eval_every", 2, "--per_gpu_batch_size", 8, "--gradient_accumulation_steps", 2,
              "--working_directory", tmp_path, "--log_with", "none", "--img_size", 32, "--max_val_samples", 16,
              "--num_pictures", 0, "--seed", 3]
    run_script("finetune_segmentation.py", *common, "--experiment_name", "straight")
    run_script("finetune_segmentation.py", *common, "--experiment_name", "resumed", "--checkpointing_steps", 2)
    resumed = tmp_path / "resumed"
    (resumed / "results.json").unlink()
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")  # as if stopped after the checkpoint of step 2
    run_script("finetune_segmentation.py", *common, "--experiment_name", "resumed", "--resume_from_checkpoint", "latest")
    straight = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    again = load_file(str(resumed / "final" / "model.safetensors"))
    for key in straight:
        torch.testing.assert_close(again[key], straight[key], rtol=0, atol=0, msg=key)
    def curve(run):
        return [(row["step"], row["train_loss"], row["mIoU"]) for row in read_metrics(run)]

    assert curve(resumed) == curve(tmp_path / "straight") and len(curve(resumed)) == 2


@pytest.mark.slow
def test_sigterm_then_auto_resume_equals_an_uninterrupted_run(tmp_path):
    common = ["--dataset", "fashion_mnist_seg", "--from_scratch", "--max_samples", 64, "--max_train_steps", 60,
              "--eval_every", 10, "--per_gpu_batch_size", 8, "--working_directory", tmp_path, "--log_with", "none",
              "--img_size", 32, "--max_val_samples", 16, "--num_pictures", 0, "--seed", 3,
              "--resume_from_checkpoint", "auto"]
    run_script("finetune_segmentation.py", *common, "--experiment_name", "straight")
    stopped = [*common, "--experiment_name", "stopped"]
    metrics = tmp_path / "stopped" / "metrics.jsonl"  # its first row: step 10 is done, training under way
    returncode, stderr = sigterm_script("finetune_segmentation.py", *stopped, ready=metrics.exists)
    assert returncode == 75, stderr[-2000:]
    step = int(sorted((tmp_path / "stopped" / "checkpoints").glob("step_*"))[-1].name.split("_")[1])
    assert 10 <= step < 60 and not (tmp_path / "stopped" / "final").exists()
    run_script("finetune_segmentation.py", *stopped)
    straight = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    again = load_file(str(tmp_path / "stopped" / "final" / "model.safetensors"))
    assert all(torch.equal(again[key], straight[key]) for key in straight)
    assert [row["mIoU"] for row in read_metrics(tmp_path / "stopped")] == \
        [row["mIoU"] for row in read_metrics(tmp_path / "straight")]


def test_hub_dataset_with_image_and_annotation_columns(tmp_path):
    datasets = pytest.importorskip("datasets")
    image = Image.fromarray(np.full((16, 20, 3), 200, np.uint8))
    mask = np.zeros((16, 20), np.uint8)
    mask[:, 10:] = 4
    splits = datasets.DatasetDict({
        split: datasets.Dataset.from_dict({"image": [image] * 3, "annotation": [Image.fromarray(mask)] * 3},
                                          features=datasets.Features({"image": datasets.Image(),
                                                                      "annotation": datasets.Image()}))
        for split in ("train", "validation")})
    splits.save_to_disk(str(tmp_path / "hub"))
    data = build_segmentation_dataset(f"hf:{tmp_path / 'hub'}", None, "val", 3, zero_is_ignore=True)
    pixels, labels = data[0]
    assert pixels.shape == (3, 16, 20) and labels[0, 0] == IGNORE_INDEX and labels[0, -1] == 3


@pytest.mark.slow
def test_two_processes_evaluate_the_whole_split_once(tmp_path):
    """Each process predicts its share of the validation canvases; the summed confusion matrix must equal a
    single-process evaluation of the final weights over all of them."""
    run_script("finetune_segmentation.py", "--dataset", "fashion_mnist_seg", "--from_scratch", "--max_samples", 64,
               "--max_train_steps", 2, "--per_gpu_batch_size", 8, "--max_val_samples", 37, "--img_size", 32,
               "--num_pictures", 2, "--log_with", "none", "--working_directory", tmp_path, "--experiment_name", "ddp",
               processes=2)
    results = json.loads((tmp_path / "ddp" / "results.json").read_text())
    model = ViTUperNet.from_pretrained(tmp_path / "ddp" / "final").eval()
    canvases = FashionMNISTCanvases("val", size=32)
    normalize = Normalize(*channel_stats(1, "fashion_mnist"))
    metric = SegmentationMetric(11, IGNORE_INDEX, torch.device("cpu"))
    for share in (range(0, 37, 2), range(1, 37, 2)):  # the same batches as the two processes (bitwise same logits)
        images = torch.stack([canvases[i][0] for i in share])
        with torch.no_grad():
            metric.update(model(normalize(images)).logits.argmax(dim=1), torch.stack([canvases[i][1] for i in share]))
    expected = metric.compute()
    assert results["pixel_acc"] == pytest.approx(expected["pixel_acc"], abs=1e-3)
    assert results["mIoU"] == pytest.approx(expected["mIoU"], abs=1e-3)
