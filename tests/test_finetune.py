"""finetune_classifier.py: the pieces (layer decay, loading, metrics, mixup) and whole runs on Fashion-MNIST."""
import json
import shutil

import pytest
import torch
from conftest import read_metrics, run_in_process, run_script, sigterm_script, without_timing
from safetensors.torch import load_file

from engine.optim import param_groups_layer_decay
from models import MaskedAutoencoder, VisionTransformer
from models.weights import encoder_state, load_encoder, read_weights
from utils.metrics import topk_accuracy

SMALL_MAE = ["--encoder_embed_dim", 64, "--encoder_depth", 2, "--encoder_num_heads", 2, "--decoder_embed_dim", 32,
             "--decoder_depth", 1, "--decoder_num_heads", 2, "--log_with", "none", "--seed", 1]


def small_vit(**overrides) -> VisionTransformer:
    config = dict(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=3, num_heads=2, num_classes=10)
    config.update(overrides)
    return VisionTransformer(**config)


def test_layer_decay_scales_each_block():
    model = small_vit(global_pool=True)
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.5)
    scale_of = {}
    for group in groups:
        for param in group["params"]:
            scale_of[param] = (group["lr_scale"], group["weight_decay"])
    named = dict(model.named_parameters())
    # depth 3: embeddings 0.5^4, block i 0.5^(3 - i), head and fc_norm 1
    assert scale_of[named["patch_embed.proj.weight"]] == (0.5 ** 4, 0.05)
    assert scale_of[named["cls_token"]] == (0.5 ** 4, 0.0)
    for i in range(3):
        assert scale_of[named[f"blocks.{i}.attn.qkv.weight"]] == (0.5 ** (3 - i), 0.05)
        assert scale_of[named[f"blocks.{i}.norm1.weight"]] == (0.5 ** (3 - i), 0.0)
    assert scale_of[named["head.weight"]] == (1.0, 0.05) and scale_of[named["fc_norm.bias"]] == (1.0, 0.0)
    assert sum(len(g["params"]) for g in groups) == len(named)


def test_topk_on_known_logits():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.0, 0.0, 0.0],   # label 1: top-1 hit
                           [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],   # label 1: 2nd -> top-5 hit
                           [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],   # label 0: 6th -> miss
                           [0.0, 0.0, 0.0, 1.0, 0.0, 0.0]])  # label 3: hit
    top1, top5 = topk_accuracy(logits, torch.tensor([1, 1, 0, 3]), ks=(1, 5))
    assert top1 == pytest.approx(50.0) and top5 == pytest.approx(75.0)


def test_mixup_and_cutmix_targets_sum_to_one():
    from timm.data import Mixup

    torch.manual_seed(0)
    for mixup_alpha, cutmix_alpha in ((0.8, 0.0), (0.0, 1.0), (0.8, 1.0)):
        mixup = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, label_smoothing=0.1, num_classes=10)
        images, labels = torch.randn(8, 1, 28, 28), torch.arange(8)
        mixed, targets = mixup(images.clone(), labels)
        assert targets.shape == (8, 10)
        torch.testing.assert_close(targets.sum(1), torch.ones(8))
        assert (targets > 0.2).sum(1).min() >= 1 and not torch.equal(mixed, images)


def test_pretraining_output_maps_every_encoder_weight(tmp_path):
    mae = MaskedAutoencoder(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=3, num_heads=2,
                            decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    mae.save_pretrained(tmp_path)
    config, weights = read_weights(tmp_path)
    for global_pool in (False, True):
        vit = small_vit(global_pool=global_pool)
        state = encoder_state(weights)
        report = load_encoder(vit, state)
        assert set(report.new) <= {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
        assert "head.weight" in report.new and not [k for k in report.unused if not k.startswith("norm.")]
        for name, value in vit.state_dict().items():
            if name in state:
                assert torch.equal(value, state[name]), name
        assert len(report.loaded) == len([k for k in mae.state_dict() if k.startswith("encoder.")]) - (2 if global_pool else 0)


def test_other_architecture_is_refused_naming_the_shapes(tmp_path):
    mae = MaskedAutoencoder(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=3, num_heads=2,
                            decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    state = encoder_state(mae.state_dict())
    with pytest.raises(ValueError, match=r"patch_embed.proj.weight \(32, 1, 4, 4\) in the checkpoint vs \(48, 1, 4, 4\)"):
        load_encoder(small_vit(embed_dim=48), state)
    with pytest.raises(ValueError, match=r"unexpected blocks.2"):
        load_encoder(small_vit(depth=2), state)
    with pytest.raises(ValueError, match=r"missing blocks.3"):
        load_encoder(small_vit(depth=4), state)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, fashion_mnist_dir):
    """A small MAE pretrained for 64 steps on 4096 real Fashion-MNIST images."""
    root = tmp_path_factory.mktemp("pretrained")
    run_script("pretrain_mae.py", "--working_directory", root, "--experiment_name", "mae", "--max_samples", 4096,
               "--per_gpu_batch_size", 64, "--epochs", 1, "--warmup_epochs", 0.1, "--base_learning_rate", 2e-3,
               "--vis_every", 0, "--norm_pix_loss", *SMALL_MAE)
    return root / "mae" / "final"


def test_short_finetune_ends_well_above_chance(tmp_path, pretrained):
    run_script("finetune_classifier.py", "--path_to_pretrained_mae_weights", pretrained, "--working_directory", tmp_path,
               "--experiment_name", "ft", "--max_samples", 2048, "--epochs", 4, "--per_gpu_batch_size", 64,
               "--base_learning_rate", 8e-3, "--max_grad_norm", 1.0, "--min_crop_scale", 0.8, "--max_val_samples", 2000,
               "--log_with", "none")
    results = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert results["top1"] > 40.0 and results["top5"] > 85.0  # chance: 10% / 50% (measured here: 53.8% / 93%)
    assert results["best_top1"] >= results["top1"] and results["args"]["num_classes"] == 10
    rows = read_metrics(tmp_path / "ft")
    assert [r["epoch"] for r in rows] == [1.0, 2.0, 3.0, 4.0] and rows[-1]["train_loss"] < rows[0]["train_loss"]
    classifier = VisionTransformer.from_pretrained(tmp_path / "ft" / "final")
    assert classifier.global_pool and classifier.head.out_features == 10


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["--cache_features", "--no-cache_features"])
def test_linear_probe_leaves_the_encoder_unchanged(tmp_path, pretrained, cache):
    run_script("finetune_classifier.py", "--path_to_pretrained_mae_weights", pretrained, "--working_directory", tmp_path,
               "--experiment_name", "probe", "--linear_probe", cache, "--max_samples", 1024, "--epochs", 20,
               "--per_gpu_batch_size", 128, "--warmup_epochs", 2, "--base_learning_rate", 6.4, "--max_val_samples", 2000,
               "--log_with", "none")  # LARS at batch 128 needs a large base lr (53% measured here)
    before = encoder_state(load_file(pretrained / "model.safetensors"))
    after = load_file(tmp_path / "probe" / "final" / "model.safetensors")
    for name, value in before.items():
        assert torch.equal(after[name], value), name  # every encoder weight, the final norm included
    probe = VisionTransformer.from_pretrained(tmp_path / "probe" / "final")
    assert isinstance(probe.head[0], torch.nn.BatchNorm1d) and not probe.head[0].affine
    assert probe.head[0].running_mean.abs().sum() > 0  # the BatchNorm saw the features
    assert json.loads((tmp_path / "probe" / "results.json").read_text())["top1"] > 30.0  # chance: 10%


@pytest.mark.slow
def test_resumed_finetune_equals_uninterrupted(tmp_path, pretrained):
    common = ["--path_to_pretrained_mae_weights", pretrained, "--working_directory", tmp_path, "--max_samples", 96,
              "--per_gpu_batch_size", 16, "--gradient_accumulation_steps", 2, "--epochs", 2, "--mixup_alpha", 0.8,
              "--cutmix_alpha", 1.0, "--random_erasing", 0.25, "--drop_path", 0.2, "--random_aug_magnitude", 5,
              "--checkpointing_steps", 4, "--keep_checkpoints", 0, "--log_with", "none", "--model_ema",
              "--max_val_samples", 200]
    run_script("finetune_classifier.py", "--experiment_name", "full", *common)
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    for later in ("step_00000008", "step_00000012"):
        shutil.rmtree(tmp_path / "resumed" / "checkpoints" / later)
    run_script("finetune_classifier.py", "--experiment_name", "resumed", "--resume_from_checkpoint", "latest", *common)
    full, resumed = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "resumed")
    assert [r["train_loss"] for r in full] == [r["train_loss"] for r in resumed]
    assert [r["top1"] for r in full] == [r["top1"] for r in resumed]
    a = load_file(tmp_path / "full" / "final" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_inputs_give_one_line_errors(tmp_path, pretrained):
    import numpy as np
    from PIL import Image

    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(4):
        for folder in (flat, tmp_path / "unlabeled_val" / "train" / f"class{i % 2}", tmp_path / "unlabeled_val" / "val",
                       tmp_path / "unlabeled" / "train", tmp_path / "unlabeled" / "val"):
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(folder / f"{i}.png")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 64)
    cases = [
        (["--path_to_pretrained_mae_weights", pretrained, "--num_classes", 7], "--num_classes 7 but the data has 10 classes"),
        (["--path_to_pretrained_mae_weights", pretrained, "--path_to_data", flat], "no val/ or validation/ folder under"),
        (["--path_to_pretrained_mae_weights", pretrained, "--path_to_data", tmp_path / "unlabeled_val"],
         "the validation split has no labels"),
        (["--path_to_pretrained_mae_weights", pretrained, "--path_to_data", tmp_path / "unlabeled"],
         "the training data has no labels"),
        (["--path_to_pretrained_mae_weights", tmp_path / "broken.safetensors"], "the file is damaged or not safetensors"),
        (["--path_to_pretrained_mae_weights", pretrained, "--input_channels", 3],
         "patch_embed.proj.weight (64, 1, 4, 4) in the checkpoint vs (64, 3, 4, 4) in the model"),
        (["--path_to_pretrained_mae_weights", tmp_path / "nothing"], "no weights at"),
        ([], "no pretrained weights: pass --path_to_pretrained_mae_weights"),
        (["--path_to_pretrained_mae_weights", pretrained, "--max_bad_steps", 0],
         "--max_bad_steps must be positive, got 0"),
        (["--path_to_pretrained_mae_weights", pretrained, "--auto_augment", "rand-x9"],
         "--auto_augment rand-x9: timm cannot read this policy"),
        (["--path_to_pretrained_mae_weights", pretrained, "--auto_augment", "rand-m9", "--random_aug_magnitude", 9],
         "--auto_augment and --random_aug_magnitude are two RandAugments"),
    ]
    for flags, message in cases:
        code, stderr = run_in_process("finetune_classifier.py", "--working_directory", tmp_path, "--max_samples", 64,
                                      "--log_with", "none", *flags)
        lines = [line for line in stderr.strip().splitlines() if line.strip() and " INFO " not in line]
        assert code == 2 and len(lines) == 1 and message in lines[0], (flags, stderr[-2000:])
        assert lines[0].startswith("finetune_classifier.py: error:")
    # The same through the real command line: one line, no traceback (the INFO lines are the run's log).
    result = run_script("finetune_classifier.py", "--working_directory", tmp_path, "--path_to_pretrained_mae_weights",
                        tmp_path / "broken.safetensors", "--log_with", "none", check=False)
    lines = [line for line in result.stderr.strip().splitlines() if line.strip() and " INFO " not in line]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert "the file is damaged or not safetensors" in lines[0]
    assert lines[0].startswith("finetune_classifier.py: error:") and "Traceback" not in result.stderr


@pytest.mark.slow
def test_eval_only_keeps_the_run_records(tmp_path, pretrained):
    common = ["--path_to_pretrained_mae_weights", pretrained, "--working_directory", tmp_path, "--experiment_name", "ft",
              "--max_samples", 256, "--epochs", 1, "--per_gpu_batch_size", 64, "--max_val_samples", 300,
              "--log_with", "none"]
    run_script("finetune_classifier.py", *common)
    before = {name: (tmp_path / "ft" / name).read_text() for name in ("metrics.jsonl", "results.json", "args.json")}
    run_script("finetune_classifier.py", *common, "--eval_only", "--resume_from_checkpoint", "latest")
    assert {name: (tmp_path / "ft" / name).read_text() for name in before} == before
    evaluated = json.loads((tmp_path / "ft" / "eval_results.json").read_text())
    assert evaluated["top1"] == pytest.approx(json.loads(before["results.json"])["top1"])
    report = json.loads((tmp_path / "ft" / "weights_report.json").read_text())
    assert "blocks.0.attn.qkv.weight" in report["loaded"] and report["new"] == ["head.bias", "head.weight"]


def test_linear_probe_optimizer_is_lars_with_momentum():
    from argparse import Namespace

    from tasks.classification import build_optimizer

    torch.manual_seed(0)
    model = small_vit(head_type="linear_probe")
    optimizer = build_optimizer("linear_probe", model.head, model, Namespace(), 0.1, torch.device("cpu"))
    assert type(optimizer).__name__ == "Lars" and all(g["momentum"] == 0.9 and g["weight_decay"] == 0.0
                                                       for g in optimizer.param_groups)
    weight = model.head[1].weight
    before = weight.detach().clone()
    model.head(torch.randn(16, 32)).logsumexp(1).sum().backward()
    grad = weight.grad.clone()
    optimizer.step()
    # The trust ratio rescales the weight's step: it is not plain SGD.
    trust = 1e-3 * before.norm() / grad.norm()
    torch.testing.assert_close(weight.detach() - before, -0.1 * grad * trust, rtol=1e-4, atol=1e-9)
    assert not torch.allclose(weight.detach() - before, -0.1 * grad)


@pytest.mark.slow
def test_sigterm_then_auto_resume_equals_an_uninterrupted_finetune(tmp_path, fashion_mnist_dir):
    """SIGTERM stops fine-tuning after the current step with a checkpoint (exit 75); the requeued command continues
    and ends with the uninterrupted run's metrics and weights."""
    common = ["--from_scratch", "--max_samples", 512, "--max_val_samples", 128, "--per_gpu_batch_size", 32,
              "--epochs", 6, "--log_with", "none", "--resume_from_checkpoint", "auto", "--seed", 3]
    run_script("finetune_classifier.py", "--working_directory", tmp_path, "--experiment_name", "whole", *common)
    stopped = ["--working_directory", tmp_path, "--experiment_name", "stopped", *common]
    metrics = tmp_path / "stopped" / "metrics.jsonl"  # its first row: the first epoch is done, training under way
    returncode, stderr = sigterm_script("finetune_classifier.py", *stopped, ready=metrics.exists)
    assert returncode == 75, stderr[-2000:]
    assert not (tmp_path / "stopped" / "results.json").exists()
    run_script("finetune_classifier.py", *stopped)

    def rows(name):
        return without_timing(json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines())

    assert rows("stopped") == rows("whole") and len(rows("whole")) == 6
    assert json.loads((tmp_path / "stopped" / "results.json").read_text())["top1"] == \
        json.loads((tmp_path / "whole" / "results.json").read_text())["top1"]
    for name, tensor in load_file(tmp_path / "whole" / "final" / "model.safetensors").items():
        assert torch.equal(tensor, load_file(tmp_path / "stopped" / "final" / "model.safetensors")[name]), name
