"""Publishing a run's final weights to the 🤗 Hub. The folder that is uploaded (weights, config, model card,
picture: nothing else) is built locally first, in ``<run>/hub_upload/``, so it can be checked without the
network; the upload runs on the main process only, after the run's last checkpoint and ``final/`` are saved."""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
import sys
from pathlib import Path

from .errors import UserError

logger = logging.getLogger(__name__)

USAGE = {  # script kind -> (what it is, model class, import)
    "pretraining": ("a Masked Autoencoder (MAE) pretrained", "MaskedAutoencoder"),
    "classification": ("a Vision Transformer classifier fine-tuned from an MAE encoder", "VisionTransformer"),
    "segmentation": ("a ViT + UperNet semantic segmentation model fine-tuned from an MAE encoder", "ViTUperNet"),
}
RESULT_KEYS = ("top1", "top5", "best_top1", "mIoU", "pixel_acc", "best_mIoU", "loss", "val_loss", "val_psnr_masked")


def add_hub_args(parser: argparse.ArgumentParser) -> None:
    hub = parser.add_argument_group("🤗 Hub")
    hub.add_argument("--push_to_hub", action="store_true",
                     help="Upload the final weights, config, a model card and the last picture to the Hub at the end.")
    hub.add_argument("--hub_model_id", type=str, default=None, help="Hub repo to upload to (user/name or org/name).")
    hub.add_argument("--hub_private", action="store_true", help="Create the repo as private.")
    hub.add_argument("--hub_revision", type=str, default=None, help="Branch to upload to (created if missing).")
    hub.add_argument("--hub_license", type=str, default="apache-2.0",
                     help="License of the uploaded weights (cc-by-nc-4.0 for ones built on facebookresearch/mae's).")
    hub.add_argument("--revision", type=str, default=None,
                     help="Branch, tag or commit of the Hub weights the run starts from (a user/name weights flag).")


def check_hub_args(args) -> None:
    if args.push_to_hub and (not args.hub_model_id or args.hub_model_id.count("/") != 1):
        raise UserError("--push_to_hub needs --hub_model_id user/name (the repo to create or update)")


SCRIPTS = {"pretraining": "pretrain_mae.py", "classification": "finetune_classifier.py",
           "segmentation": "finetune_segmentation.py"}
HUB_DATASETS = {"fashion_mnist": "zalando-datasets/fashion_mnist"}


def hub_id(value) -> str | None:
    """``value`` if it names a Hub repo (user/name that is not a local path), else None."""
    text = str(value or "")
    return text if text.count("/") == 1 and not Path(text).expanduser().exists() and not text.startswith((".", "/")) \
        else None


def card_metadata(kind: str, args: dict, results: dict):
    """The model card's metadata (``huggingface_hub.ModelCardData``): license, library, tags, pipeline, data set,
    base model and metrics."""
    from huggingface_hub import ModelCardData

    dataset = str(args.get("dataset") or "")
    dataset = hub_id(dataset[3:]) if dataset.startswith("hf:") else HUB_DATASETS.get(dataset)  # (not a local path)
    base = hub_id(args.get("path_to_pretrained_mae_weights") or args.get("path_to_backbone_checkpoint")
                  or args.get("resume_from_pretrained"))
    metrics = [key for key in RESULT_KEYS if isinstance(results.get(key), (int, float))]
    return ModelCardData(license=args.get("hub_license") or "apache-2.0", library_name="mae-accelerate",
                         tags=["mae", "vision-transformer", kind], datasets=[dataset] if dataset else None,
                         base_model=base, metrics=metrics or None, pipeline_tag={
                             "pretraining": "image-feature-extraction", "classification": "image-classification",
                             "segmentation": "image-segmentation"}[kind])


def model_card(kind: str, repo_id: str, args: dict, results: dict, picture: str | None, command: str = "") -> str:
    """The README.md of the uploaded repo: what it is, how to load it, its metrics, command and training arguments."""
    what, model_class = USAGE[kind]
    revision = f", revision=\"{args['hub_revision']}\"" if args.get("hub_revision") else ""
    metadata = card_metadata(kind, args, results)
    # local paths say nothing to a reader of the card (and may say too much): their last part only
    args = {key: (Path(str(value)).name if value and (key.startswith(("path_to", "resume_from"))
                                                      or key == "working_directory") else value)
            for key, value in args.items()}
    dataset = str(args.get("dataset") or "")
    if dataset.startswith("hf:") and not hub_id(dataset[3:]):  # a local 🤗 dataset folder: its name only
        args["dataset"] = "hf:" + Path(dataset[3:]).name
    lines = [f"# {repo_id.split('/')[-1]}", "",
             f"{what} with mae-accelerate on `{args.get('dataset')}`"
             f"{' (' + str(args.get('path_to_data')) + ')' if args.get('path_to_data') else ''}, with the "
             f"project's `{SCRIPTS[kind]}` (PyTorch, 🤗 Accelerate).", "",
             "## Usage", "", "```python", "# in a checkout of mae-accelerate",
             "from models.upernet import ViTUperNet" if model_class == "ViTUperNet" else f"from models import {model_class}",
             f"model = {model_class}.from_pretrained(\"{repo_id}\"{revision})", "```", ""]
    if kind != "segmentation":
        lines += ["```bash", f"python predict.py {repo_id} image.png"
                  f"{' --revision ' + args['hub_revision'] if args.get('hub_revision') else ''}"
                  f"   # {'top-5 labels' if kind == 'classification' else 'the reconstruction picture'}", "```", ""]
    shown = {key: results[key] for key in RESULT_KEYS if isinstance(results.get(key), (int, float))}
    if shown:
        lines += ["## Results", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {value:.4g} |" for key, value in shown.items()]
        lines.append("")
    if picture:
        lines += [f"![{kind} samples]({picture})", ""]
    if command:
        lines += ["## Command", "", "```bash", command, "```", ""]
    lines += ["## Training arguments", "", "```json", json.dumps(args, indent=2, default=str), "```", ""]
    from huggingface_hub import ModelCard

    return str(ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n" + "\n".join(lines)))


def prepare_upload(run_root: Path, kind: str, repo_id: str, args: dict, results: dict,
                   picture: Path | None = None) -> Path:
    """``<run>/hub_upload/``: final/'s config.json + model.safetensors, README.md (the card), the picture."""
    folder = run_root / "hub_upload"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(run_root / "final" / name, folder / name)
    picture_name = None
    if picture is not None and picture.exists():
        picture_name = f"{kind}_samples.png"
        shutil.copy(picture, folder / picture_name)
    local = [str(part) for part in sys.argv[1:] if part.startswith(("/", "~", ".")) or Path(part).exists()]
    command = "accelerate launch " + " ".join(  # local paths say nothing to a reader: their last part only
        shlex.quote(Path(part).name if part in local else part) for part in [SCRIPTS[kind], *sys.argv[1:]])
    (folder / "README.md").write_text(model_card(kind, repo_id, args, results, picture_name, command))
    return folder


def push_run(accelerator, args, run_root: Path, kind: str, results: dict, picture: Path | None = None) -> None:
    """Build the upload folder and push it (main process). A failed upload keeps the run and says how to retry."""
    if not args.push_to_hub or not accelerator.is_main_process:
        return
    folder = prepare_upload(run_root, kind, args.hub_model_id, vars(args), results, picture)
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(args.hub_model_id, private=args.hub_private, exist_ok=True)
        if args.hub_revision:
            api.create_branch(args.hub_model_id, branch=args.hub_revision, exist_ok=True)
        api.upload_folder(repo_id=args.hub_model_id, folder_path=str(folder), revision=args.hub_revision,
                          commit_message=f"Upload {kind} weights from mae-accelerate")
        logger.info("uploaded %s to https://huggingface.co/%s", folder, args.hub_model_id)
    except Exception as error:  # the weights are safe on disk: say how to retry rather than crash
        retry = f"hf upload {args.hub_model_id} {folder}"
        retry += f" --revision {args.hub_revision}" if args.hub_revision else ""
        logger.error("upload to %s failed (%s: %s); the folder is ready, retry with: %s", args.hub_model_id,
                     type(error).__name__, str(error).splitlines()[0] if str(error) else "", retry)
