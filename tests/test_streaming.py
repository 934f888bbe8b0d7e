"""Streaming 🤗 datasets (--streaming), offline on a local parquet set: each process and loader worker reads its
own part, epochs have a fixed size, and a resumed run continues exactly where it stopped."""
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import copy_stopped_after, read_metrics, run_script
from pipeline.sources import HubOptions
from pipeline.streaming import HeadDataset, HubStream, StreamEpochs, build_stream_loader, open_stream
from pipeline.transforms import RandomResizedCropFlip

datasets = pytest.importorskip("datasets")


@pytest.fixture(autouse=True)
def no_shutdown_pause(monkeypatch):
    """`datasets` pauses 5 s whenever a stream read with threads is closed early, as each epoch's share is here."""
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0, raising=False)


@pytest.fixture(scope="module")
def parquet(tmp_path_factory):
    """48 training rows in 4 files (label = the row's id) and 8 held-out rows: a Hub-style data folder."""
    root = tmp_path_factory.mktemp("stream")
    (root / "data").mkdir()
    rng = np.random.default_rng(0)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    for split, files, per_file in (("train", 4, 12), ("validation", 1, 8)):
        for number in range(files):
            ids = range(number * per_file, (number + 1) * per_file)
            images = [Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)) for _ in ids]
            table = datasets.Dataset.from_dict({"image": images, "label": list(ids)}, features=features)
            table.to_parquet(str(root / "data" / f"{split}-{number:05d}-of-{files:05d}.parquet"))
    return root


def epoch_of(stream: HubStream, count: int, first_step: int = 0) -> list[dict]:
    stream.first_step = first_step
    return [sample for sample, _ in zip(stream, range(count))]


def make(parquet, rank: int, processes: int = 2, workers: int = 1, per_process: int = 4, accumulation: int = 2,
         per_epoch: int = 40):
    data, image_column, label_column = open_stream(str(parquet), "train", HubOptions())
    schedule = StreamEpochs(per_epoch, per_process, accumulation, processes, rank, seed=3, num_workers=workers)
    return HubStream(data, image_column, label_column, 1, schedule, RandomResizedCropFlip(16), num_patches=16,
                     buffer_size=8)


def test_each_process_reads_its_own_part_in_epochs_of_a_fixed_size(parquet):
    first, second = make(parquet, 0), make(parquet, 1)
    assert first.schedule.steps_per_epoch == 5  # 40 images per epoch, global batch 8
    ids = [[s["label"] for s in epoch_of(stream, 20)] for stream in (first, second)]
    assert len(ids[0]) == len(ids[1]) == 20  # an epoch's share each
    assert not set(ids[0]) & set(ids[1]) and set(ids[0]) | set(ids[1]) <= set(range(48))  # no image read twice
    again = [s["label"] for s in epoch_of(make(parquet, 0), 40)]
    assert again[:20] == ids[0] and again[20:] != ids[0]  # the same order on a rerun; the next epoch reshuffles


def test_a_stream_resumed_at_a_step_continues_with_the_same_samples(parquet):
    whole = epoch_of(make(parquet, 1), 30)  # one epoch and a half of process 1's samples (4 per step)
    resumed = epoch_of(make(parquet, 1), 18, first_step=3)  # from step 3: 12 samples in
    for expected, got in zip(whole[12:], resumed):
        assert expected["label"] == got["label"]
        assert torch.equal(expected["pixel_values"], got["pixel_values"])
        assert torch.equal(expected["noise"], got["noise"])


def batches_of(stream: HubStream, count: int, first_step: int = 0) -> list[torch.Tensor]:
    stream.first_step = first_step
    return [batch["label"] for _, batch in zip(range(count), build_stream_loader(stream, 2, torch.device("cpu")))]


def test_loader_workers_read_every_image_once_per_epoch_and_resume_exactly(parquet):
    stream = make(parquet, 0, processes=1, workers=2, per_process=4, accumulation=1, per_epoch=36)  # 9 steps
    batches = batches_of(stream, 21)
    epoch = torch.cat(batches[:9]).tolist()
    assert len(set(epoch)) == 36  # both workers' parts, no image twice
    for first_step in (3, 4, 8):  # odd and even positions, and across the end of an epoch of 9 micro-batches
        resumed = batches_of(stream, 21 - first_step, first_step)
        assert all(torch.equal(a, b) for a, b in zip(batches[first_step:], resumed)), first_step


def test_the_first_images_of_a_split_for_pictures(parquet):
    head = HeadDataset(str(parquet), "val", 5, 3, HubOptions())
    assert len(head) == 5 and head[0][0].shape == (3, 20, 20) and [head[i][1] for i in range(5)] == list(range(5))


@pytest.mark.slow
def test_streamed_pretraining_resumes_exactly(tmp_path, parquet):
    common = ["--dataset", f"hf:{parquet}", "--streaming", "--max_samples", 32, "--working_directory", tmp_path,
              "--per_gpu_batch_size", 8, "--max_train_steps", 8, "--log_every", 2, "--checkpointing_steps", 3,
              "--keep_checkpoints", 0, "--vis_every", 0, "--num_vis_images", 4, "--img_size", 16,
              "--input_channels", 1, "--patch_size", 4, "--encoder_embed_dim", 32, "--encoder_depth", 1,
              "--encoder_num_heads", 2, "--decoder_embed_dim", 32, "--decoder_depth", 1, "--decoder_num_heads", 2,
              "--log_with", "none", "--num_workers", 2]
    run_script("pretrain_mae.py", "--experiment_name", "full", *common)
    full = tmp_path / "full"
    resumed = copy_stopped_after(full, tmp_path / "resumed", 6)
    result = run_script("pretrain_mae.py", "--experiment_name", "resumed", "--resume_from_checkpoint", "latest",
                        *common)
    assert "at step 6" in result.stderr and "32 samples, 4 steps/epoch" in result.stderr
    assert [r["loss"] for r in read_metrics(resumed)] == [r["loss"] for r in read_metrics(full)]
    a, b = load_file(full / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_streamed_pretraining_on_two_processes(tmp_path, parquet):
    run_script("pretrain_mae.py", "--dataset", f"hf:{parquet}", "--streaming", "--max_samples", 32,
               "--working_directory", tmp_path, "--experiment_name", "two", "--per_gpu_batch_size", 4,
               "--max_train_steps", 4, "--log_every", 1, "--vis_every", 0, "--num_vis_images", 4, "--img_size", 16,
               "--input_channels", 1, "--patch_size", 4, "--encoder_embed_dim", 32, "--encoder_depth", 1,
               "--encoder_num_heads", 2, "--decoder_embed_dim", 32, "--decoder_depth", 1, "--decoder_num_heads", 2,
               "--log_with", "none", "--num_workers", 1, processes=2)
    rows = read_metrics(tmp_path / "two")
    assert [row["step"] for row in rows] == [1, 2, 3, 4] and all(np.isfinite(row["loss"]) for row in rows)
    assert (tmp_path / "two" / "final" / "model.safetensors").exists()
