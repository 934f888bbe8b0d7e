"""Checkpoints of facebookresearch/mae (.pth), 🤗 ViTMAE / ViT, timm and this project, read into one form and written
back out to the transformers and timm layouts. The form is a :class:`MaskedAutoencoder` state dict (the encoder, with
any ``head``/``fc_norm``, under ``encoder.``; any decoder at the top level); .pth / .bin load with weights_only=True.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from .pos_embed import sincos_pos_embed_2d
from .presets import MAE_PRESETS

logger = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Heads of the official/timm ViTs by width: shapes do not tell the head count, the released sizes do.
HEADS_BY_WIDTH = {preset["embed_dim"]: preset["num_heads"] for preset in MAE_PRESETS.values()}
DECODER_HEADS_BY_WIDTH = {preset["decoder_embed_dim"]: preset["decoder_num_heads"] for preset in MAE_PRESETS.values()}

# transformers block parameter names (4.x and 5.x spellings) -> this project's
HF_BLOCK_NAMES = {
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1", "mlp.fc1": "mlp.fc1",
    "output.dense": "mlp.fc2", "mlp.fc2": "mlp.fc2",
    "layernorm_before": "norm1", "layernorm_after": "norm2",
}
HF_QKV = {"attention.attention.query": 0, "attention.attention.key": 1, "attention.attention.value": 2,
          "attention.q_proj": 0, "attention.k_proj": 1, "attention.v_proj": 2}
HF_ENCODER_BLOCK = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")
HF_DECODER_BLOCK = re.compile(r"^decoder\.decoder_(?:layers|encoder\.layer)\.(\d+)\.(.+)\.(weight|bias)$")
HF_OTHER = {
    "embeddings.cls_token": "encoder.cls_token",
    "embeddings.patch_embeddings.projection.weight": "encoder.patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "encoder.patch_embed.proj.bias",
    "embeddings.position_embeddings": "encoder.pos_embed",
    "layernorm.weight": "encoder.norm.weight", "layernorm.bias": "encoder.norm.bias",
    "decoder.decoder_embed.weight": "decoder_embed.weight", "decoder.decoder_embed.bias": "decoder_embed.bias",
    "decoder.mask_token": "mask_token", "decoder.decoder_pos_embed": "decoder_pos_embed",
    "decoder.decoder_norm.weight": "decoder_norm.weight", "decoder.decoder_norm.bias": "decoder_norm.bias",
    "decoder.decoder_pred.weight": "decoder_pred.weight", "decoder.decoder_pred.bias": "decoder_pred.bias",
    "classifier.weight": "encoder.head.weight", "classifier.bias": "encoder.head.bias",
}


@dataclass
class Checkpoint:
    """A checkpoint in this project's form. ``config`` holds MaskedAutoencoder-style keys (encoder sizes, and
    decoder sizes when there is a decoder); ``notes`` are the one-line messages worth logging."""

    config: dict
    state: dict[str, torch.Tensor]
    source_format: str
    notes: list[str] = field(default_factory=list)

    @property
    def has_decoder(self) -> bool:
        return any(key.startswith("decoder_") for key in self.state)

    @property
    def num_classes(self) -> int:
        head = self.state.get("encoder.head.weight", self.state.get("encoder.head.1.weight"))  # linear / probe head
        return 0 if head is None else head.shape[0]


# --------------------------------------------------------------------------------------------- reading files
def torch_load(path: Path) -> dict:
    """A ``.pth``/``.bin`` file, read safely (tensors and plain containers only)."""
    try:  # facebookresearch/mae's training checkpoints also hold an argparse.Namespace: allowed, nothing else
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"cannot read {path} with torch.load(weights_only=True) ({type(error).__name__}): it holds "
                         "more than tensors (e.g. pickled objects); convert it to safetensors where it was made") from None


def locate(source: str | Path, revision: str | None = None, token: str | bool | None = None) -> tuple[Path | None, Path]:
    """(config.json or None, weights file) of a local folder, a local file or a 🤗 Hub repo (downloaded)."""
    path = Path(source).expanduser()
    if path.is_file():
        config = path.parent / "config.json"
        return (config if config.exists() and path.name in WEIGHT_FILES else None), path
    if path.is_dir():
        weights = next((path / name for name in WEIGHT_FILES if (path / name).exists()), None)
        if weights is None:
            candidates = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.pth"))
            if len(candidates) != 1:
                raise ValueError(f"no weights in {path}: expected model.safetensors, pytorch_model.bin or one "
                                 ".safetensors/.pth file")
            weights = candidates[0]
        return ((path / "config.json") if (path / "config.json").exists() else None), weights
    if str(source).count("/") != 1 or str(source).startswith((".", "/", "~")) or path.parent.is_dir():
        raise ValueError(f"no weights at {source}: pass a run's final/ or checkpoints/step_* folder, a weights file "
                         "or a 🤗 Hub repo id (user/name)")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    def download(name: str) -> Path | None:
        try:
            return Path(hf_hub_download(str(source), name, revision=revision, token=token))
        except EntryNotFoundError:
            return None
        except Exception as error:  # unknown repo or revision, no connection, gated repo without a token
            raise ValueError(f"cannot download {name} from the 🤗 Hub repo {source}"
                             f"{f' at revision {revision}' if revision else ''} ({type(error).__name__}): check the "
                             "name and revision, your connection, or log in (hf auth login) for a private repo") from None

    config = download("config.json")
    for name in WEIGHT_FILES:
        if (weights := download(name)) is not None:
            return config, weights
    raise ValueError(f"the Hub repo {source} has no model.safetensors or pytorch_model.bin")


def read_state(weights: Path) -> dict[str, torch.Tensor]:
    if weights.suffix == ".safetensors":
        try:
            return load_file(str(weights))
        except Exception as error:
            raise ValueError(f"cannot read {weights} ({type(error).__name__}): the file is damaged or not "
                             "safetensors") from None
    state = torch_load(weights)
    for key in ("model", "state_dict", "model_ema"):  # facebookresearch/mae stores {"model": ..., "optimizer": ...}
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            return state[key]
    return state


# --------------------------------------------------------------------------------------------- to our form
def read_checkpoint(source: str | Path, revision: str | None = None, token: str | bool | None = None) -> Checkpoint:
    """Any supported checkpoint -> :class:`Checkpoint` (format detected from the config and the key names)."""
    config_file, weights = locate(source, revision, token)
    config = json.loads(config_file.read_text()) if config_file else None
    state = read_state(weights)
    if config is not None and config.get("model_type") in ("vit_mae", "vit"):
        return from_transformers(config, state)
    if config is not None and "model_type" in config:
        raise ValueError(f"{source} is a 🤗 transformers {config['model_type']!r} model: only ViTMAE ('vit_mae') and "
                         "ViT ('vit') checkpoints map onto this project's models")
    if any(key.startswith(("vit.", "embeddings.", "decoder.decoder_")) for key in state):
        raise ValueError(f"{weights} looks like a 🤗 transformers checkpoint but has no config.json beside it: "
                         "keep the folder's config.json with the weights")
    if config is not None and "embed_dim" in config:  # this project's save_pretrained folder or checkpoint
        if not any(key.startswith("encoder.") for key in state):  # a VisionTransformer's: canonical MAE naming
            state = {f"encoder.{key}": value for key, value in state.items()}
        return finish(Checkpoint(dict(config), state, "mae-accelerate"))
    if "blocks.0.attn.qkv.weight" in state or "encoder.blocks.0.attn.qkv.weight" in state:
        return from_timm_layout(state)
    raise ValueError(f"{weights}: unknown checkpoint layout (first keys: {', '.join(list(state)[:4])}): expected this "
                     "project's, facebookresearch/mae's, timm's or 🤗 transformers' ViT / ViTMAE weights")


def from_timm_layout(state: dict[str, torch.Tensor]) -> Checkpoint:
    """facebookresearch/mae and timm share one naming (ours, minus the ``encoder.`` prefix)."""
    if not any(key.startswith("encoder.") for key in state):
        decoder = ("decoder_", "mask_token")
        state = {(key if key.startswith(decoder) else f"encoder.{key}"): value for key, value in state.items()}
    config = shape_config(state)
    source = "facebookresearch/mae" if "encoder.pos_embed" in state and is_sincos(state["encoder.pos_embed"]) else "timm"
    return finish(Checkpoint(config, state, source))


def from_transformers(config: dict, state: dict[str, torch.Tensor]) -> Checkpoint:
    ours: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, int], dict] = {}
    pooler = False
    for key, value in state.items():
        key = key.removeprefix("vit.")  # ViTMAEForPreTraining / ViTForImageClassification nest the ViT there
        if match := HF_ENCODER_BLOCK.match(key):
            prefix = f"encoder.blocks.{match.group(1)}"
        elif match := HF_DECODER_BLOCK.match(key):
            prefix = f"decoder_blocks.{match.group(1)}"
        if match:
            name, kind = match.group(2), match.group(3)
            if name in HF_QKV:
                qkv.setdefault((prefix, kind), {})[HF_QKV[name]] = value
            elif name in HF_BLOCK_NAMES:
                ours[f"{prefix}.{HF_BLOCK_NAMES[name]}.{kind}"] = value
            else:
                ours[f"unknown.{key}"] = value
        elif key in HF_OTHER:
            ours[HF_OTHER[key]] = value
        elif key.startswith("pooler."):  # ViTModel's pooler (dense + tanh) has no counterpart
            pooler = True
        else:
            ours[f"unknown.{key}"] = value
    for (prefix, kind), parts in qkv.items():
        ours[f"{prefix}.attn.qkv.{kind}"] = torch.cat([parts[0], parts[1], parts[2]], dim=0)
    hidden = config["hidden_size"]
    mae_config = dict(
        img_size=config.get("image_size", 224), patch_size=config.get("patch_size", 16),
        in_chans=config.get("num_channels", 3), embed_dim=hidden, depth=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"], mlp_ratio=config.get("intermediate_size", 4 * hidden) / hidden,
        layer_norm_eps=config.get("layer_norm_eps", 1e-12),
    )
    if config.get("model_type") == "vit_mae":
        decoder = config.get("decoder_hidden_size", 512)
        mae_config.update(decoder_embed_dim=decoder, decoder_depth=config.get("decoder_num_hidden_layers", 8),
                          decoder_num_heads=config.get("decoder_num_attention_heads", 16),
                          decoder_mlp_ratio=config.get("decoder_intermediate_size", 4 * decoder) / decoder,
                          mask_ratio=config.get("mask_ratio", 0.75), norm_pix_loss=config.get("norm_pix_loss", False))
    if isinstance(image_size := mae_config["img_size"], (list, tuple)):
        mae_config["img_size"] = image_size[0]
    notes = ["ViTModel's pooler (dense + tanh) has no counterpart here and is not loaded"] if pooler else []
    return finish(Checkpoint(mae_config, ours, "transformers", notes))


def shape_config(state: dict[str, torch.Tensor]) -> dict:
    """Sizes read off the tensors (the head count from the released widths, else width / 64)."""
    embed_dim = state["encoder.cls_token"].shape[-1]
    proj = state["encoder.patch_embed.proj.weight"]
    depth = 1 + max(int(key.split(".")[2]) for key in state if key.startswith("encoder.blocks."))
    if embed_dim not in HEADS_BY_WIDTH:
        logger.warning("the checkpoint does not say how many attention heads it has: %d assumed from the width %d "
                       "(pass num_heads= / --num_heads if that is wrong: outputs would be wrong)",
                       max(1, embed_dim // 64), embed_dim)
    config = dict(patch_size=proj.shape[-1], in_chans=proj.shape[1], embed_dim=embed_dim, depth=depth,
                  num_heads=HEADS_BY_WIDTH.get(embed_dim, max(1, embed_dim // 64)),
                  mlp_ratio=state["encoder.blocks.0.mlp.fc1.weight"].shape[0] / embed_dim, img_size=224)
    if "encoder.pos_embed" in state:
        config["img_size"] = math.isqrt(state["encoder.pos_embed"].shape[1] - 1) * proj.shape[-1]
    if "decoder_embed.weight" in state:
        width = state["decoder_embed.weight"].shape[0]
        config.update(decoder_embed_dim=width,
                      decoder_depth=1 + max(int(k.split(".")[1]) for k in state if k.startswith("decoder_blocks.")),
                      decoder_num_heads=DECODER_HEADS_BY_WIDTH.get(width, max(1, width // 32)),
                      decoder_mlp_ratio=state["decoder_blocks.0.mlp.fc1.weight"].shape[0] / width)
    return config


def is_sincos(pos_embed: torch.Tensor) -> bool:
    """True for the fixed 2-D sin-cos embedding this project recomputes (so it need not be stored)."""
    grid = math.isqrt(pos_embed.shape[1] - 1)
    if grid * grid != pos_embed.shape[1] - 1 or pos_embed.shape[-1] % 4:
        return False
    return torch.allclose(pos_embed.float(), sincos_pos_embed_2d(pos_embed.shape[-1], (grid, grid)), atol=1e-4)


def finish(checkpoint: Checkpoint) -> Checkpoint:
    """Drop fixed sin-cos position embeddings (recomputed by the model); keep learned ones (fine-tuned / timm
    models) and ask for ``learned_pos_embed``; record classifier heads and the final-norm layout."""
    state = checkpoint.state
    decoder_pos_embed = state.pop("decoder_pos_embed", None)
    if decoder_pos_embed is not None and not is_sincos(decoder_pos_embed):
        checkpoint.notes.append("the checkpoint's decoder position embeddings are not the fixed sin-cos ones this "
                                "MAE's decoder uses: they are replaced by sin-cos")
    pos_embed = state.get("encoder.pos_embed")
    if pos_embed is not None:
        if is_sincos(pos_embed) and not checkpoint.config.get("learned_pos_embed"):
            del state["encoder.pos_embed"]
        else:
            checkpoint.config["learned_pos_embed"] = True
    if "encoder.fc_norm.weight" in state:
        checkpoint.config["global_pool"] = True
    if "encoder.head.1.weight" in state:  # BatchNorm (no affine) + linear: MAE's linear-probe head
        checkpoint.config["head_type"] = "linear_probe"
    return checkpoint


def resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(1, 1 + H*W, D) learned position embeddings -> (1, 1 + h*w, D), bicubic on the grid part."""
    old = math.isqrt(pos_embed.shape[1] - 1)
    patches = pos_embed[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches.float(), size=grid, mode="bicubic", align_corners=False)
    return torch.cat([pos_embed[:, :1], patches.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)], dim=1)


# --------------------------------------------------------------------------------------------- out of our form
def linear_head(state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A classifier's head as one linear layer: the fine-tuning head as it is, the linear probe's BatchNorm
    (no affine, running statistics) folded into its linear layer; None for no head. An MLP head has no equivalent."""
    if "encoder.head.weight" in state:
        return state["encoder.head.weight"], state["encoder.head.bias"]
    if "encoder.head.0.running_mean" in state and "encoder.head.1.weight" in state:
        scale = (state["encoder.head.0.running_var"].float() + 1e-6).rsqrt()
        weight, bias = state["encoder.head.1.weight"].float(), state["encoder.head.1.bias"].float()
        return weight * scale, bias - weight @ (state["encoder.head.0.running_mean"].float() * scale)
    if any(key.startswith("encoder.head.") for key in state):
        raise ValueError("an MLP head has no transformers equivalent: export it to timm's format or its encoder")
    return None


def to_transformers(config: dict, state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """This project's MAE, classifier or encoder -> a transformers ``config.json`` and state dict
    (``ViTMAEForPreTraining`` with a decoder, ``ViTForImageClassification`` with a head, ``ViTModel`` otherwise), in
    the 4.x key spelling that every transformers version reads."""
    has_decoder = any(key.startswith("decoder_") for key in state)
    if "encoder.fc_norm.weight" in state or "encoder.norm.weight" not in state:
        raise ValueError("a global-pool classifier (fc_norm after mean pooling, no final norm) has no transformers "
                         "ViT equivalent: export it to timm (--to timm), or export its pretrained encoder")
    head = None if has_decoder else linear_head(state)
    prefix = "vit." if has_decoder or head is not None else ""
    grid = config["img_size"] // config["patch_size"]
    out: dict[str, torch.Tensor] = {}
    block_names = {"attn.proj": "attention.output.dense", "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense",
                   "norm1": "layernorm_before", "norm2": "layernorm_after"}
    inverse_other = {ours: theirs for theirs, ours in HF_OTHER.items()}
    for key, value in state.items():
        block = re.match(r"^(encoder\.blocks|decoder_blocks)\.(\d+)\.(.+)\.(weight|bias)$", key)
        if block:
            where = f"{prefix}encoder.layer.{block.group(2)}" if block.group(1) == "encoder.blocks" \
                else f"decoder.decoder_layers.{block.group(2)}"
            name, kind = block.group(3), block.group(4)
            if name == "attn.qkv":
                for part, chunk in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                    out[f"{where}.attention.attention.{part}.{kind}"] = chunk.contiguous()
            else:
                out[f"{where}.{block_names[name]}.{kind}"] = value
        elif key in inverse_other and not key.startswith("encoder.head"):
            target = inverse_other[key]
            out[target if target.startswith("decoder.") else prefix + target] = value
    if "encoder.pos_embed" not in state:
        out[f"{prefix}embeddings.position_embeddings"] = sincos_pos_embed_2d(config["embed_dim"], (grid, grid))
    if has_decoder:
        out["decoder.decoder_pos_embed"] = sincos_pos_embed_2d(config["decoder_embed_dim"], (grid, grid))
    if head is not None:
        out["classifier.weight"], out["classifier.bias"] = head
    architecture = "ViTMAEForPreTraining" if has_decoder else "ViTForImageClassification" if head is not None \
        else "ViTModel"
    hf_config = {
        "model_type": "vit_mae" if has_decoder else "vit",
        "architectures": [architecture],
        "hidden_size": config["embed_dim"], "num_hidden_layers": config["depth"],
        "num_attention_heads": config["num_heads"],
        "intermediate_size": int(config["embed_dim"] * config.get("mlp_ratio", 4.0)),
        "hidden_act": "gelu", "layer_norm_eps": config.get("layer_norm_eps", 1e-6), "image_size": config["img_size"],
        "patch_size": config["patch_size"], "num_channels": config["in_chans"], "qkv_bias": True,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
    }
    if has_decoder:
        hf_config.update(decoder_hidden_size=config["decoder_embed_dim"],
                         decoder_num_hidden_layers=config["decoder_depth"],
                         decoder_num_attention_heads=config["decoder_num_heads"],
                         decoder_intermediate_size=int(config["decoder_embed_dim"] * config.get("decoder_mlp_ratio", 4.0)),
                         mask_ratio=config.get("mask_ratio", 0.75), norm_pix_loss=config.get("norm_pix_loss", False))
    if head is not None:
        names = config.get("class_names") or [str(k) for k in range(head[0].shape[0])]
        hf_config.update(id2label=dict(enumerate(names)), label2id={name: k for k, name in enumerate(names)})
    return hf_config, {key: value.contiguous() for key, value in out.items()}


def transformers_preprocessor(config: dict) -> dict:
    """``preprocessor_config.json`` for a transformers export: this project's evaluation view (shorter side to
    img_size / 0.875, bicubic, centre crop img_size), as ConvNextImageProcessor's ``crop_pct`` does it, then the
    normalisation the weights were trained with (ImageNet's when not saved). At 384 pixels and more that processor
    resizes to the size without cropping."""
    mean = config.get("image_mean") or ([0.485, 0.456, 0.406] if config["in_chans"] == 3 else [0.5] * config["in_chans"])
    std = config.get("image_std") or ([0.229, 0.224, 0.225] if config["in_chans"] == 3 else [0.5] * config["in_chans"])
    return {"image_processor_type": "ConvNextImageProcessor", "do_resize": True,
            "size": {"shortest_edge": config["img_size"]}, "crop_pct": 0.875, "resample": 3, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(mean), "image_std": list(std)}


def to_timm(config: dict, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder in timm's ``VisionTransformer`` naming, with its position embeddings (timm learns them)."""
    out = {key[len("encoder."):]: value for key, value in state.items() if key.startswith("encoder.")}
    if "pos_embed" not in out:
        grid = config["img_size"] // config["patch_size"]
        out["pos_embed"] = sincos_pos_embed_2d(config["embed_dim"], (grid, grid))
    return {key: value.contiguous() for key, value in out.items()}
