import json

import pytest
import torch

from models import MaskedAutoencoder, patchify, random_masking, unpatchify


def tiny_mae(**overrides) -> MaskedAutoencoder:
    config = dict(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16,
                  decoder_depth=1, decoder_num_heads=2)
    config.update(overrides)
    torch.manual_seed(0)
    return MaskedAutoencoder(**config)


@pytest.mark.parametrize("channels,size,patch", [(1, 28, 4), (3, 32, 8), (2, 12, 3)])
def test_patchify_roundtrip_and_layout(channels, size, patch):
    images = torch.randn(2, channels, size, size)
    patches = patchify(images, patch)
    grid = size // patch
    assert patches.shape == (2, grid * grid, patch * patch * channels)
    # Patch 1 is the second patch of the first row, flattened as (p, p, C).
    expected = images[0, :, :patch, patch:2 * patch].permute(1, 2, 0).reshape(-1)
    torch.testing.assert_close(patches[0, 1], expected)
    torch.testing.assert_close(unpatchify(patches, patch, (grid, grid), channels), images)


def test_masking_keeps_the_smallest_noise_and_is_deterministic():
    tokens = torch.arange(2 * 10 * 3, dtype=torch.float32).reshape(2, 10, 3)
    noise = torch.rand(2, 10, generator=torch.Generator().manual_seed(1))
    visible, mask, restore_ids = random_masking(tokens, 0.75, noise)
    keep = int(10 * (1 - 0.75))
    assert visible.shape == (2, keep, 3)
    assert mask.sum(1).tolist() == [10 - keep] * 2
    for b in range(2):
        kept = torch.argsort(noise[b])[:keep]
        torch.testing.assert_close(visible[b], tokens[b, kept])
        assert mask[b, kept].sum() == 0
    again = random_masking(tokens, 0.75, noise.clone())
    torch.testing.assert_close(again[1], mask)
    torch.testing.assert_close(again[0], visible)
    # restore_ids inverts the shuffle
    assert torch.equal(torch.argsort(noise, 1).gather(1, restore_ids), torch.arange(10).expand(2, -1))


def test_same_noise_same_output_different_noise_different_mask():
    model = tiny_mae().eval()
    images = torch.randn(3, 1, 28, 28)
    noise = torch.rand(3, 49)
    first, second = model(images, noise=noise), model(images, noise=noise)
    torch.testing.assert_close(first.loss, second.loss)
    torch.testing.assert_close(first.pred, second.pred)
    assert first.mask.sum(1).tolist() == [49 - int(49 * 0.25)] * 3
    assert not torch.equal(model(images, noise=torch.rand(3, 49)).mask, first.mask)


def test_loss_depends_only_on_masked_patches():
    model = tiny_mae()
    images = torch.randn(2, 1, 28, 28)
    out = model(images)
    visible = (out.mask == 0).unsqueeze(-1)
    changed_visible = torch.where(visible, out.pred + 5.0, out.pred)
    changed_masked = torch.where(visible, out.pred, out.pred + 5.0)
    torch.testing.assert_close(model.forward_loss(images, changed_visible, out.mask), out.loss)
    assert model.forward_loss(images, changed_masked, out.mask) > out.loss + 1.0
    # and equals the mean squared error over the masked patches, computed directly
    target = patchify(images, 4)
    masked = out.mask.bool()
    torch.testing.assert_close(out.loss, ((out.pred - target) ** 2)[masked].mean())


def test_norm_pix_loss_target_and_reconstruction():
    model = tiny_mae(norm_pix_loss=True)
    images = torch.rand(2, 1, 28, 28)
    target = model.target(images)
    torch.testing.assert_close(target.mean(-1), torch.zeros(2, 49), atol=1e-5, rtol=0)
    torch.testing.assert_close(target.var(-1), torch.ones(2, 49), atol=1e-3, rtol=0)
    # A perfect normalised prediction de-normalises back to the image itself.
    torch.testing.assert_close(model.reconstruct(target, images), images, atol=1e-5, rtol=0)


def test_save_and_load_pretrained_identical(tmp_path):
    model = tiny_mae(norm_pix_loss=True, mask_ratio=0.6).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "config.json").exists()
    loaded = MaskedAutoencoder.from_pretrained(tmp_path).eval()
    assert loaded.mask_ratio == 0.6 and loaded.norm_pix_loss
    images, noise = torch.randn(2, 1, 28, 28), torch.rand(2, 49)
    a, b = model(images, noise=noise), loaded(images, noise=noise)
    assert torch.equal(a.pred, b.pred) and torch.equal(a.loss, b.loss)
    # Loading is strict: weights of a deeper model are refused, not half-loaded.
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "depth": 3}))
    with pytest.raises(ValueError, match="another architecture: missing encoder.blocks.2"):
        MaskedAutoencoder.from_pretrained(tmp_path)


def test_official_initialisation():
    model = tiny_mae(embed_dim=64, custom_weight_init=True)
    qkv = model.encoder.blocks[0].attn.qkv.weight
    bound = (6 / (qkv.shape[0] + qkv.shape[1])) ** 0.5
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.9 * bound
    assert torch.count_nonzero(model.encoder.blocks[0].attn.qkv.bias) == 0
    proj = model.encoder.patch_embed.proj.weight  # xavier as a (D, p*p*C) linear
    fan_bound = (6 / (proj.shape[0] + proj[0].numel())) ** 0.5
    assert proj.abs().max() <= fan_bound and proj.abs().max() > 0.9 * fan_bound
    assert 0.015 < model.mask_token.std() < 0.025 and 0.01 < model.encoder.cls_token.std() < 0.03
    default = tiny_mae(custom_weight_init=False)
    assert torch.count_nonzero(default.mask_token) == 0  # PyTorch defaults: tokens start at zero


def test_mixed_precision_forward_on_cpu():
    model = tiny_mae()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 1, 28, 28))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bad_mask_ratio_is_refused():
    with pytest.raises(ValueError, match="mask_ratio must be in"):
        tiny_mae(mask_ratio=1.0)


@pytest.mark.slow
def test_compiled_regions_match_eager_and_a_changing_mask_ratio_stops_recompiling():
    """--compile (each block, plus the MAE's encoder input, decoder input, and prediction with the loss) gives the
    eager model's loss, prediction and gradients. The mask-ratio curriculum changes the count of visible patches
    every few steps: after one recompilation the shapes are dynamic, and further ratios compile nothing."""
    from argparse import Namespace

    from torch._dynamo.utils import counters

    from engine.step import apply_speed_options

    torch._dynamo.reset()  # (no compiled code from earlier tests in this process: count this test's compilations)
    eager, compiled = tiny_mae(), tiny_mae()
    apply_speed_options(compiled, Namespace(compile=True, gradient_checkpointing=False))
    assert compiled.compile_regions and not eager.compile_regions
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # names unchanged: checkpoints are the same
    images = torch.randn(4, 1, 28, 28)
    noise = torch.rand(4, 49)

    def run(model, ratio):
        model.zero_grad()
        out = model(images, noise=noise, mask_ratio=ratio)
        out.loss.backward()
        return out, {name: p.grad.clone() for name, p in model.named_parameters()}

    graphs, before = [], counters["stats"]["unique_graphs"]
    for ratio in (0.75, 0.7, 0.65, 0.6, 0.5, 0.45):
        (expected, expected_grads), (got, got_grads) = run(eager, ratio), run(compiled, ratio)
        assert got.mask.sum().item() == 4 * (49 - int(49 * (1 - ratio)))
        torch.testing.assert_close(got.mask, expected.mask)
        torch.testing.assert_close(got.loss, expected.loss, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got.pred, expected.pred, rtol=1e-4, atol=1e-5)
        for name, grad in expected_grads.items():
            torch.testing.assert_close(got_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)
        graphs.append(counters["stats"]["unique_graphs"] - before)
    assert graphs[0] >= 4  # the three regions and the blocks were compiled
    assert graphs[2:] == [graphs[1]] * 4, graphs  # from the third ratio on, nothing recompiles
