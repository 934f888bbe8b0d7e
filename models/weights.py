"""Reading weights (any format :mod:`models.convert` reads) and loading an MAE encoder into a
:class:`VisionTransformer`, with a report of every key and one-line errors."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .convert import read_checkpoint

ENCODER_PREFIX = "encoder."
NOT_ENCODER = ("decoder_", "mask_token")


def read_weights(path: str | Path, revision: str | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, state dict in this project's naming) of any supported checkpoint: this project's folders and
    files, 🤗 transformers ViTMAE/ViT, facebookresearch/mae ``.pth``, timm; local or a Hub repo id."""
    checkpoint = read_checkpoint(path, revision)
    return checkpoint.config, checkpoint.state


def encoder_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder's weights: an MAE's ``encoder.*`` keys without the prefix; a ViT's keys as they are."""
    if any(key.startswith(ENCODER_PREFIX) for key in state):
        return {key[len(ENCODER_PREFIX):]: value for key, value in state.items() if key.startswith(ENCODER_PREFIX)}
    return {key: value for key, value in state.items() if not key.startswith(NOT_ENCODER)}


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)  # in the model, not in the checkpoint: freshly initialised
    unused: list[str] = field(default_factory=list)  # in the checkpoint, not used by the model

    def summary(self) -> str:
        return (f"loaded {len(self.loaded)} tensors; newly initialised: {', '.join(self.new) or 'none'}; "
                f"not used: {', '.join(self.unused) or 'none'}")


def load_encoder(model: torch.nn.Module, state: dict[str, torch.Tensor],
                 new_ok: tuple[str, ...] = ("head.", "fc_norm."), unused_ok: tuple[str, ...] = ("norm.", "head.")) -> LoadReport:
    """Load encoder weights into a ViT. Only the head (and fc_norm) may be new, only the final norm / an old
    head unused; anything else, and any shape mismatch, is refused with one line naming the tensors."""
    target = model.state_dict()
    for key in ("pos_embed", "encoder.pos_embed"):  # learned position embeddings at another image size
        if key in state and key in target and state[key].shape[1] != target[key].shape[1]:
            from .convert import resize_pos_embed

            grid = (model.encoder if key.startswith("encoder.") else model).patch_embed.grid_size
            state = {**state, key: resize_pos_embed(state[key], grid)}
            logging.getLogger(__name__).warning("position embeddings interpolated (bicubic) to the %dx%d grid", *grid)
    mismatched = [f"{k} {tuple(v.shape)} in the checkpoint vs {tuple(target[k].shape)} in the model"
                  for k, v in state.items() if k in target and v.shape != target[k].shape]
    if mismatched:
        raise ValueError(f"the checkpoint is of another architecture: {'; '.join(mismatched[:3])}"
                         f"{f' (+{len(mismatched) - 3} more)' if len(mismatched) > 3 else ''}: "
                         "build the model with the checkpoint's sizes (depth, width, patch size, channels)")
    report = LoadReport(
        loaded=sorted(k for k in state if k in target),
        new=sorted(k for k in target if k not in state),
        unused=sorted(k for k in state if k not in target),
    )
    missing = [k for k in report.new if not k.startswith(new_ok)]
    extra = [k for k in report.unused if not k.startswith(unused_ok)]
    if missing or extra:
        raise ValueError(f"the checkpoint is of another architecture: missing {', '.join(missing[:4]) or 'nothing'}, "
                         f"unexpected {', '.join(extra[:4]) or 'nothing'}: build the model with the checkpoint's sizes and layout "
                         "(depth, head, pooling)")
    model.load_state_dict({k: state[k] for k in report.loaded}, strict=False)
    return report
