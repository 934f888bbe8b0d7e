"""predict.py: saved weights used on their own, with the normalisation and class names saved beside them."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import predict
from models import MaskedAutoencoder, VisionTransformer, encoder_config, mae_config

MEAN, STD = [0.25], [0.5]


@pytest.fixture
def png(tmp_path):
    path = tmp_path / "shirt.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 32), dtype=np.uint8)).save(path)
    return path


def reference_pixels(path, size=28):
    """What the evaluation view and the saved normalisation give, computed here by hand."""
    image = Image.open(path).convert("L")
    scale = (size // 0.875) / min(image.size)
    resized = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return resized.crop((left, top, left + size, top + size))


def test_a_saved_classifier_gives_named_top_k_labels(tmp_path, png, capsys):
    torch.manual_seed(0)
    names = ["shirt", "boot", "bag"]
    model = VisionTransformer(**encoder_config(mae_config("mae_vit_tiny_patch4")), num_classes=3, class_names=names,
                              image_mean=MEAN, image_std=STD)
    model.save_pretrained(tmp_path / "final")
    loaded = predict.load(str(tmp_path / "final"))
    assert loaded.class_names == names and (loaded.image_mean, loaded.image_std) == (MEAN, STD)
    [top] = predict.predict(loaded, [png], top_k=2)
    pixels = predict.prepare(loaded, [png])
    assert pixels.shape == (1, 1, 28, 28) and float(pixels.mean()) == pytest.approx(
        float(((torch.from_numpy(np.array(reference_pixels(png))).float() / 255 - 0.25) / 0.5).mean()), abs=0.02)
    probabilities = model.eval()(pixels).softmax(-1)[0]
    order = probabilities.argsort(descending=True)[:2]
    assert [name for name, _ in top] == [names[k] for k in order]
    assert [p for _, p in top] == pytest.approx(probabilities[order].tolist())
    predict.main([str(tmp_path / "final"), str(png), "--top_k", "1"])
    line = json.loads(capsys.readouterr().out)
    assert line["top_k"][0]["label"] == names[order[0]]


def test_an_encoder_gives_features_and_an_mae_its_reconstruction(tmp_path, png):
    torch.manual_seed(0)
    mae = MaskedAutoencoder(**mae_config("mae_vit_tiny_patch4"), image_mean=MEAN, image_std=STD)
    mae.save_pretrained(tmp_path / "mae")
    [picture] = predict.predict(predict.load(str(tmp_path / "mae")), [Image.open(png)])
    assert picture.size[0] == 4 * picture.size[1] - 6  # original | masked | reconstruction | pasted, one row
    mae.encoder.save_pretrained(tmp_path / "encoder")
    encoder = predict.load(str(tmp_path / "encoder"))
    [features] = predict.predict(encoder, [png])
    assert features.shape == (192,)
    torch.testing.assert_close(features, mae.encoder.eval()(predict.prepare(encoder, [png]))[0])
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(Exception, match="not a readable image"):
        predict.predict(encoder, [tmp_path / "broken.png"])
