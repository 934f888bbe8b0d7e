"""The classification task: fine-tuning, linear probing and frozen features + MLP on an MAE encoder (or from
scratch), evaluated by top-1 / top-5."""
from __future__ import annotations

import json
import logging

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from engine import Task
from engine.flags import hub_options
from engine.optim import build_adamw, param_groups_layer_decay
from engine.schedule import scaled_learning_rate, warmup_cosine
from engine.setup import RunDir, save_args
from engine.step import ModelEma, broadcast_buffers
from models import VisionTransformer
from models.weights import load_encoder
from pipeline.datasets import build_image_dataset
from pipeline.loading import build_loader, move_to_device
from pipeline.resident import resident_batches
from pipeline.samples import SeededSamples, TensorSamples
from pipeline.sampling import EpochChain
from pipeline.shards import build_step_sampler
from pipeline.sources import HubImageDataset, dataset_classes
from pipeline.transforms import ClassifierTrainTransform, Normalize, ResizeCenterCrop, channel_stats, timm_rand_augment
from utils.errors import UserError
from utils.hub import push_run
from utils.metrics import topk_accuracy

logger = logging.getLogger(__name__)

FROZEN_MODES = ("linear_probe", "freeze_encoder")


def build_classifier(mode: str, config: dict, class_names: list[str], args) -> VisionTransformer:
    head_type = {"finetune": "linear", "linear_probe": "linear_probe", "freeze_encoder": "mlp"}[mode]
    global_pool = args.mean_pooling if mode in FROZEN_MODES else not args.cls_token
    mean, std = channel_stats(args.input_channels, args.dataset)
    return VisionTransformer(**{**config, "image_mean": list(mean), "image_std": list(std)}, num_classes=len(class_names),
                             class_names=class_names, global_pool=global_pool, head_type=head_type,
                             drop_path_rate=args.drop_path or 0.0)


def load_pretrained(model: VisionTransformer, state: dict):
    """Encoder weights into the classifier; with global pooling the pretrained final norm becomes fc_norm's start."""
    if model.global_pool and "norm.weight" in state:
        state = {**state, "fc_norm.weight": state["norm.weight"], "fc_norm.bias": state["norm.bias"]}
    report = load_encoder(model, state, new_ok=("head.", "fc_norm."), unused_ok=("norm.", "head."))
    logger.info("pretrained encoder: %s", report.summary())
    return report


def freeze_encoder(model: VisionTransformer) -> None:
    """Everything but the head stops training (and stays in eval mode: no dropout, no drop-path)."""
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("head.")


def image_samples(args, split: str, train: bool, max_samples: int | None):
    base = build_image_dataset(args.dataset, args.path_to_data, split, args.input_channels, args.img_size,
                               max_samples, hub_options(args), require_split=split != "train")
    if not train:
        return base, SeededSamples(base, ResizeCenterCrop(args.img_size), args.seed)
    auto_augment = (timm_rand_augment(args.auto_augment, args.img_size, channel_stats(args.input_channels, args.dataset)[0])
                    if args.auto_augment else None)
    transform = ClassifierTrainTransform(args.img_size, args.min_crop_scale or 0.08, args.random_aug_magnitude or 0,
                                         args.random_aug_ops, auto_augment)
    return base, SeededSamples(base, transform, args.seed)


def check_classes(args, train_base, val_base) -> list[str]:
    classes = dataset_classes(train_base)
    if not classes and args.num_classes and isinstance(train_base, HubImageDataset) and train_base.label_column:
        classes = [str(i) for i in range(args.num_classes)]  # integer labels without names: trust the flag
    val_labeled = bool(dataset_classes(val_base)) or (isinstance(val_base, HubImageDataset) and val_base.label_column)
    if classes and not val_labeled:
        raise UserError("the validation split has no labels: it needs the same class subfolders as training "
                        "(val/<class>/... or validation/<class>/...)")
    if not classes:
        raise UserError("the training data has no labels: a classifier needs class subfolders (train/<class>/...), "
                        "or a 🤗 dataset with a label column")
    if args.num_classes is not None and args.num_classes != len(classes):
        raise UserError(f"--num_classes {args.num_classes} but the data has {len(classes)} classes "
                        f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}): drop the flag or fix the data")
    val_classes = dataset_classes(val_base)
    if val_classes and val_classes != classes:
        raise UserError(f"the validation split has classes {val_classes[:5]}... but training has {classes[:5]}...: "
                        "both splits need the same class subfolders")
    return list(classes)


def build_optimizer(mode: str, trained: torch.nn.Module, model: VisionTransformer, args, lr: float, device):
    """LARS for the linear probe (official recipe: momentum 0.9, trust ratio on weight matrices, no weight
    decay); AdamW with layer-decay groups for fine-tuning; plain AdamW on the MLP head of frozen features."""
    params = [p for p in trained.parameters() if p.requires_grad]
    if mode == "linear_probe":
        from timm.optim import Lars

        return Lars([{"params": [p for p in params if p.ndim > 1], "always_adapt": True},
                     {"params": [p for p in params if p.ndim <= 1], "always_adapt": False}],
                    lr=lr, momentum=0.9, trust_coeff=1e-3, weight_decay=0.0)
    groups = (param_groups_layer_decay(model, args.weight_decay, args.layer_decay) if mode == "finetune"
              else [{"params": params, "weight_decay": args.weight_decay}])
    return build_adamw(groups, lr, betas=(0.9, 0.999), device=device)


@torch.no_grad()
def compute_features(accelerator, encoder: VisionTransformer, samples, normalize: Normalize, batch_size: int):
    """Pooled encoder features (N, D) and labels (N,) of every sample, in order, computed once (in the run's
    mixed precision)."""
    encoder.eval()
    features, labels = [], []
    for start in tqdm(range(0, len(samples), batch_size), desc="features", disable=not accelerator.is_main_process):
        items = samples.__getitems__([(i, 0) for i in range(start, min(start + batch_size, len(samples)))])
        items = [item for item in items if item is not None]
        if not items:
            continue
        images = normalize(torch.stack([item["pixel_values"] for item in items]).to(accelerator.device))
        with accelerator.autocast():
            features.append(encoder.pool(encoder.forward_features(images)).float().cpu())
        labels.append(torch.tensor([item["label"] for item in items]))
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def evaluate(accelerator, model, loader, prepare_inputs) -> dict:
    """Top-1 / top-5 (percent) and loss over the whole validation split, gathered from every process."""
    model.eval()
    all_logits, all_labels = [], []
    for batch in tqdm(loader, desc="evaluate", leave=False, disable=not accelerator.is_main_process):
        if "pixel_values" not in batch:  # only unreadable images (each one is logged)
            continue
        batch = move_to_device(batch, accelerator.device)
        logits = model(prepare_inputs(batch["pixel_values"]))
        logits, labels = accelerator.gather_for_metrics((logits.float(), batch["label"]))
        all_logits.append(logits)
        all_labels.append(labels)
    logits, labels = torch.cat(all_logits), torch.cat(all_labels)
    top1, top5 = topk_accuracy(logits, labels, ks=(1, 5))
    return {"top1": top1, "top5": top5, "val_loss": F.cross_entropy(logits, labels).item()}


class Classification(Task):
    """Cross-entropy on labels (with mixup / CutMix, label smoothing and random erasing when fine-tuning); frozen
    modes train only the head, on cached features unless --no-cache_features; evaluation: top-1 / top-5 (and the
    EMA's with --model_ema)."""

    script, log_train_rows = "finetune_classifier.py", False

    def __init__(self, args, mode: str, config: dict, pretrained_state: dict | None, run_dir: RunDir):
        self.args, self.mode, self.config, self.pretrained_state, self.run_dir = args, mode, config, pretrained_state, run_dir
        self.name, self.best = mode, {"best_top1": 0.0, "best_top5": 0.0}
        self.ema = self.mixup = self.erasing = None

    def build(self, accelerator):
        args, mode = self.args, self.mode
        with accelerator.main_process_first():
            train_base, train_samples = image_samples(args, "train", train=mode == "finetune" or not args.cache_features,
                                                      max_samples=args.max_samples)
            val_base, val_samples = image_samples(args, "val", train=False, max_samples=args.max_val_samples)
        self.class_names = check_classes(args, train_base, val_base)
        self.num_classes = num_classes = len(self.class_names)
        if accelerator.is_main_process and not args.eval_only:
            save_args(args, self.run_dir, num_classes=num_classes)
        self.accelerator = accelerator
        self.normalize = normalize = Normalize(*channel_stats(args.input_channels, args.dataset)).to(accelerator.device)
        model = build_classifier(mode, self.config, self.class_names, args)
        if self.pretrained_state is not None:
            report = load_pretrained(model, self.pretrained_state)
            if accelerator.is_main_process:  # every key: loaded, newly initialised, not used
                self.run_dir.root.mkdir(parents=True, exist_ok=True)
                (self.run_dir.root / "weights_report.json").write_text(json.dumps(vars(report), indent=2))
        if mode in FROZEN_MODES:
            freeze_encoder(model)
        model.to(accelerator.device)
        # Frozen modes with cached features: the head trains on pre-computed features, fast even on a CPU.
        self.cached = mode in FROZEN_MODES and args.cache_features
        if self.cached:
            train_features, train_labels = compute_features(accelerator, model, train_samples, normalize, 256)
            val_features, val_labels = compute_features(accelerator, model, val_samples, normalize, 256)
            train_samples, val_samples = TensorSamples(train_features, train_labels), TensorSamples(val_features, val_labels)
            trained, self.prepare_inputs = model.head, (lambda features: features)
        else:
            trained, self.prepare_inputs = model, normalize
        self.model, self.train_samples = model, train_samples
        sampler = build_step_sampler(train_samples if self.cached else train_base, args.per_gpu_batch_size,
                                     args.gradient_accumulation_steps, accelerator.num_processes,
                                     accelerator.process_index, args.seed, getattr(args, "shard_resume", None))
        chain = EpochChain(sampler)
        loader = None if self.cached else resident_batches(args.data_on_device, train_base, train_samples, chain,
                                                           accelerator.device)
        loader = loader or build_loader(train_samples, chain, args.num_workers, accelerator.device)
        val_sampler = torch.utils.data.BatchSampler([(i, 0) for i in range(len(val_samples))], 256, drop_last=False)
        self.val_loader = accelerator.prepare_data_loader(build_loader(val_samples, val_sampler, args.num_workers,
                                                                       accelerator.device), device_placement=False)
        self.peak_lr = args.learning_rate or scaled_learning_rate(args.base_learning_rate, args.per_gpu_batch_size,
                                                                  accelerator.num_processes)
        optimizer = build_optimizer(mode, trained, model, args, self.peak_lr, accelerator.device)
        if mode == "finetune" and (args.mixup_alpha > 0 or args.cutmix_alpha > 0):
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=args.mixup_alpha, cutmix_alpha=args.cutmix_alpha, prob=args.mixup_prob,
                               switch_prob=args.mixup_switch_prob, label_smoothing=args.label_smoothing,
                               num_classes=num_classes)
        if mode == "finetune" and args.random_erasing > 0:
            from timm.data.random_erasing import RandomErasing

            self.erasing = RandomErasing(probability=args.random_erasing, mode="pixel", device=str(accelerator.device))
        self.label_smoothing = (args.label_smoothing or 0.0) if mode == "finetune" else 0.0
        return trained, optimizer, sampler, loader

    def prepared(self, trained, accelerator) -> None:
        self.trained = trained
        if not self.cached:
            self.model = trained
        if self.args.model_ema:
            self.ema = ModelEma(accelerator.unwrap_model(self.model), self.args.model_ema_decay)
            accelerator.register_for_checkpointing(self.ema)

    def started(self) -> None:
        trainer = self.trainer
        logger.info("%s: %d training samples, %d classes, %d steps/epoch, %d steps, global batch %d, peak lr %.3g%s",
                    self.mode, len(self.train_samples), self.num_classes, trainer.steps_per_epoch,
                    trainer.total_steps, trainer.sampler.global_batch, self.peak_lr,
                    " (cached features)" if self.cached else "")

    def learning_rate(self, step: int, total_steps: int, steps_per_epoch: int) -> float:
        warmup = round(self.args.warmup_epochs * steps_per_epoch)
        return warmup_cosine(step, total_steps, warmup, self.peak_lr, self.args.min_learning_rate)

    def train_mode(self, trained) -> None:
        trained.train()
        if self.mode in FROZEN_MODES and not self.cached:
            plain = self.accelerator.unwrap_model(self.model)
            plain.eval()
            plain.head.train()

    def loss(self, trained, batch: dict, values: dict):
        inputs, labels = self.prepare_inputs(batch["pixel_values"]), batch["label"]
        if self.erasing is not None:
            inputs = self.erasing(inputs)
        targets = labels
        if self.mixup is not None and inputs.shape[0] % 2 == 0:
            inputs, targets = self.mixup(inputs, labels)
        logits = trained(inputs).float()
        if targets.ndim == 2:  # mixed, smoothed targets
            return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean(), {}
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing), {}

    def after_step(self, trained) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.accelerator.unwrap_model(self.model))

    def evaluate(self, trained, step: int) -> dict:
        accelerator = self.accelerator
        broadcast_buffers(accelerator, self.trained)  # the linear probe's BatchNorm statistics: the main process's
        result = evaluate(accelerator, self.trained if self.cached else self.model, self.val_loader,
                          self.prepare_inputs)
        if self.ema is not None:
            ema_result = evaluate(accelerator, self.ema.module.head if self.cached else self.ema.module,
                                  self.val_loader, self.prepare_inputs)
            result.update({f"ema_{k}": v for k, v in ema_result.items()})
        if self.trainer.metrics is not None:  # (an evaluation during training)
            self.best["best_top1"] = max(self.best["best_top1"], result["top1"])
            self.best["best_top5"] = max(self.best["best_top5"], result["top5"])
        return result

    def report(self, row: dict) -> None:
        logger.info("epoch %.2f: train loss %.4f, top-1 %.2f%%, top-5 %.2f%%", row["epoch"], row["train_loss"],
                    row["top1"], row["top5"])

    def state_dict(self) -> dict:
        return dict(self.best)

    def load_state_dict(self, state: dict) -> None:
        self.best.update({key: state[key] for key in self.best if key in state})

    def final_model(self, trained):
        return self.model

    def finish(self, trained, step: int, result: dict) -> None:
        settings = {**vars(self.args), "num_classes": self.num_classes}
        summary = write_results(self.run_dir, settings, result, self.best, self.accelerator)
        push_run(self.accelerator, self.args, self.run_dir.root, "classification", summary or {})


def write_results(run_dir: RunDir, settings: dict, result: dict, state: dict, accelerator) -> dict | None:
    if not accelerator.is_main_process:
        return None
    best_top1 = max(state["best_top1"], result["top1"])
    summary = {"top1": result["top1"], "top5": result["top5"], "best_top1": best_top1,
               "best_top5": max(state.get("best_top5", 0.0), result["top5"]),
               **{k: v for k, v in result.items() if k.startswith("ema_")}, "args": settings}
    (run_dir.root / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    logger.info("results: top-1 %.2f%% (best %.2f%%), top-5 %.2f%%; written to %s", summary["top1"], best_top1,
                summary["top5"], run_dir.root / "results.json")
    return summary
