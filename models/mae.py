"""Masked Autoencoder (He et al., 2021): a :class:`models.vit.VisionTransformer` encoder (under ``encoder.``) sees
only the visible patches, a lighter decoder reconstructs every patch. As in facebookresearch/mae and 🤗 ViTMAE,
patches are ranked by ``noise`` ascending and the first ``int(L * (1 - mask_ratio))`` are kept.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn

from .masking import MASK_STRATEGIES, mask_noise
from .pos_embed import sincos_pos_embed_2d
from .vit import Block, ConvertingHubMixin, VisionTransformer, init_weights_official, run_blocks


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), each patch flattened row by row with channels last (official order)."""
    batch, channels, height, width = images.shape
    p = patch_size
    x = images.reshape(batch, channels, height // p, p, width // p, p)
    x = torch.einsum("bchpwq->bhwpqc", x)
    return x.reshape(batch, (height // p) * (width // p), p * p * channels)


def unpatchify(patches: torch.Tensor, patch_size: int, grid_size: tuple[int, int], channels: int) -> torch.Tensor:
    """(B, L, p*p*C) -> (B, C, H, W), the inverse of :func:`patchify`."""
    batch = patches.shape[0]
    p = patch_size
    grid_h, grid_w = grid_size
    x = patches.reshape(batch, grid_h, grid_w, p, p, channels)
    x = torch.einsum("bhwpqc->bchpwq", x)
    return x.reshape(batch, channels, grid_h * p, grid_w * p)


def visible_count(num_patches: int, mask_ratio: float) -> int:
    """How many patches the encoder sees: ``int(L * (1 - mask_ratio))``, as in MAE."""
    return int(num_patches * (1 - mask_ratio))


def random_masking(tokens: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
    """Keep the ``int(L * (1 - mask_ratio))`` patches with the smallest noise (uniform noise if not given).

    Returns the visible tokens (B, L_keep, D), the mask (B, L; 1 = masked, in the original patch order)
    and ``restore_ids`` (B, L), the permutation that puts [visible, masked] back into patch order.
    """
    batch, length, _ = tokens.shape
    if noise is None:
        noise = torch.rand(batch, length, device=tokens.device)
    return keep_lowest_noise(tokens, noise, visible_count(length, mask_ratio))


def keep_lowest_noise(tokens: torch.Tensor, noise: torch.Tensor, num_keep: int):
    """:func:`random_masking` with the count of visible patches given (an int: under torch.compile a changing count
    makes the shapes dynamic after one recompilation, where a changing float ratio would recompile every time)."""
    batch, length, dim = tokens.shape
    shuffle_ids = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    restore_ids = torch.argsort(shuffle_ids, dim=1)
    visible_ids = shuffle_ids[:, :num_keep]
    visible = torch.gather(tokens, 1, visible_ids.unsqueeze(-1).expand(-1, -1, dim))
    mask = torch.ones(batch, length, device=tokens.device)
    mask[:, :num_keep] = 0
    mask = torch.gather(mask, 1, restore_ids)
    return visible, mask, restore_ids


_COMPILED = {}  # MaskedAutoencoder.region's compiled functions


@dataclass
class MAEOutput:
    loss: torch.Tensor  # scalar: mean squared error over the masked patches
    pred: torch.Tensor  # (B, L, p*p*C): predicted pixels (normalised per patch if norm_pix_loss)
    mask: torch.Tensor  # (B, L): 1 = masked, 0 = visible
    latent: torch.Tensor | None = None  # (B, 1 + L_keep, D): the encoder's output on the visible patches


class MaskedAutoencoder(nn.Module, ConvertingHubMixin):
    """MAE: ViT encoder on the visible patches, light transformer decoder, MSE on the masked patches.
    ``image_mean`` / ``image_std``: the normalisation its inputs had in training, saved with the weights."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        decoder_mlp_ratio: float = 4.0,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = False,
        custom_weight_init: bool = True,
        layer_norm_eps: float = 1e-6,
        learned_pos_embed: bool = False,
        mask_strategy: str = "random",
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
    ):
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        if mask_strategy not in MASK_STRATEGIES:
            raise ValueError(f"unknown mask_strategy {mask_strategy!r}: choose one of {', '.join(MASK_STRATEGIES)}")
        self.mask_strategy = mask_strategy
        self.gradient_checkpointing = False  # a runtime switch (not saved): recompute block activations in backward
        self.compile_regions = False  # a runtime switch (not saved, --compile): see `region`
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.encoder = VisionTransformer(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, mlp_ratio=mlp_ratio, num_classes=0, global_pool=False,
            custom_weight_init=custom_weight_init, learned_pos_embed=learned_pos_embed, layer_norm_eps=layer_norm_eps,
            image_mean=image_mean, image_std=image_std,
        )
        grid_size = self.encoder.patch_embed.grid_size
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer(
            "decoder_pos_embed", sincos_pos_embed_2d(decoder_embed_dim, grid_size, cls_token=True), persistent=False
        )
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, decoder_mlp_ratio, eps=layer_norm_eps) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=layer_norm_eps)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size * patch_size * in_chans)
        if custom_weight_init:
            for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
                module.apply(init_weights_official)
            nn.init.normal_(self.mask_token, std=0.02)

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.encoder.patch_embed.grid_size

    @property
    def num_patches(self) -> int:
        return self.encoder.num_patches

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        return patchify(images, self.patch_size)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        return unpatchify(patches, self.patch_size, self.grid_size, self.in_chans)

    def forward_encoder(self, images: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """Encode the visible patches: returns tokens (B, 1 + L_keep, D), mask (B, L), restore_ids (B, L)."""
        if noise is None:  # (drawn as random_masking draws it, for the same masks from the same seed)
            batch = images.shape[0]
            noise = (torch.rand(batch, self.num_patches, device=images.device) if self.mask_strategy == "random"
                     else torch.stack([mask_noise(self.mask_strategy, self.grid_size, mask_ratio)
                                       for _ in range(batch)]).to(images.device))
        num_keep = visible_count(self.num_patches, mask_ratio)
        x, mask, restore_ids = self.region(type(self).encoder_tokens)(images, noise, num_keep)
        x = run_blocks(self.encoder.blocks, x, self.gradient_checkpointing)
        return self.encoder.norm(x), mask, restore_ids

    def encoder_tokens(self, images: torch.Tensor, noise: torch.Tensor, num_keep: int):
        """The encoder's input: [cls, the ``num_keep`` patches of smallest noise] (B, 1 + num_keep, D), with the
        mask (B, L) and restore_ids (B, L) of :func:`random_masking`."""
        visible, mask, restore_ids = keep_lowest_noise(self.encoder.embed_patches(images), noise, num_keep)
        return self.encoder.prepend_cls_token(visible), mask, restore_ids

    def region(self, method):
        """``method`` (a function of this class, called with the model first) compiled when ``compile_regions`` is
        on (--compile), else as it is: the elementwise work between blocks fuses while each block keeps its own backward
        graph (DDP overlaps the all-reduce with it); the mask's noise is drawn outside the compiled methods."""
        if not self.compile_regions:
            return partial(method, self)
        if method not in _COMPILED:  # one compiled function for every model: it guards on shapes, not on instances
            _COMPILED[method] = torch.compile(method)
        return partial(_COMPILED[method], self)

    def decoder_tokens(self, latent: torch.Tensor, restore_ids: torch.Tensor) -> torch.Tensor:
        """The decoder's input (B, 1 + L, D_dec): the embedded [cls, visible] tokens and a mask token for each
        hidden patch, put back in patch order, plus the decoder's position embedding."""
        x = self.decoder_embed(latent)
        batch, num_visible = x.shape[0], x.shape[1] - 1
        mask_tokens = self.mask_token.expand(batch, restore_ids.shape[1] - num_visible, -1).to(x.dtype)
        patches = torch.cat([x[:, 1:], mask_tokens], dim=1)  # [visible, masked] order
        patches = torch.gather(patches, 1, restore_ids.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # patch order
        return torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed  # fp32 residual stream under autocast

    def decoder_features(self, latent: torch.Tensor, restore_ids: torch.Tensor) -> torch.Tensor:
        """The decoder blocks' output (B, 1 + L, D_dec) for [cls, visible] tokens ``latent``."""
        x = self.region(type(self).decoder_tokens)(latent, restore_ids)
        return run_blocks(self.decoder_blocks, x, self.gradient_checkpointing)

    def prediction_and_loss(self, features: torch.Tensor, images: torch.Tensor, mask: torch.Tensor):
        """Per-patch pixels (B, L, p*p*C) from the decoder blocks' output (the cls token dropped), and their loss."""
        pred = self.decoder_pred(self.decoder_norm(features))[:, 1:]
        return pred, self.forward_loss(images, pred, mask)

    def target(self, images: torch.Tensor) -> torch.Tensor:
        """The reconstruction target (B, L, p*p*C): pixels, normalised per patch if ``norm_pix_loss``."""
        target = self.patchify(images)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, averaged over the masked patches only."""
        per_patch = ((pred.float() - self.target(images).float()) ** 2).mean(dim=-1)  # (B, L)
        return (per_patch * mask).sum() / mask.sum()

    def forward(
        self, pixel_values: torch.Tensor, noise: torch.Tensor | None = None, mask_ratio: float | None = None,
        target_images: torch.Tensor | None = None,
    ) -> MAEOutput:
        """``noise`` (B, L) fixes the mask (smallest values are kept); ``mask_ratio`` overrides the default;
        ``target_images`` (B, C, H, W) replaces the input as what is reconstructed (e.g. a PCA-filtered copy)."""
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, restore_ids = self.forward_encoder(pixel_values, ratio, noise)
        features = self.decoder_features(latent, restore_ids)
        target = pixel_values if target_images is None else target_images
        pred, loss = self.region(type(self).prediction_and_loss)(features, target, mask)
        return MAEOutput(loss=loss, pred=pred, mask=mask, latent=latent)

    def pixel_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, L) patch mask -> (B, C, H, W) pixel mask (1 = masked)."""
        return self.unpatchify(mask.unsqueeze(-1).expand(-1, -1, self.patch_size**2 * self.in_chans).float())

    def reconstruct(self, pred: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Turn predictions into an image (B, C, H, W); with ``norm_pix_loss`` each patch is de-normalised
        with the mean and variance of the original patch, so the picture looks like an image."""
        if self.norm_pix_loss:
            target = self.patchify(images)
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            pred = pred * (var + 1.0e-6) ** 0.5 + mean
        return self.unpatchify(pred)
