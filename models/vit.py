"""A plain-PyTorch Vision Transformer, the MAE encoder and every downstream backbone; parameter names follow timm /
facebookresearch/mae (``patch_embed.proj``, ``blocks.N.attn.qkv``, ``norm``, ``fc_norm``, ``head``) so that foreign
checkpoints map onto it with few renames.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch.utils.checkpoint import checkpoint

from .pos_embed import sincos_pos_embed_2d
from .pretrained import load_pretrained


class StrictHubMixin(PyTorchModelHubMixin):
    """``save_pretrained`` / ``from_pretrained`` (local folders and Hub repos) with strict loading: a missing or
    unexpected tensor is an error, never silently ignored (the mixin's default is lenient)."""

    @classmethod
    def _load_as_safetensor(cls, model, model_file, map_location, strict):
        return super()._load_as_safetensor(model, model_file, map_location, True)


class ConvertingHubMixin(StrictHubMixin):
    """``from_pretrained`` that also reads 🤗 transformers ViTMAE/ViT, facebookresearch/mae ``.pth`` and timm
    weights (the format is detected; conversion happens in ``models/convert.py``, never in the model)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, revision: str | None = None,
                        token: str | bool | None = None, **overrides):
        """A folder, a weights file or a 🤗 Hub repo id (``user/name``, at ``revision``, ``token`` for private
        repos); keyword arguments override the checkpoint's config (e.g. ``img_size``, ``num_classes``)."""
        return load_pretrained(cls, pretrained_model_name_or_path, revision=revision, token=token, **overrides)


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


class PatchEmbed(nn.Module):
    """Split an image into non-overlapping patches and project each to ``embed_dim``: (B, C, H, W) -> (B, L, D)."""

    def __init__(self, img_size: int | tuple[int, int], patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = patch_size
        self.in_chans = in_chans
        if self.img_size[0] % patch_size or self.img_size[1] % patch_size:
            raise ValueError(
                f"img_size {self.img_size[0]}x{self.img_size[1]} is not divisible by patch_size {patch_size}: "
                f"choose an image size that is a multiple of {patch_size}"
            )
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != self.in_chans or tuple(images.shape[2:]) != self.img_size:
            raise ValueError(
                f"expected images of shape (B, {self.in_chans}, {self.img_size[0]}, {self.img_size[1]}), "
                f"got {tuple(images.shape)}: resize the inputs or build the model with this img_size/in_chans"
            )
        return self.proj(images).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection and PyTorch's fused SDPA kernel."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability ``drop_prob``."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        return x * keep.div_(keep_prob)  # scale the (B, 1, ...) mask, not the activations: one pass over x, not two


class Block(nn.Module):
    """Pre-norm transformer block, shared by the encoder, the MAE decoder and the segmentation backbone."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path: float = 0.0,
                 eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def run_block(block: nn.Module, x: torch.Tensor, checkpointing: bool = False) -> torch.Tensor:
    """One block. With ``checkpointing`` (and gradients on) its activations are recomputed in the backward pass
    instead of kept: memory per block drops to its input, for about a third more compute."""
    return checkpoint(block, x, use_reentrant=False) if checkpointing and torch.is_grad_enabled() else block(x)


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, checkpointing: bool = False) -> torch.Tensor:
    for block in blocks:
        x = run_block(block, x, checkpointing)
    return x


def init_weights_official(module: nn.Module) -> None:
    """facebookresearch/mae initialisation: xavier-uniform linears with zero bias, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def init_patch_embed_as_linear(patch_embed: PatchEmbed) -> None:
    """Initialise the patch projection like an nn.Linear over the flattened patch (xavier-uniform)."""
    weight = patch_embed.proj.weight.data
    nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))


HEAD_TYPES = ("linear", "linear_probe", "mlp")


def build_head(head_type: str, embed_dim: int, num_classes: int) -> nn.Module:
    """``linear`` (fine-tuning), ``linear_probe`` (BatchNorm without affine + linear, the MAE probing head) or
    ``mlp`` (one hidden GELU layer, for frozen features); ``num_classes=0`` gives no head (features)."""
    if num_classes <= 0:
        return nn.Identity()
    if head_type == "linear_probe":
        return nn.Sequential(nn.BatchNorm1d(embed_dim, affine=False, eps=1e-6), nn.Linear(embed_dim, num_classes))
    if head_type == "mlp":
        return nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, num_classes))
    return nn.Linear(embed_dim, num_classes)


class VisionTransformer(nn.Module, ConvertingHubMixin):
    """ViT with a cls token and 2-D sin-cos position embeddings (trained from there if ``learned_pos_embed``).
    ``global_pool=True``: the mean patch token + ``fc_norm`` (MAE fine-tuning), else the normalised cls token, is the
    feature; ``num_classes=0`` gives a feature extractor; ``layer_norm_eps``: 1e-6 in MAE/timm, 1e-12 in 🤗 ViTMAE.
    ``image_mean`` / ``image_std`` (the inputs' normalisation) and ``class_names`` are saved with the weights."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        num_classes: int = 0,
        global_pool: bool = False,
        drop_path_rate: float = 0.0,
        custom_weight_init: bool = True,
        head_type: str = "linear",
        learned_pos_embed: bool = False,
        layer_norm_eps: float = 1e-6,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        class_names: list[str] | None = None,
    ):
        super().__init__()
        if head_type not in HEAD_TYPES:
            raise ValueError(f"head_type must be one of {', '.join(HEAD_TYPES)}, got {head_type!r}")
        self.embed_dim = embed_dim
        self.depth = depth
        self.global_pool = global_pool
        self.image_mean, self.image_std = image_mean, image_std
        self.class_names = list(class_names) if class_names else None
        self.gradient_checkpointing = False  # a runtime switch (not saved): recompute block activations in backward
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        pos_embed = sincos_pos_embed_2d(embed_dim, self.patch_embed.grid_size, cls_token=True)
        if learned_pos_embed:
            self.pos_embed = nn.Parameter(pos_embed)
        else:  # fixed, so not saved: recomputed from the config, which also makes any image size loadable
            self.register_buffer("pos_embed", pos_embed, persistent=False)
        drop_rates = torch.linspace(0, drop_path_rate, depth).tolist()  # stochastic depth grows with depth
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, rate, layer_norm_eps)
                                    for rate in drop_rates)
        # With global pooling the final norm moves after the pooling (fc_norm), as in MAE fine-tuning.
        self.norm = nn.Identity() if global_pool else nn.LayerNorm(embed_dim, eps=layer_norm_eps)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps) if global_pool else nn.Identity()
        self.head = build_head(head_type, embed_dim, num_classes)
        if custom_weight_init:
            self.apply(init_weights_official)
            init_patch_embed_as_linear(self.patch_embed)
            nn.init.normal_(self.cls_token, std=0.02)
            classifier = self.head if isinstance(self.head, nn.Linear) else None
            if head_type == "linear_probe":
                classifier = self.head[1]
            if classifier is not None:  # small init, as in MAE fine-tuning (2e-5) and linear probing (0.01)
                nn.init.trunc_normal_(classifier.weight, std=0.01 if head_type == "linear_probe" else 2e-5)

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> patch tokens with position embeddings, without the cls token: (B, L, D)."""
        # No cast: under autocast the sum with the fp32 embedding keeps the residual stream in fp32 (as timm/MAE).
        return self.patch_embed(images) + self.pos_embed[:, 1:]

    def prepend_cls_token(self, tokens: torch.Tensor) -> torch.Tensor:
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        return torch.cat([cls.to(tokens.dtype), tokens], dim=1)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """All tokens after the last block (and the final norm unless global pooling): (B, 1 + L, D)."""
        x = run_blocks(self.blocks, self.prepend_cls_token(self.embed_patches(images)), self.gradient_checkpointing)
        return self.norm(x)

    def forward_intermediates(self, images: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
        """Patch tokens after the blocks ``indices`` (0-based), as maps (B, D, H/p, W/p): dense features for
        segmentation, taken without the final norm (as MAE/BEiT's UperNet does)."""
        grid_h, grid_w = self.patch_embed.grid_size
        x = self.prepend_cls_token(self.embed_patches(images))
        maps = []
        for index, block in enumerate(self.blocks[: max(indices) + 1]):
            x = run_block(block, x, self.gradient_checkpointing)
            if index in indices:
                maps.append(x[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, grid_h, grid_w))
        return maps

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, 1 + L, D) -> (B, D): mean of the patch tokens + fc_norm, or the cls token."""
        return self.fc_norm(tokens[:, 1:].mean(dim=1)) if self.global_pool else tokens[:, 0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.forward_features(images)))
