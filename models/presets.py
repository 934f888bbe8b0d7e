"""Model sizes by name. A preset is data: keyword arguments for :class:`MaskedAutoencoder`."""
from __future__ import annotations

_MAE_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, decoder_mlp_ratio=4.0)

MAE_PRESETS: dict[str, dict] = {
    # Small images (Fashion-MNIST 28x28 -> 7x7 patches): the CPU demo and the tests.
    "mae_vit_tiny_patch4": dict(
        img_size=28, patch_size=4, in_chans=1, embed_dim=192, depth=4, num_heads=3, mlp_ratio=4.0,
        decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4, decoder_mlp_ratio=4.0,
    ),
    "mae_vit_small_patch16": dict(
        img_size=224, patch_size=16, in_chans=3, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, **_MAE_DECODER
    ),
    "mae_vit_base_patch16": dict(
        img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, **_MAE_DECODER
    ),
    "mae_vit_large_patch16": dict(
        img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0, **_MAE_DECODER
    ),
    "mae_vit_huge_patch14": dict(
        img_size=224, patch_size=14, in_chans=3, embed_dim=1280, depth=32, num_heads=16, mlp_ratio=4.0, **_MAE_DECODER
    ),
}


def mae_config(name: str, **overrides) -> dict:
    """The preset ``name`` with every non-None override applied; unknown names give a one-line error."""
    if name not in MAE_PRESETS:
        raise ValueError(f"unknown model preset {name!r}: choose one of {', '.join(MAE_PRESETS)}")
    config = dict(MAE_PRESETS[name])
    config.update({key: value for key, value in overrides.items() if value is not None})
    return config


def encoder_config(mae_kwargs: dict) -> dict:
    """The ``VisionTransformer`` keyword arguments of an MAE config (the encoder half)."""
    keys = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "learned_pos_embed",
            "layer_norm_eps", "image_mean", "image_std")
    return {key: mae_kwargs[key] for key in keys if key in mae_kwargs}
