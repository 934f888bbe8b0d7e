"""models/convert.py: foreign checkpoints in (🤗 transformers, facebookresearch/mae, timm) and out, with exact
equivalence against transformers' and timm's own models built offline from a config (random weights)."""
import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from models import MaskedAutoencoder, VisionTransformer, sincos_pos_embed_2d
from models.convert import read_checkpoint, to_timm, to_transformers

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

TINY = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16,
            decoder_depth=1, decoder_num_heads=2)


def hf_mae(norm_pix_loss=True) -> "transformers.ViTMAEForPreTraining":
    config = transformers.ViTMAEConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=32, patch_size=8,
        num_channels=3, decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
        decoder_intermediate_size=64, norm_pix_loss=norm_pix_loss, mask_ratio=0.75)
    torch.manual_seed(0)
    model = transformers.ViTMAEForPreTraining(config).eval()
    with torch.no_grad():  # sin-cos, as in the released checkpoints (a random transformers 5 model has zeros here)
        model.vit.embeddings.position_embeddings.copy_(sincos_pos_embed_2d(32, (4, 4)))
        model.decoder.decoder_pos_embed.copy_(sincos_pos_embed_2d(16, (4, 4)))
    return model


def assert_same_mae_outputs(theirs, ours):
    images, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        expected, got = theirs(pixel_values=images, noise=noise), ours.eval()(images, noise=noise)
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.pred, expected.logits, rtol=0, atol=1e-5)
    assert torch.equal(got.mask, expected.mask)


def test_transformers_vitmae_loads_exactly(tmp_path):
    theirs = hf_mae()
    theirs.save_pretrained(tmp_path / "hf")
    ours = MaskedAutoencoder.from_pretrained(tmp_path / "hf")
    assert ours.norm_pix_loss and ours.encoder.blocks[0].norm1.eps == 1e-12  # read from their config.json
    assert_same_mae_outputs(theirs, ours)


@pytest.mark.parametrize("spelling", ["saved by transformers 5", "transformers 5 module names"])
def test_transformers_key_spellings_load_exactly(tmp_path, spelling):
    theirs = hf_mae()
    hub_folder = tmp_path / "hf"
    theirs.save_pretrained(hub_folder)
    if spelling == "transformers 5 module names":  # vit.layers.N.attention.q_proj, decoder.decoder_layers.N...
        save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, str(hub_folder / "model.safetensors"))
        assert any(".q_proj." in key for key in theirs.state_dict())
    assert_same_mae_outputs(theirs, MaskedAutoencoder.from_pretrained(hub_folder))


def test_transformers_vit_classifier_into_vision_transformer(tmp_path):
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                                    image_size=32, patch_size=8, num_labels=4)
    torch.manual_seed(7)
    theirs = transformers.ViTForImageClassification(config).eval()
    theirs.save_pretrained(tmp_path / "vit")
    ours = VisionTransformer.from_pretrained(tmp_path / "vit").eval()
    assert ours.head.out_features == 4 and ours.pos_embed.requires_grad  # their position embeddings are learned
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), theirs(pixel_values=images).logits, rtol=0, atol=1e-5)
    rehead = VisionTransformer.from_pretrained(tmp_path / "vit", num_classes=10, global_pool=True)
    assert rehead.head.out_features == 10 and torch.equal(rehead.blocks[1].mlp.fc1.weight, ours.blocks[1].mlp.fc1.weight)


def test_export_to_transformers_round_trips(tmp_path):
    torch.manual_seed(1)
    ours = MaskedAutoencoder(**TINY, norm_pix_loss=True).eval()
    config, state = to_transformers({**TINY, "norm_pix_loss": True}, ours.state_dict())
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    save_file(state, str(tmp_path / "hf" / "model.safetensors"))
    theirs = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / "hf").eval()
    assert_same_mae_outputs(theirs, ours)
    assert_same_mae_outputs(theirs, MaskedAutoencoder.from_pretrained(tmp_path / "hf"))  # and back


def official_state(mae: MaskedAutoencoder, decoder: bool = True) -> dict:
    """facebookresearch/mae's key names, with its stored (fixed) position embeddings."""
    state = {key.removeprefix("encoder."): value for key, value in mae.state_dict().items()
             if decoder or key.startswith("encoder.")}
    state["pos_embed"] = mae.encoder.pos_embed.clone()
    if decoder:
        state["decoder_pos_embed"] = mae.decoder_pos_embed.clone()
    return state


def test_official_pth_full_and_encoder_only(tmp_path, caplog):
    torch.manual_seed(2)
    mae = MaskedAutoencoder(**TINY).eval()
    torch.save({"model": official_state(mae), "epoch": 799}, tmp_path / "mae_visualize.pth")
    loaded = MaskedAutoencoder.from_pretrained(tmp_path / "mae_visualize.pth", num_heads=2, decoder_num_heads=2)
    images, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    assert torch.equal(loaded.eval()(images, noise=noise).pred, mae(images, noise=noise).pred)

    torch.save({"model": official_state(mae, decoder=False)}, tmp_path / "mae_pretrain.pth")
    with caplog.at_level(logging.WARNING):
        fresh_decoder = MaskedAutoencoder.from_pretrained(tmp_path / "mae_pretrain.pth", num_heads=2)
    assert "encoder-only checkpoint: the MAE decoder is freshly initialised" in caplog.text
    assert torch.equal(fresh_decoder.encoder.blocks[1].attn.qkv.weight, mae.encoder.blocks[1].attn.qkv.weight)
    vit = VisionTransformer.from_pretrained(tmp_path / "mae_pretrain.pth", num_heads=2)
    assert torch.equal(vit.forward_features(images), mae.encoder.forward_features(images))


def timm_vit(**overrides):
    torch.manual_seed(3)
    config = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5, global_pool="avg")
    config.update(overrides)
    return timm.models.vision_transformer.VisionTransformer(**config).eval()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_features_equal(tmp_path, suffix):
    theirs = timm_vit()
    file = tmp_path / f"timm{suffix}"
    state = {key: value.contiguous() for key, value in theirs.state_dict().items()}
    save_file(state, str(file)) if suffix == ".safetensors" else torch.save(state, file)
    ours = VisionTransformer.from_pretrained(file, num_heads=2).eval()  # (head counts are not in the weights)
    assert ours.global_pool and ours.head.out_features == 5
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = theirs.forward_head(theirs.forward_features(images), pre_logits=True)
        torch.testing.assert_close(ours.pool(ours.forward_features(images)), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours(images), theirs(images), rtol=0, atol=1e-5)


def test_classifiers_export_to_timm_with_their_head_and_global_pool_ones_refuse_vit_model(tmp_path):
    import convert_checkpoint

    torch.manual_seed(8)
    classifier = VisionTransformer(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=2, num_heads=2,
                                   num_classes=5, global_pool=True).eval()
    torch.nn.init.normal_(classifier.head.weight)  # (a fresh head is ~0: make the logits tell)
    classifier.save_pretrained(tmp_path / "ours")
    convert_checkpoint.main(["--src", str(tmp_path / "ours"), "--to", "timm", "--dst", str(tmp_path / "timm")])
    exported = json.loads((tmp_path / "timm" / "config.json").read_text())
    theirs = timm.create_model(exported["architecture"], pretrained=True, **exported["model_args"],
                               pretrained_cfg_overlay=exported["pretrained_cfg_overlay"]).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(theirs(images), classifier(images), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="global-pool classifier .* has no transformers ViT equivalent"):
        convert_checkpoint.main(["--src", str(tmp_path / "ours"), "--to", "transformers", "--dst", str(tmp_path / "x")])


def test_export_to_timm_loads_in_timm(tmp_path):
    torch.manual_seed(4)
    ours = VisionTransformer(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=2, num_heads=2,
                             global_pool=True).eval()
    save_file(to_timm({"img_size": 32, "patch_size": 8, "embed_dim": 32},
                      {f"encoder.{k}": v for k, v in ours.state_dict().items()}), str(tmp_path / "timm.safetensors"))
    theirs = timm.create_model("vit_base_patch16_224", pretrained=True, img_size=32, patch_size=8, embed_dim=32,
                               depth=2, num_heads=2, num_classes=0, global_pool="avg",
                               pretrained_cfg_overlay=dict(file=str(tmp_path / "timm.safetensors"))).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(theirs(images), ours(images), rtol=0, atol=1e-5)


def test_learned_position_embeddings_are_interpolated_to_another_size(tmp_path, caplog):
    theirs = timm_vit()
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, str(tmp_path / "timm.safetensors"))
    with caplog.at_level(logging.WARNING):
        bigger = VisionTransformer.from_pretrained(tmp_path / "timm.safetensors", img_size=48, num_heads=2)
    assert "interpolated (bicubic) to the 6x6 grid" in caplog.text
    assert bigger.pos_embed.shape == (1, 37, 32) and bigger(torch.randn(1, 3, 48, 48)).shape == (1, 5)


def test_other_architecture_and_unsafe_files_are_refused_in_one_line(tmp_path):
    theirs = timm_vit()
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, str(tmp_path / "timm.safetensors"))
    with pytest.raises(ValueError, match=r"another architecture: .*patch_embed.proj.weight \(32, 3, 8, 8\)"):
        VisionTransformer.from_pretrained(tmp_path / "timm.safetensors", patch_size=16)
    torch.save({"model": {"weights": logging.getLogger("x")}}, tmp_path / "pickled.pth")  # not just tensors
    with pytest.raises(ValueError, match="weights_only=True"):
        read_checkpoint(tmp_path / "pickled.pth")
    with_extra = {k: v.contiguous() for k, v in theirs.state_dict().items()}
    with_extra["dist_token"] = torch.zeros(1, 1, 32)  # a DeiT tensor: nothing here to put it in
    save_file(with_extra, str(tmp_path / "deit.safetensors"))
    with pytest.raises(ValueError, match="unexpected dist_token"):
        VisionTransformer.from_pretrained(tmp_path / "deit.safetensors", num_heads=2)
    save_file({"something.else": torch.zeros(1)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(ValueError, match="unknown checkpoint layout"):
        read_checkpoint(tmp_path / "odd.safetensors")


def test_convert_checkpoint_script_round_trips(tmp_path):
    import convert_checkpoint

    torch.manual_seed(6)
    ours = MaskedAutoencoder(**TINY, norm_pix_loss=True).eval()
    ours.save_pretrained(tmp_path / "ours")
    convert_checkpoint.main(["--src", str(tmp_path / "ours"), "--to", "transformers", "--dst", str(tmp_path / "hf")])
    assert_same_mae_outputs(transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / "hf").eval(), ours)
    convert_checkpoint.main(["--src", str(tmp_path / "hf"), "--to", "ours", "--dst", str(tmp_path / "back")])
    back = MaskedAutoencoder.from_pretrained(tmp_path / "back")
    for key, value in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key

    convert_checkpoint.main(["--src", str(tmp_path / "ours"), "--to", "timm", "--dst", str(tmp_path / "timm")])
    timm_config = json.loads((tmp_path / "timm" / "config.json").read_text())
    theirs = timm.create_model(timm_config["architecture"], pretrained=True, **timm_config["model_args"],
                               pretrained_cfg_overlay=dict(file=str(tmp_path / "timm" / "model.safetensors"))).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(theirs.forward_features(images), ours.encoder.forward_features(images),
                                   rtol=0, atol=1e-5)
    convert_checkpoint.main(["--src", str(tmp_path / "timm" / "model.safetensors"), "--to", "ours", "--dst",
                             str(tmp_path / "vit"), "--num_heads", "2"])
    vit = VisionTransformer.from_pretrained(tmp_path / "vit")
    torch.testing.assert_close(vit.forward_features(images), ours.encoder.forward_features(images), rtol=0, atol=1e-6)


def test_encoder_export_loads_as_transformers_vit_model(tmp_path):
    import convert_checkpoint

    torch.manual_seed(9)
    encoder = VisionTransformer(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=2, num_heads=2).eval()
    encoder.save_pretrained(tmp_path / "ours")
    convert_checkpoint.main(["--src", str(tmp_path / "ours"), "--to", "transformers", "--dst", str(tmp_path / "hf")])
    theirs = transformers.ViTModel.from_pretrained(tmp_path / "hf", add_pooling_layer=False).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(theirs(pixel_values=images).last_hidden_state, encoder.forward_features(images),
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("head_type", ["linear", "linear_probe"])
def test_classifier_export_runs_in_transformers_pipeline_with_its_preprocessing(tmp_path, head_type):
    import numpy as np
    from PIL import Image

    import convert_checkpoint
    import predict

    torch.manual_seed(10)
    names = ["cat", "dog", "bird", "fish"]
    classifier = VisionTransformer(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=2, num_heads=2,
                                   num_classes=4, head_type=head_type, class_names=names, image_mean=[0.4, 0.5, 0.6],
                                   image_std=[0.2, 0.25, 0.3])
    linear = classifier.head if head_type == "linear" else classifier.head[1]
    torch.nn.init.normal_(linear.weight)  # (a fresh head is ~0: make the logits tell)
    if head_type == "linear_probe":  # BatchNorm statistics to fold into the linear layer
        classifier.head[0].running_mean.normal_()
        classifier.head[0].running_var.uniform_(0.5, 2.0)
    classifier.eval().save_pretrained(tmp_path / "ours")
    convert_checkpoint.main(["--src", str(tmp_path / "ours"), "--to", "transformers", "--dst", str(tmp_path / "hf")])
    rows, columns = np.mgrid[0:40, 0:40]  # (square: centre crops with odd margins round by a pixel differently)
    image = Image.fromarray(np.stack([rows * 5, columns * 6, (rows + columns) * 3], -1).astype(np.uint8))
    pipe = transformers.pipeline("image-classification", model=str(tmp_path / "hf"), device="cpu")
    theirs = pipe(image, top_k=4)
    ours = predict.predict(classifier, [image], top_k=4)[0]
    assert [row["label"] for row in theirs] == [name for name, _ in ours]
    assert [row["score"] for row in theirs] == pytest.approx([p for _, p in ours], abs=1e-4)


def test_encoder_export_runs_in_the_feature_extraction_pipeline(tmp_path):
    import numpy as np
    from PIL import Image

    import convert_checkpoint
    import predict

    torch.manual_seed(11)
    encoder = VisionTransformer(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=2, num_heads=2,
                                image_mean=[0.5, 0.4, 0.3], image_std=[0.3, 0.2, 0.25]).eval()
    encoder.save_pretrained(tmp_path / "ours")
    convert_checkpoint.main(["--src", str(tmp_path / "ours"), "--to", "transformers", "--dst", str(tmp_path / "hf")])
    rows, columns = np.mgrid[0:40, 0:40]
    image = Image.fromarray(np.stack([rows * 6, columns * 5, (rows + columns) * 3], -1).astype(np.uint8))
    pipe = transformers.pipeline("image-feature-extraction", model=str(tmp_path / "hf"), device="cpu")
    theirs = torch.tensor(pipe(image))  # (1, 1 + L, D): every token after the final norm
    with torch.no_grad():
        ours = encoder.forward_features(predict.prepare(encoder, [image]))
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
