"""Semantic segmentation on a ViT: multi-level features, a four-level pyramid neck and an UperNet head
(Xiao et al. 2018), the setup MAE and BEiT use on ADE20K. Written here in plain PyTorch.

    images (B, C, H, W) -> ViT blocks at ``out_indices`` -> 4 maps at stride p   (p = patch size)
      -> neck: strides p/4, p/2, p, 2p  (4, 8, 16, 32 for patch 16)
      -> UperNet: pyramid pooling on the coarsest map, FPN top-down fusion, concat, fuse, classify
      -> logits (B, num_classes, H, W)        [+ auxiliary FCN logits from the stride-p map]
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .vit import StrictHubMixin, VisionTransformer


def default_out_indices(depth: int) -> list[int]:
    """Four block indices spread evenly, ending at the last block: (3, 5, 7, 11) for 12 blocks, as in MAE/BEiT."""
    if depth < 4:
        raise ValueError(f"a segmentation backbone needs at least 4 blocks for 4 feature levels, got depth {depth}")
    indices = sorted({math.ceil(depth * sixths / 6) - 1 for sixths in (2, 3, 4, 6)})
    return indices if len(indices) == 4 else list(range(depth - 4, depth))


class ConvNormAct(nn.Sequential):
    """Conv (no bias) + BatchNorm + ReLU, the building brick of the UperNet head."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1):
        super().__init__(nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class FeaturePyramidNeck(nn.Module):
    """Turns four single-stride ViT maps (stride p) into strides p/4, p/2, p, 2p: two transposed convolutions,
    one, identity, max-pooling (MAE/BEiT's ``fpn1..fpn4``). Channels stay ``embed_dim``."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.up4 = nn.Sequential(nn.ConvTranspose2d(embed_dim, embed_dim, 2, stride=2), nn.BatchNorm2d(embed_dim),
                                 nn.GELU(), nn.ConvTranspose2d(embed_dim, embed_dim, 2, stride=2))
        self.up2 = nn.ConvTranspose2d(embed_dim, embed_dim, 2, stride=2)
        self.down2 = nn.MaxPool2d(2, stride=2)

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.up4(maps[0]), self.up2(maps[1]), maps[2], self.down2(maps[3])]


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling: average-pool to each scale, 1x1 conv, upsample back, concat with the input."""

    def __init__(self, in_channels: int, channels: int, scales: tuple[int, ...] = (1, 2, 3, 6)):
        super().__init__()
        self.stages = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvNormAct(in_channels, channels))
                                    for scale in scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        pooled = [F.interpolate(stage(x), size=size, mode="bilinear", align_corners=False) for stage in self.stages]
        return torch.cat([x, *pooled], dim=1)


class UperNetHead(nn.Module):
    """UperNet decoder over a 4-level pyramid (finest first): PPM on the coarsest level, FPN laterals with
    top-down addition, 3x3 convs, everything upsampled to the finest level, concatenated, fused, classified."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, pool_scales=(1, 2, 3, 6), dropout: float = 0.1):
        super().__init__()
        self.ppm = PyramidPooling(in_channels, channels, pool_scales)
        self.ppm_bottleneck = ConvNormAct(in_channels + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvNormAct(in_channels, channels) for _ in range(3))
        self.fpn_convs = nn.ModuleList(ConvNormAct(channels, channels, 3) for _ in range(3))
        self.fuse = ConvNormAct(4 * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(level) for conv, level in zip(self.lateral_convs, levels[:3])]
        laterals.append(self.ppm_bottleneck(self.ppm(levels[3])))
        for i in range(3, 0, -1):  # top-down: each level receives the upsampled coarser one
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:],
                                                              mode="bilinear", align_corners=False)
        outputs = [conv(lateral) for conv, lateral in zip(self.fpn_convs, laterals[:3])] + [laterals[3]]
        size = outputs[0].shape[2:]
        outputs = [outputs[0]] + [F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outputs[1:]]
        return self.classifier(self.dropout(self.fuse(torch.cat(outputs, dim=1))))


class FCNHead(nn.Module):
    """The auxiliary head: one 3x3 conv block and a classifier on a single level (deep supervision)."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.conv = ConvNormAct(in_channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.conv(x)))


@dataclass
class SegmentationOutput:
    logits: torch.Tensor  # (B, num_classes, H, W), at the input size
    aux_logits: torch.Tensor | None = None  # (B, num_classes, H, W) in training when there is an auxiliary head


class ViTUperNet(nn.Module, StrictHubMixin):
    """ViT backbone (``backbone.*``, the MAE encoder's keys) + pyramid neck + UperNet head [+ auxiliary FCN head].
    ``decoder_channels`` defaults to the ViT width (768 for ViT-B); ``aux_channels=0`` drops the auxiliary head; the
    backbone has no final norm (the features come from inside the blocks). ``image_mean`` / ``image_std`` and
    ``class_names`` are saved with the weights."""

    def __init__(
        self,
        num_classes: int,
        img_size: int = 512,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_indices: list[int] | None = None,
        decoder_channels: int | None = None,
        aux_channels: int = 256,
        pool_scales: list[int] | tuple[int, ...] = (1, 2, 3, 6),
        drop_path_rate: float = 0.0,
        learned_pos_embed: bool = False,
        layer_norm_eps: float = 1e-6,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        class_names: list[str] | None = None,
    ):
        super().__init__()
        if patch_size % 4:
            raise ValueError(f"the pyramid neck upsamples the stride-{patch_size} features 4x: patch_size must be a "
                             "multiple of 4")
        self.out_indices = list(out_indices) if out_indices is not None else default_out_indices(depth)
        indices = self.out_indices
        if len(indices) != 4 or indices != sorted(set(indices)) or indices[0] < 0 or indices[-1] != depth - 1:
            # (blocks after the last index would get no gradient, which DDP refuses)
            raise ValueError(f"out_indices must be 4 increasing block indices ending at the last block ({depth - 1}), "
                             f"got {indices}")
        self.num_classes = num_classes
        self.image_mean, self.image_std = image_mean, image_std
        self.class_names = list(class_names) if class_names else None
        self.backbone = VisionTransformer(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio,
                                          num_classes=0, global_pool=True, drop_path_rate=drop_path_rate,
                                          learned_pos_embed=learned_pos_embed, layer_norm_eps=layer_norm_eps,
                                          image_mean=image_mean, image_std=image_std)
        self.backbone.fc_norm = nn.Identity()  # (global_pool=True already dropped the final norm)
        channels = decoder_channels or embed_dim
        self.neck = FeaturePyramidNeck(embed_dim)
        self.decode_head = UperNetHead(embed_dim, channels, num_classes, tuple(pool_scales))
        self.aux_head = FCNHead(embed_dim, aux_channels, num_classes) if aux_channels > 0 else None
        for module in (self.neck, self.decode_head, self.aux_head):
            if module is not None:
                module.apply(init_decoder_weights)

    def forward(self, images: torch.Tensor) -> SegmentationOutput:
        size = images.shape[2:]
        levels = self.neck(self.backbone.forward_intermediates(images, self.out_indices))
        logits = F.interpolate(self.decode_head(levels), size=size, mode="bilinear", align_corners=False)
        aux_logits = None
        if self.aux_head is not None and self.training:
            aux_logits = F.interpolate(self.aux_head(levels[2]), size=size, mode="bilinear", align_corners=False)
        return SegmentationOutput(logits, aux_logits)


def init_decoder_weights(module: nn.Module) -> None:
    """Convolutions: Kaiming-normal (fan-out), zero bias; norms: ones/zeros; the classifiers start small."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    if hasattr(module, "classifier") and isinstance(module.classifier, nn.Conv2d):
        nn.init.normal_(module.classifier.weight, std=0.01)
        nn.init.zeros_(module.classifier.bias)


__all__ = ["FCNHead", "FeaturePyramidNeck", "PyramidPooling", "SegmentationOutput", "UperNetHead",
           "ViTUperNet", "default_out_indices"]
