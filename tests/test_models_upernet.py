"""models/upernet.py: feature levels, neck strides, head output size, backbone loading, layer decay, metric."""
import math

import pytest
import torch
import torch.nn as nn

from engine.optim import param_groups_layer_decay
from models import MaskedAutoencoder
from models.upernet import SegmentationOutput, ViTUperNet, default_out_indices
from models.weights import encoder_state, load_encoder, read_weights
from tasks.segmentation import predict
from utils.metrics import SegmentationMetric, iou_from_confusion


def small_upernet(patch_size=16, depth=4, img_size=64, **overrides) -> ViTUperNet:
    config = dict(num_classes=5, img_size=img_size, patch_size=patch_size, in_chans=3, embed_dim=32, depth=depth,
                  num_heads=2, decoder_channels=16, aux_channels=8)
    config.update(overrides)
    return ViTUperNet(**config)


def test_default_out_indices_match_mae_and_spread_evenly():
    assert default_out_indices(12) == [3, 5, 7, 11]  # MAE / BEiT ViT-B
    assert default_out_indices(24) == [7, 11, 15, 23]  # MAE / BEiT ViT-L
    assert default_out_indices(4) == [0, 1, 2, 3]
    for depth in range(4, 33):
        indices = default_out_indices(depth)
        assert len(set(indices)) == 4 and indices == sorted(indices) and indices[-1] == depth - 1
    with pytest.raises(ValueError, match="at least 4 blocks"):
        default_out_indices(3)


@pytest.mark.parametrize("patch_size,depth", [(16, 12), (16, 4), (8, 6), (4, 5), (32, 4)])
def test_neck_gives_strides_p4_p2_p_2p_with_embed_dim_channels(patch_size, depth):
    img_size = 4 * patch_size  # grid 4x4: the max-pooled level is 2x2
    model = small_upernet(patch_size, depth, img_size).eval()
    images = torch.randn(2, 3, img_size, img_size)
    maps = model.backbone.forward_intermediates(images, model.out_indices)
    assert [tuple(m.shape) for m in maps] == [(2, 32, 4, 4)] * 4
    levels = model.neck(maps)
    strides = [patch_size // 4, patch_size // 2, patch_size, 2 * patch_size]
    assert [tuple(level.shape) for level in levels] == [(2, 32, img_size // s, img_size // s) for s in strides]


def test_intermediate_features_are_the_block_outputs():
    model = small_upernet(depth=6).eval()
    vit, images = model.backbone, torch.randn(2, 3, 64, 64)
    maps = vit.forward_intermediates(images, [0, 2, 3, 5])  # each (B, D, 4, 4)
    tokens, expected = vit.prepend_cls_token(vit.embed_patches(images)), []
    for index, block in enumerate(vit.blocks):
        tokens = block(tokens)
        if index in (0, 2, 3, 5):
            expected.append(tokens[:, 1:])
    for feature_map, block_tokens in zip(maps, expected, strict=True):
        torch.testing.assert_close(feature_map.flatten(2).transpose(1, 2), block_tokens)
    torch.testing.assert_close(maps[-1].flatten(2).transpose(1, 2), vit.forward_features(images)[:, 1:])


def test_logits_have_the_input_size_and_aux_only_in_training():
    model = small_upernet(patch_size=8, img_size=48)
    images = torch.randn(2, 3, 48, 48)
    output = model.train()(images)
    assert output.logits.shape == (2, 5, 48, 48) and output.aux_logits.shape == (2, 5, 48, 48)
    assert model.eval()(images).aux_logits is None
    assert small_upernet(aux_channels=0).aux_head is None


def test_bad_sizes_are_refused_in_one_line():
    with pytest.raises(ValueError, match="multiple of 4"):
        small_upernet(patch_size=6, img_size=48)
    for bad in ([0, 1, 2, 9], [0, 2, 1, 3], [0, 1, 1, 3], [0, 1, 2]):
        with pytest.raises(ValueError, match="out_indices must be 4 increasing"):
            small_upernet(out_indices=bad)
    with pytest.raises(ValueError, match="ending at the last block"):  # later blocks would get no gradient
        small_upernet(depth=6, out_indices=[0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, 64, 64\)"):
        small_upernet()(torch.randn(1, 3, 32, 32))


def test_pretrained_mae_encoder_loads_every_weight(tmp_path):
    mae = MaskedAutoencoder(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=4, num_heads=2,
                            decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    mae.save_pretrained(tmp_path / "mae")
    config, weights = read_weights(tmp_path / "mae")
    state = encoder_state(weights)
    model = small_upernet(patch_size=8, img_size=64)  # another image size: position embeddings are recomputed
    report = load_encoder(model.backbone, state, new_ok=(), unused_ok=("norm.",))
    assert report.new == [] and report.unused == ["norm.bias", "norm.weight"]
    assert set(report.loaded) == set(model.backbone.state_dict())
    for key in report.loaded:
        torch.testing.assert_close(model.backbone.state_dict()[key], mae.state_dict()[f"encoder.{key}"])
    deeper = small_upernet(patch_size=8, img_size=64, depth=6)
    with pytest.raises(ValueError, match="another architecture"):
        load_encoder(deeper.backbone, state, new_ok=(), unused_ok=("norm.",))


def test_layer_decay_reaches_into_the_backbone_and_leaves_the_decoder_at_full_rate():
    model = small_upernet(depth=4)
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.5, vit_prefix="backbone.")
    scale = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert scale[id(named["backbone.patch_embed.proj.weight"])] == (0.5 ** 5, 0.05)
    assert scale[id(named["backbone.cls_token"])] == (0.5 ** 5, 0.0)
    assert scale[id(named["backbone.blocks.0.norm1.weight"])] == (0.5 ** 4, 0.0)
    assert scale[id(named["backbone.blocks.3.mlp.fc1.weight"])] == (0.5, 0.05)
    assert scale[id(named["backbone.blocks.3.mlp.fc1.bias"])] == (0.5, 0.0)
    assert scale[id(named["decode_head.classifier.weight"])] == (1.0, 0.05)
    assert scale[id(named["decode_head.fuse.1.weight"])] == (1.0, 0.0)  # BatchNorm
    assert scale[id(named["neck.up2.weight"])] == (1.0, 0.05)
    assert sum(len(g["params"]) for g in groups) == len(named)


def test_miou_matches_the_hand_computation_and_ignores_255():
    target = torch.tensor([[0, 0, 1], [1, 2, 255]])
    prediction = torch.tensor([[0, 1, 1], [1, 2, 0]])  # the ignored pixel's prediction must not count
    metric = SegmentationMetric(num_classes=4, ignore_index=255, device=torch.device("cpu"))
    metric.update(prediction, target)
    result = metric.compute()
    # class 0: 1 / (2 + 1 - 1); class 1: 2 / (2 + 3 - 2); class 2: 1 / 1; class 3 absent: NaN, not averaged
    assert result["per_class_iou"][:3] == pytest.approx([50.0, 200 / 3, 100.0])
    assert math.isnan(result["per_class_iou"][3])
    assert result["mIoU"] == pytest.approx((50.0 + 200 / 3 + 100.0) / 3)
    assert result["pixel_acc"] == pytest.approx(80.0)
    # a class predicted but never true has IoU 0 and counts
    assert iou_from_confusion(torch.tensor([[3, 1], [0, 0]]))["per_class_iou"] == pytest.approx([75.0, 0.0])


class PixelwiseModel(nn.Module):
    """A per-pixel model: any tiling of the image into windows must give the same logits as one pass."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, images):
        return SegmentationOutput(self.conv(images))


@pytest.mark.parametrize("height,width", [(32, 32), (45, 77), (20, 50), (32, 100)])
def test_sliding_window_inference_covers_the_image_exactly(height, width):
    torch.manual_seed(0)
    model, images = PixelwiseModel(), torch.randn(2, 3, height, width)
    torch.testing.assert_close(predict(model, images, crop=32, stride=21), model(images).logits)


def test_backbone_from_a_transformers_vitmae_with_learned_position_embeddings(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTMAEConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                       intermediate_size=64, image_size=32, patch_size=8, decoder_hidden_size=16,
                                       decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                                       decoder_intermediate_size=32)
    torch.manual_seed(0)
    with torch.no_grad():
        source = transformers.ViTMAEForPreTraining(config)
        source.vit.embeddings.position_embeddings.normal_()  # not sin-cos: kept as learned embeddings
    source.save_pretrained(tmp_path / "hf")
    pretrained_config, weights = read_weights(tmp_path / "hf")
    from models import encoder_config

    backbone_config = {**encoder_config(pretrained_config), "img_size": 64}  # segmentation crops are larger
    model = ViTUperNet(num_classes=3, **backbone_config, decoder_channels=8, aux_channels=0)
    report = load_encoder(model.backbone, encoder_state(weights), new_ok=(), unused_ok=("norm.",))
    assert report.new == [] and model.backbone.pos_embed.shape == (1, 65, 32)  # 4x4 grid interpolated to 8x8
    assert model.backbone.blocks[0].norm1.eps == 1e-12
    assert model(torch.randn(2, 3, 64, 64)).logits.shape == (2, 3, 64, 64)
