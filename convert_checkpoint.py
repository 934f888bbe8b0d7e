"""Convert MAE / ViT weights between this project's format, 🤗 transformers and timm. The source format is
detected (this project's folders, 🤗 ViTMAE/ViT folders or Hub repos, facebookresearch/mae .pth, timm state
dicts); the output is safetensors plus a config.json.

    python convert_checkpoint.py --src facebook/vit-mae-base --to ours --dst converted/vit-mae-base
    python convert_checkpoint.py --src work_dir/<run>/final --to transformers --dst exported/hf
    python convert_checkpoint.py --src mae_pretrain_vit_base.pth --to timm --dst exported/timm

--to ours      MaskedAutoencoder.from_pretrained(dst) (VisionTransformer.from_pretrained without a decoder)
--to transformers  ViTMAEForPreTraining.from_pretrained(dst) with a decoder, else ViTModel.from_pretrained(dst)
--to timm      timm.create_model(config["architecture"], pretrained=True,
                                 pretrained_cfg_overlay=config["pretrained_cfg_overlay"], **config["model_args"])
               with config = json.load(open(dst/config.json))
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from safetensors.torch import save_file

from models import MaskedAutoencoder, VisionTransformer
from models.convert import read_checkpoint, to_timm, to_transformers, transformers_preprocessor
from models.pretrained import load_pretrained
from utils.errors import run_cli

logger = logging.getLogger("convert_checkpoint")
TIMM_ARCHITECTURES = {(192, 12): "vit_tiny_patch16_224", (384, 12): "vit_small_patch16_224",
                      (768, 12): "vit_base_patch16_224", (1024, 24): "vit_large_patch16_224",
                      (1280, 32): "vit_huge_patch14_224"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="A folder, a weights file or a 🤗 Hub repo id (user/name).")
    parser.add_argument("--to", required=True, choices=["ours", "transformers", "timm"], help="Output format.")
    parser.add_argument("--dst", required=True, help="Output folder (created; existing files are overwritten).")
    parser.add_argument("--revision", default=None, help="Branch, tag or commit of a Hub --src.")
    parser.add_argument("--num_heads", type=int, default=None,
                        help="Encoder attention heads, for formats without a config (.pth / timm): the default "
                             "guesses from the width (ViT-S 6, B 12, L/H 16, else width / 64).")
    parser.add_argument("--decoder_num_heads", type=int, default=None,
                        help="Decoder attention heads for config-less MAE checkpoints (default: 16 for width 512).")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    checkpoint = read_checkpoint(args.src, args.revision)
    overrides = {"num_heads": args.num_heads}
    if checkpoint.has_decoder:
        overrides["decoder_num_heads"] = args.decoder_num_heads
    overrides = {key: value for key, value in overrides.items() if value is not None}
    checkpoint.config.update(overrides)
    dst = Path(args.dst)
    dst.mkdir(parents=True, exist_ok=True)
    if args.to == "ours":
        cls = MaskedAutoencoder if checkpoint.has_decoder else VisionTransformer
        load_pretrained(cls, args.src, args.revision, **overrides).save_pretrained(dst)
        usage = f"{cls.__name__}.from_pretrained({str(dst)!r})"
    elif args.to == "transformers":
        hf_config, state = to_transformers(checkpoint.config, checkpoint.state)
        (dst / "config.json").write_text(json.dumps(hf_config, indent=2))
        (dst / "preprocessor_config.json").write_text(json.dumps(transformers_preprocessor(checkpoint.config), indent=2))
        save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
        usage = f"transformers.{hf_config['architectures'][0]}.from_pretrained({str(dst)!r})"
    else:
        if checkpoint.has_decoder:
            logger.warning("timm has no MAE decoder: only the encoder is written")
        config = checkpoint.config
        model_args = dict(img_size=config["img_size"], patch_size=config["patch_size"], in_chans=config["in_chans"],
                          embed_dim=config["embed_dim"], depth=config["depth"], num_heads=config["num_heads"],
                          mlp_ratio=config.get("mlp_ratio", 4.0), num_classes=checkpoint.num_classes,
                          global_pool="avg" if config.get("global_pool") else "token")
        architecture = TIMM_ARCHITECTURES.get((config["embed_dim"], config["depth"]), "vit_base_patch16_224")
        # timm drops a head whose size differs from the named architecture's pretrained config (1000 classes)
        # and then loads non-strictly: the overlay gives it the right class count, so every tensor loads.
        overlay = {"file": str(dst / "model.safetensors"), "num_classes": checkpoint.num_classes}
        save_file(to_timm(config, checkpoint.state), str(dst / "model.safetensors"), metadata={"format": "pt"})
        (dst / "config.json").write_text(json.dumps({"architecture": architecture, "model_args": model_args,
                                                     "pretrained_cfg_overlay": overlay}, indent=2))
        usage = (f"timm.create_model({architecture!r}, pretrained=True, pretrained_cfg_overlay=<config.json's>, "
                 "**<config.json's model_args>)")
    logger.info("%s (%s) -> %s: load with %s", args.src, checkpoint.source_format, dst, usage)


if __name__ == "__main__":
    run_cli(main)
