"""Optimizer construction shared by the scripts."""
from __future__ import annotations

import torch

NO_WEIGHT_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token")


def param_groups_weight_decay(model: torch.nn.Module, weight_decay: float,
                              no_decay_names: tuple[str, ...] = NO_WEIGHT_DECAY_NAMES) -> list[dict]:
    """Two groups: decayed weights, and undecayed norms, biases, position embeddings and tokens (MAE recipe)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or any(key in name for key in no_decay_names):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# One kernel for all parameters. On the project's 2-core CPU, mae_vit_base_patch16's AdamW step takes 64 ms fused
# against 198 ms with the default implementation, a loop over the tensors (torch has no foreach kernels for the CPU):
# `python bench/benchmark_pretrain.py --mode optimizer --model mae_vit_base_patch16`, rows in bench/results.md.
FUSED_ADAMW_DEVICES = ("cuda", "cpu")


def build_adamw(param_groups: list[dict], lr: float, betas=(0.9, 0.95), device: torch.device | None = None):
    """AdamW, fused where the device has the fused kernel (CUDA, CPU), otherwise the default implementation."""
    fused = device is not None and device.type in FUSED_ADAMW_DEVICES
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, fused=fused)


def layer_id(name: str, depth: int, prefix: str = "") -> int:
    """0 for the embeddings, i + 1 for block i, depth + 1 for everything after the blocks (norms, head), for
    the ViT's parameter names under ``prefix`` (e.g. ``backbone.``); anything else (a decoder) is depth + 1."""
    if not name.startswith(prefix):
        return depth + 1
    name = name[len(prefix):]
    if name.startswith(("cls_token", "pos_embed", "patch_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups_layer_decay(model: torch.nn.Module, weight_decay: float, layer_decay: float,
                             no_decay_names: tuple[str, ...] = NO_WEIGHT_DECAY_NAMES, vit_prefix: str = "") -> list[dict]:
    """Layer-wise lr decay (BEiT / MAE fine-tuning): a parameter of layer l gets lr_scale = layer_decay^(L + 1 - l),
    so the head trains at the full rate and the patch embedding at layer_decay^(L + 1). Weight decay as in
    :func:`param_groups_weight_decay`. ``vit_prefix`` locates the ViT inside a larger model (``backbone.``)."""
    vit = model.get_submodule(vit_prefix.rstrip(".")) if vit_prefix else model
    depth = len(vit.blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (param.ndim <= 1 or name.endswith(".bias") or any(key in name for key in no_decay_names))
        layer = layer_id(name, depth, vit_prefix)
        group = groups.setdefault((layer, decay), {
            "params": [], "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": layer_decay ** (depth + 1 - layer), "layer_id": layer,
        })
        group["params"].append(param)
    return list(groups.values())
