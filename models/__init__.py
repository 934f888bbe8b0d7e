"""Plain-PyTorch ViT and MAE; no training or data code lives here."""
from .mae import MAEOutput, MaskedAutoencoder, patchify, random_masking, unpatchify
from .presets import MAE_PRESETS, encoder_config, mae_config
from .vit import Attention, Block, DropPath, PatchEmbed, VisionTransformer, sincos_pos_embed_2d

__all__ = [
    "Attention", "Block", "DropPath", "MAEOutput", "MAE_PRESETS", "MaskedAutoencoder", "PatchEmbed",
    "VisionTransformer", "encoder_config", "mae_config", "patchify", "random_masking", "sincos_pos_embed_2d",
    "unpatchify",
]
