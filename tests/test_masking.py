"""models/masking.py: the mask strategies and the curriculum, and their use in pretrain_mae.py."""
import shutil

import pytest
import torch

from conftest import read_metrics, run_script
from models import MaskedAutoencoder, random_masking
from models.masking import curriculum_ratio, grid_cell, mask_noise


def masks_of(strategy, grid=(8, 8), ratio=0.75, count=20, seed=0):
    noise = torch.stack([mask_noise(strategy, grid, ratio, torch.Generator().manual_seed(seed + i))
                         for i in range(count)])
    _, mask, _ = random_masking(torch.zeros(count, grid[0] * grid[1], 4), ratio, noise)
    return mask.view(count, *grid)


def components(mask: torch.Tensor) -> int:
    """4-connected regions of masked patches."""
    seen, regions = set(), 0
    for start in zip(*torch.nonzero(mask, as_tuple=True)):
        start = tuple(int(v) for v in start)
        if start in seen:
            continue
        regions += 1
        stack = [start]
        while stack:
            row, col = stack.pop()
            if (row, col) in seen or not (0 <= row < mask.shape[0] and 0 <= col < mask.shape[1]) or not mask[row, col]:
                continue
            seen.add((row, col))
            stack += [(row + 1, col), (row - 1, col), (row, col + 1), (row, col - 1)]
    return regions


@pytest.mark.parametrize("strategy", ["random", "block", "grid"])
def test_every_strategy_masks_the_exact_count_and_is_seeded(strategy):
    masks = masks_of(strategy)
    assert (masks.flatten(1).sum(1) == int(64 * 0.75)).all()
    assert torch.equal(masks, masks_of(strategy))  # same generators, same masks
    assert not torch.equal(masks, masks_of(strategy, seed=100))


def test_block_masks_are_clustered_and_grid_masks_a_lattice():
    block = sum(components(m) for m in masks_of("block", grid=(14, 14), ratio=0.5))
    random = sum(components(m) for m in masks_of("random", grid=(14, 14), ratio=0.5))
    assert block * 3 < random, (block, random)
    for mask in masks_of("grid", grid=(8, 8), ratio=0.75):
        visible = torch.nonzero(mask == 0)
        assert len(visible) == 16
        assert len(set((visible[:, 0] % 2).tolist())) == 1 and len(set((visible[:, 1] % 2).tolist())) == 1
        assert (torch.unique(visible[:, 0]).diff() == 2).all()


def test_grid_refuses_ratios_it_cannot_give():
    assert grid_cell(0.75) == 2 and grid_cell(1 - 1 / 9) == 3
    with pytest.raises(ValueError, match=r"must be 1 - 1/s\^2 \(0.75, 0.8889, 0.9375"):
        grid_cell(0.6)


def test_curriculum_follows_the_formula():
    assert curriculum_ratio(0, 100, 0.75, 0.5, 2) == 0.5
    assert curriculum_ratio(100, 100, 0.75, 0.5, 2) == pytest.approx(0.625)
    assert curriculum_ratio(200, 100, 0.75, 0.5, 2) == 0.75 == curriculum_ratio(999, 100, 0.75, 0.5, 2)
    assert curriculum_ratio(50, 100, 0.75, None, 2) == 0.75


def test_the_model_draws_its_strategy_without_noise():
    model = MaskedAutoencoder(img_size=32, patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=2,
                              decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, mask_strategy="grid")
    mask = model(torch.randn(3, 1, 32, 32)).mask.view(3, 8, 8)
    assert (mask.flatten(1).sum(1) == 48).all() and all(len(torch.nonzero(m == 0)) == 16 for m in mask)
    with pytest.raises(ValueError, match="unknown mask_strategy 'checkerboard'"):
        MaskedAutoencoder(mask_strategy="checkerboard")


@pytest.mark.slow
def test_block_curriculum_run_logs_the_ratio_and_resumes_exactly(tmp_path, fashion_mnist_dir):
    common = ["--max_samples", 256, "--per_gpu_batch_size", 32, "--max_train_steps", 8, "--log_every", 1,
              "--mask_strategy", "block", "--mask_ratio_start", 0.5, "--mask_curriculum_epochs", 1,
              "--encoder_embed_dim", 32, "--encoder_depth", 1, "--encoder_num_heads", 2, "--decoder_embed_dim", 16,
              "--decoder_depth", 1, "--decoder_num_heads", 2, "--log_with", "none", "--working_directory", tmp_path]
    run_script("pretrain_mae.py", *common, "--experiment_name", "straight")
    rows = read_metrics(tmp_path / "straight")
    assert [row["mask_ratio"] for row in rows] == pytest.approx([0.5 + 0.25 * s / 8 for s in range(8)])
    run_script("pretrain_mae.py", *common, "--experiment_name", "resumed", "--checkpointing_steps", 4)
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_00000008")  # as if stopped after step 4's checkpoint
    run_script("pretrain_mae.py", *common, "--experiment_name", "resumed", "--resume_from_checkpoint", "latest")
    assert [(r["step"], r["loss"], r["mask_ratio"]) for r in read_metrics(tmp_path / "resumed")] == \
        [(r["step"], r["loss"], r["mask_ratio"]) for r in rows]


def test_high_frequency_loss_sees_masked_detail_only():
    from models.losses import high_frequency_loss

    torch.manual_seed(0)
    target = torch.rand(2, 1, 16, 16)
    pixel_mask = torch.zeros(2, 1, 16, 16)
    pixel_mask[:, :, :8] = 1  # top half masked
    assert high_frequency_loss(target.clone(), target, pixel_mask) == 0
    blurred = torch.nn.functional.avg_pool2d(target, 3, 1, 1)
    assert high_frequency_loss(blurred, target, pixel_mask) > 0.01
    changed_visible = target.clone()
    changed_visible[:, :, 8:] = 0  # the visible half: not judged
    assert high_frequency_loss(changed_visible, target, pixel_mask) == 0


def test_uniformity_equals_the_formula_and_prefers_spread_embeddings():
    from models.losses import uniformity_loss

    torch.manual_seed(0)
    spread = torch.randn(16, 8)
    collapsed = torch.ones(16, 8) + 0.01 * torch.randn(16, 8)
    assert uniformity_loss(spread) < uniformity_loss(collapsed)
    z = torch.nn.functional.normalize(spread, dim=-1)
    pairs = [(i, j) for i in range(16) for j in range(i + 1, 16)]
    direct = torch.stack([torch.exp(-2 * (z[i] - z[j]).pow(2).sum()) for i, j in pairs]).mean().log()
    torch.testing.assert_close(uniformity_loss(spread), direct)


def test_improved_recipe_run_logs_each_term_and_lowers_its_loss(tmp_path, fashion_mnist_dir):
    run_script("pretrain_mae.py", "--recipe", "improved", "--max_samples", 2048, "--per_gpu_batch_size", 64,
               "--epochs", 2, "--log_every", 4, "--base_learning_rate", 2e-3, "--warmup_epochs", 0.1,
               "--encoder_embed_dim", 64, "--encoder_depth", 2, "--encoder_num_heads", 2, "--decoder_embed_dim", 32,
               "--decoder_depth", 1, "--decoder_num_heads", 2, "--log_with", "none", "--working_directory", tmp_path,
               "--experiment_name", "improved")
    rows = read_metrics(tmp_path / "improved")
    assert {"loss", "loss_pixel", "loss_hf", "loss_uniformity", "mask_ratio"} <= set(rows[0])
    assert rows[0]["mask_ratio"] < 0.55 and rows[-1]["mask_ratio"] == pytest.approx(0.75)
    assert rows[-1]["loss_pixel"] < 0.7 * rows[0]["loss_pixel"] and rows[-1]["loss"] < rows[0]["loss"]


def test_masked_psnr_equals_the_hand_computation():
    from utils.metrics import masked_psnr

    original = torch.zeros(1, 1, 4, 4)
    reconstruction = torch.full((1, 1, 4, 4), 0.1)
    reconstruction[..., :2, :] = 0.5  # visible rows: their error must not count
    pixel_mask = torch.zeros(1, 1, 4, 4)
    pixel_mask[..., 2:, :] = 1
    assert masked_psnr(reconstruction, original, pixel_mask) == pytest.approx(20.0)  # MSE 0.01 -> 10 log10(100)
