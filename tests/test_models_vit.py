import math

import pytest
import torch

from models import MAE_PRESETS, MaskedAutoencoder, VisionTransformer, mae_config, sincos_pos_embed_2d


def reference_sincos(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Element by element: [sin(col w), cos(col w), sin(row w), cos(row w)], w_k = 10000^(-k / (dim/4))."""
    quarter = dim // 4
    out = torch.zeros(1 + grid_h * grid_w, dim, dtype=torch.float64)
    for row in range(grid_h):
        for col in range(grid_w):
            for k in range(quarter):
                w = 10000 ** (-k / quarter)
                token = 1 + row * grid_w + col
                out[token, k] = math.sin(col * w)
                out[token, quarter + k] = math.cos(col * w)
                out[token, 2 * quarter + k] = math.sin(row * w)
                out[token, 3 * quarter + k] = math.cos(row * w)
    return out.float().unsqueeze(0)


@pytest.mark.parametrize("dim,grid", [(16, (3, 3)), (32, (2, 5)), (192, (7, 7))])
def test_sincos_matches_reference(dim, grid):
    torch.testing.assert_close(sincos_pos_embed_2d(dim, grid), reference_sincos(dim, *grid), atol=1e-6, rtol=0)


def test_sincos_rejects_width_not_divisible_by_4():
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(30, (2, 2))


@pytest.mark.parametrize("name", sorted(MAE_PRESETS))
def test_presets_build_and_give_shapes(name):
    config = mae_config(name, depth=1, decoder_depth=1)  # full widths and patch sizes, one block to stay fast
    model = MaskedAutoencoder(**config)
    images = torch.randn(2, config["in_chans"], config["img_size"], config["img_size"])
    out = model(images)
    patches = (config["img_size"] // config["patch_size"]) ** 2
    assert out.pred.shape == (2, patches, config["patch_size"] ** 2 * config["in_chans"])
    assert out.mask.shape == (2, patches)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)


@pytest.mark.parametrize("channels,img_size,patch", [(1, 28, 4), (3, 32, 8), (5, 24, 4), (4, 48, 16)])
def test_any_channels_and_sizes(channels, img_size, patch):
    model = VisionTransformer(img_size=img_size, patch_size=patch, in_chans=channels, embed_dim=32, depth=2,
                              num_heads=2, num_classes=7, global_pool=True)
    assert model(torch.randn(3, channels, img_size, img_size)).shape == (3, 7)
    features = model.forward_features(torch.randn(3, channels, img_size, img_size))
    assert features.shape == (3, 1 + (img_size // patch) ** 2, 32)


def test_image_size_not_divisible_is_refused_with_the_sizes():
    with pytest.raises(ValueError, match=r"img_size 30x30 is not divisible by patch_size 4"):
        VisionTransformer(img_size=30, patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=2)


def test_wrong_input_shape_is_refused():
    model = VisionTransformer(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 1, 28, 28\), got \(2, 3, 28, 28\)"):
        model(torch.randn(2, 3, 28, 28))


def test_pooling_modes():
    torch.manual_seed(0)
    images = torch.randn(2, 1, 28, 28)
    cls_model = VisionTransformer(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=2)
    tokens = cls_model.forward_features(images)
    torch.testing.assert_close(cls_model(images), tokens[:, 0])
    pool_model = VisionTransformer(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=2,
                                   global_pool=True)
    tokens = pool_model.forward_features(images)
    expected = torch.nn.functional.layer_norm(tokens[:, 1:].mean(1), (32,), pool_model.fc_norm.weight,
                                              pool_model.fc_norm.bias, eps=1e-6)
    torch.testing.assert_close(pool_model(images), expected)


def test_drop_path_zeroes_whole_samples_and_scales_the_kept_ones():
    """Each sample's branch is dropped whole or kept and scaled by 1 / keep_prob (the expectation is unchanged)."""
    from models.vit import DropPath

    torch.manual_seed(0)
    x = torch.randn(512, 5, 8)
    out = DropPath(0.25).train()(x)
    kept = out.flatten(1).abs().sum(dim=1) > 0
    torch.testing.assert_close(out[kept], x[kept] / 0.75)
    assert (out[~kept] == 0).all() and 0.65 < kept.float().mean().item() < 0.85
    assert DropPath(0.25).eval()(x) is x


def test_drop_path_is_identity_in_eval_and_stochastic_in_train():
    torch.manual_seed(0)
    model = VisionTransformer(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=4, num_heads=2,
                              drop_path_rate=0.5)
    images = torch.randn(4, 1, 28, 28)
    model.eval()
    torch.testing.assert_close(model(images), model(images))
    model.train()
    assert not torch.allclose(model(images), model(images))
