"""``from_pretrained`` for the model classes: any checkpoint :mod:`models.convert` reads, built with its sizes and
loaded strictly."""
from __future__ import annotations

import inspect
import logging
from pathlib import Path

from .convert import read_checkpoint
from .weights import load_encoder

logger = logging.getLogger(__name__)


def load_pretrained(cls, source: str | Path, revision: str | None = None, token: str | bool | None = None,
                    **overrides):
    """``cls`` (MaskedAutoencoder or VisionTransformer) built with the checkpoint's sizes (``overrides`` win, e.g.
    ``img_size``) and loaded strictly: a missing or unexpected tensor, or a shape of another architecture, is a
    one-line error; each adaptation (fresh decoder, interpolated position embeddings) is logged in one line."""
    checkpoint = read_checkpoint(source, revision, token)
    params = inspect.signature(cls.__init__).parameters
    config = {key: value for key, value in checkpoint.config.items() if key in params}
    state = dict(checkpoint.state)
    notes = [f"{source}: {note}" for note in checkpoint.notes]
    unknown = [key for key in state if not key.startswith(("encoder.", "decoder_", "mask_token"))]
    if unknown:
        raise ValueError(f"{source}: tensors that map onto nothing in this project's models: "
                         f"{', '.join(unknown[:4])}{' ...' if len(unknown) > 4 else ''}")
    if "decoder_embed_dim" in params:  # an MAE
        for key in ("global_pool", "head_type"):
            config.pop(key, None)
        dropped = [key for key in state if key.startswith(("encoder.head.", "encoder.fc_norm."))]
        if dropped:
            notes.append(f"{source}: the classifier's head / fc_norm are not part of an MAE and are not loaded")
        state = {key: value for key, value in state.items() if key not in dropped}
        new_ok: tuple[str, ...] = ()
        if not checkpoint.has_decoder:
            new_ok = ("decoder_", "mask_token")
            notes.append(f"{source}: encoder-only checkpoint: the MAE decoder is freshly initialised")
        if "encoder.norm.weight" not in state:
            new_ok += ("encoder.norm.",)
            notes.append(f"{source}: no final encoder norm in the checkpoint (a global-pool classifier): "
                         "it is freshly initialised")
        unused_ok: tuple[str, ...] = ()
    else:
        if checkpoint.has_decoder:
            notes.append(f"{source}: the MAE decoder is not part of a VisionTransformer and is not loaded")
        state = {key[len("encoder."):]: value for key, value in state.items() if key.startswith("encoder.")}
        config["num_classes"] = checkpoint.num_classes
        new_ok, unused_ok = (), ()
        head_change = {key: value for key, value in overrides.items()
                       if key in ("num_classes", "global_pool", "head_type") and value != config.get(key)}
        if head_change:  # a new head (and pooling) on the checkpoint's encoder
            state = {key: value for key, value in state.items() if not key.startswith("head.")}
            if "num_classes" in head_change:
                config.pop("class_names", None)  # the names were the old head's
            new_ok, unused_ok = ("head.", "fc_norm."), ("norm.", "fc_norm.")
            notes.append(f"{source}: new head ({', '.join(f'{k}={v}' for k, v in head_change.items())}): "
                         "the checkpoint's head is not loaded")
    config.update({key: value for key, value in overrides.items() if value is not None})
    model = cls(**config)
    load_encoder(model, state, new_ok=new_ok, unused_ok=unused_ok)  # (interpolates learned position embeddings)
    for note in notes:
        logger.warning(note)
    return model
