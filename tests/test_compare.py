"""compare_reconstructions.py: one column per model, same images and masks, metrics per model."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from models import MaskedAutoencoder


def tiny_mae(seed: int, **overrides) -> MaskedAutoencoder:
    torch.manual_seed(seed)
    config = dict(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16,
                  decoder_depth=1, decoder_num_heads=2)
    config.update(overrides)
    return MaskedAutoencoder(**config)


def test_grid_has_one_column_per_model_and_metrics_for_each(tmp_path, fashion_mnist_dir):
    import compare_reconstructions

    for name, seed in (("plain", 0), ("improved", 1), ("third", 2)):
        tiny_mae(seed).save_pretrained(tmp_path / name)
    models = [str(tmp_path / name) for name in ("plain", "improved", "third")]
    compare_reconstructions.main(["--models", *models, "--num_images", "3", "--out", str(tmp_path / "out")])
    picture = np.asarray(Image.open(tmp_path / "out" / "compare.png"))
    assert picture.shape[:2] == (3 * 112 + 4 * 2, 5 * 112 + 6 * 2)  # 3 rows; original, masked, 3 models
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert list(report["models"]) == models and report["mask_ratio"] == 0.75
    psnr = [metrics["val_psnr_masked"] for metrics in report["models"].values()]
    assert all(np.isfinite(psnr)) and len(set(psnr)) == 3  # different models, different reconstructions
    tiny_mae(3, patch_size=7).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="compare models of one size"):
        compare_reconstructions.main(["--models", models[0], str(tmp_path / "other"), "--out", str(tmp_path / "x")])
