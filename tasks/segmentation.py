"""The segmentation task: UperNet on multi-level ViT features, pixel cross-entropy, mIoU with sliding windows."""
from __future__ import annotations

import json
import logging

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from engine import Task
from engine.flags import hub_options
from engine.optim import build_adamw, param_groups_layer_decay
from engine.schedule import warmup_cosine, warmup_poly
from engine.setup import RunDir, save_args
from engine.step import broadcast_buffers
from models.upernet import ViTUperNet
from models.weights import load_encoder
from pipeline.loading import build_loader, move_to_device
from pipeline.samples import collate_skipping_bad
from pipeline.sampling import EpochChain
from pipeline.segmentation import (
    IGNORE_INDEX, SegmentationEvalTransform, SegmentationSamples, SegmentationTrainTransform,
    build_segmentation_dataset,
)
from pipeline.shards import build_step_sampler
from pipeline.transforms import Normalize, channel_stats
from utils.errors import UserError
from utils.hub import push_run
from utils.metrics import SegmentationMetric
from utils.visualize import panels_to_picture, save_picture, segmentation_panels

logger = logging.getLogger(__name__)

BUILT_IN = "fashion_mnist_seg"


def segmentation_samples(args, split: str, train: bool, max_samples: int | None):
    base = build_segmentation_dataset(args.dataset, args.path_to_data, split, args.input_channels, max_samples,
                                      hub_options(args), args.mask_column, args.reduce_zero_label, args.img_size)
    mean_colour = [round(255 * m) for m in data_stats(args)[0]]  # padding that normalises to 0, as mmseg's
    transform = (SegmentationTrainTransform(args.img_size, args.base_size, args.scale_range, args.photometric,
                                            fill=mean_colour) if train else SegmentationEvalTransform(args.base_size))
    return base, SegmentationSamples(base, transform, args.seed)


def data_stats(args) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation mean/std: Fashion-MNIST's for the canvases, ImageNet's for RGB."""
    return channel_stats(args.input_channels, "fashion_mnist" if args.dataset == BUILT_IN else None)


def check_labels(masks: torch.Tensor, num_classes: int) -> None:
    """One line, before any compute, when a mask holds a label the model has no class for."""
    labelled = masks[masks != IGNORE_INDEX]
    if labelled.numel() and (labelled.max() >= num_classes or labelled.min() < 0):
        bad = int(labelled.max() if labelled.max() >= num_classes else labelled.min())
        raise UserError(f"a mask holds label {bad} but --num_classes is {num_classes}: set --num_classes to the number "
                        f"of classes (labels 0..K-1, unlabelled pixels {IGNORE_INDEX}), or --reduce_zero_label if 0 "
                        "marks unlabelled pixels")


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Pixel cross-entropy over labelled pixels (0, not NaN, for a crop without any)."""
    total = F.cross_entropy(logits.float(), masks, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (masks != IGNORE_INDEX).sum().clamp(min=1)


@torch.no_grad()
def predict(model: ViTUperNet, images: torch.Tensor, crop: int, stride: int) -> torch.Tensor:
    """Logits (B, K, H, W) for normalised images of any size: one forward at the crop size, else overlapping
    crop-sized windows (padded at the bottom/right when the image is smaller) whose logits are averaged."""
    height, width = images.shape[2:]
    if (height, width) == (crop, crop):
        return model(images).logits.float()
    padded = F.pad(images, (0, max(crop - width, 0), 0, max(crop - height, 0)))
    full_h, full_w = padded.shape[2:]
    logits = images.new_zeros((images.shape[0], model.num_classes, full_h, full_w), dtype=torch.float32)
    counts = images.new_zeros((1, 1, full_h, full_w), dtype=torch.float32)
    for row in range((max(full_h - crop, 0) + stride - 1) // stride + 1):
        for col in range((max(full_w - crop, 0) + stride - 1) // stride + 1):
            top, left = min(row * stride, full_h - crop), min(col * stride, full_w - crop)
            window = padded[:, :, top:top + crop, left:left + crop]
            logits[:, :, top:top + crop, left:left + crop] += model(window).logits.float()
            counts[:, :, top:top + crop, left:left + crop] += 1
    return (logits / counts)[:, :, :height, :width]


@torch.no_grad()
def evaluate(accelerator, model: ViTUperNet, samples, normalize: Normalize, metric: SegmentationMetric, args,
             num_pictures: int = 0) -> tuple[dict, torch.Tensor | None]:
    """mIoU, per-class IoU and pixel accuracy over the whole validation split. Each process predicts its own
    share (index % processes, no padding or duplicates) and the confusion matrices are summed across processes.
    Returns the metrics and, on the main process, overlay panels of its first ``num_pictures`` images."""
    model.eval()
    mine = list(range(accelerator.process_index, len(samples), accelerator.num_processes))
    panels, pictured = [], 0
    starts = range(0, len(mine), args.eval_batch_size)
    for start in tqdm(starts, desc="evaluate", leave=False, disable=not accelerator.is_main_process):
        batch = collate_skipping_bad([samples[(i, 0)] for i in mine[start:start + args.eval_batch_size]])
        if "pixel_values" not in batch:
            continue
        check_labels(batch["mask"], model.num_classes)
        batch = move_to_device(batch, accelerator.device)
        images, masks = normalize(batch["pixel_values"]), batch["mask"]
        with accelerator.autocast():  # the unwrapped model: the same precision as in training
            logits = predict(model, images, args.img_size, args.slide_stride)
        if logits.shape[2:] != masks.shape[1:]:  # back to the mask's own resolution, where the metric is defined
            logits = F.interpolate(logits, size=masks.shape[1:], mode="bilinear", align_corners=False)
        predictions = logits.argmax(dim=1)
        metric.update(predictions, masks)
        if accelerator.is_main_process and pictured < num_pictures:
            take = num_pictures - pictured
            shown = normalize.inverse(images[:take])
            if shown.shape[2:] != masks.shape[1:]:
                shown = F.interpolate(shown, size=masks.shape[1:], mode="bilinear", align_corners=False)
            panels.append(segmentation_panels(shown, masks[:take], predictions[:take], model.num_classes, IGNORE_INDEX))
            pictured += min(take, images.shape[0])
    return metric.compute(), (torch.cat(panels) if panels else None)


class Segmentation(Task):
    """Pixel cross-entropy on the UperNet head (plus the auxiliary head's); evaluation: mIoU and pixel accuracy
    over the whole validation split, with overlay pictures."""

    name, script, log_train_rows = "segmentation", "finetune_segmentation.py", False

    def __init__(self, args, config: dict, pretrained_state: dict | None, run_dir: RunDir):
        self.args, self.config, self.pretrained_state, self.run_dir = args, config, pretrained_state, run_dir
        self.best_miou, self.last_result = 0.0, {}

    def build(self, accelerator):
        args = self.args
        with accelerator.main_process_first():
            train_base, self.train_samples = segmentation_samples(args, "train", train=True, max_samples=args.max_samples)
            _, self.val_samples = segmentation_samples(args, "val", train=False, max_samples=args.max_val_samples)
        class_names = list(getattr(train_base, "classes", ()) or []) or [str(k) for k in range(args.num_classes)]
        self.class_names = class_names if len(class_names) == args.num_classes else [str(k) for k in range(args.num_classes)]
        if accelerator.is_main_process:
            save_args(args, self.run_dir)
        self.accelerator = accelerator
        self.normalize = Normalize(*data_stats(args)).to(accelerator.device)
        mean, std = data_stats(args)
        model = ViTUperNet(args.num_classes, **{**self.config, "image_mean": list(mean), "image_std": list(std)},
                           class_names=self.class_names, out_indices=args.out_indices,
                           decoder_channels=args.decoder_channels, aux_channels=args.aux_channels,
                           drop_path_rate=args.drop_path)
        if self.pretrained_state is not None:  # every encoder tensor must load; only the final norm / a head may go unused
            report = load_encoder(model.backbone, self.pretrained_state, new_ok=(), unused_ok=("norm.", "fc_norm.", "head."))
            logger.info("pretrained backbone: %s", report.summary())
            if accelerator.is_main_process:
                (self.run_dir.root / "weights_report.json").write_text(json.dumps(vars(report), indent=2))
        sync_bn = accelerator.num_processes > 1 and accelerator.device.type == "cuda"
        if sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # a few crops per GPU: BN statistics over all
        micro_batch = args.per_gpu_batch_size // args.gradient_accumulation_steps
        if micro_batch * (accelerator.num_processes if sync_bn else 1) < 2:
            raise UserError(f"micro-batches of {micro_batch} crop: the heads' BatchNorm needs at least 2 per step (or "
                            "SyncBatchNorm across GPUs): raise --per_gpu_batch_size or lower --gradient_accumulation_steps")
        model.to(accelerator.device)
        sampler = build_step_sampler(self.train_samples, args.per_gpu_batch_size, args.gradient_accumulation_steps,
                                     accelerator.num_processes, accelerator.process_index, args.seed)
        loader = build_loader(self.train_samples, EpochChain(sampler), args.num_workers, accelerator.device)
        groups = param_groups_layer_decay(model, args.weight_decay, args.layer_decay, vit_prefix="backbone.")
        optimizer = build_adamw(groups, args.learning_rate, betas=(0.9, 0.999), device=accelerator.device)
        self.metric = SegmentationMetric(args.num_classes, IGNORE_INDEX, accelerator.device)
        return model, optimizer, sampler, loader

    def prepared(self, model, accelerator) -> None:
        self.plain_model = accelerator.unwrap_model(model)

    def started(self) -> None:
        trainer, args = self.trainer, self.args
        logger.info("%d training images, %d validation images, %d classes, %d steps/epoch, %d steps, global batch %d, "
                    "peak lr %.3g", len(self.train_samples), len(self.val_samples), args.num_classes,
                    trainer.steps_per_epoch, trainer.total_steps, trainer.sampler.global_batch, args.learning_rate)

    def learning_rate(self, step: int, total_steps: int, steps_per_epoch: int) -> float:
        args = self.args
        warmup = args.warmup_steps if args.warmup_steps is not None else round(0.1 * total_steps)
        schedule = warmup_poly if args.lr_schedule == "poly" else warmup_cosine
        return schedule(step, total_steps, warmup, args.learning_rate, args.min_learning_rate)

    def check_batch(self, batch: dict) -> None:
        if "mask" in batch:
            check_labels(batch["mask"], self.args.num_classes)  # on the host copy: no device synchronisation

    def loss(self, model, batch: dict, values: dict):
        output = model(self.normalize(batch["pixel_values"]))
        loss = segmentation_loss(output.logits, batch["mask"])
        if output.aux_logits is not None:
            loss = loss + self.args.aux_loss_weight * segmentation_loss(output.aux_logits, batch["mask"])
        return loss, {}

    def eval_every(self, steps_per_epoch: int) -> int:
        return self.args.eval_every or steps_per_epoch

    def evaluate(self, model, step: int) -> dict:
        accelerator, args = self.accelerator, self.args
        broadcast_buffers(accelerator, self.plain_model)
        result, panels = evaluate(accelerator, self.plain_model, self.val_samples, self.normalize, self.metric, args,
                                  args.num_pictures)
        if panels is not None and accelerator.is_main_process:
            picture = panels_to_picture(panels, min_side=96, columns=3)
            save_picture(picture, self.run_dir.subdir("predictions") / f"step_{step:08d}.png")
            if self.trainer.metrics is not None:
                self.trainer.metrics.log_image("predictions", picture, step)
        self.best_miou, self.last_result = max(self.best_miou, result["mIoU"]), result
        return {"mIoU": result["mIoU"], "pixel_acc": result["pixel_acc"]}

    def report(self, row: dict) -> None:
        logger.info("step %d (epoch %.2f): train loss %.4f, mIoU %.2f%%, pixel accuracy %.2f%%", row["step"],
                    row["epoch"], row["train_loss"], row["mIoU"], row["pixel_acc"])

    def state_dict(self) -> dict:
        return {"best_mIoU": self.best_miou}

    def load_state_dict(self, state: dict) -> None:
        self.best_miou = state.get("best_mIoU", 0.0)

    def finish(self, model, step: int, result: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        result, run_dir = self.last_result, self.run_dir
        summary = {"mIoU": result["mIoU"], "pixel_acc": result["pixel_acc"], "best_mIoU": self.best_miou, "step": step,
                   "per_class_iou": dict(zip(self.class_names, result["per_class_iou"])), "args": vars(self.args)}
        (run_dir.root / "results.json").write_text(json.dumps(summary, indent=2, default=str))
        logger.info("results: mIoU %.2f%%, pixel accuracy %.2f%%; written to %s", summary["mIoU"],
                    summary["pixel_acc"], run_dir.root / "results.json")
        pictures = sorted((run_dir.root / "predictions").glob("step_*.png"))
        push_run(self.accelerator, self.args, run_dir.root, "segmentation", summary, pictures[-1] if pictures else None)
