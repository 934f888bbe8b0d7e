"""Pretraining (and fine-tuning) speed and memory, measured side by side.

    --mode model     the scripts' training step with this project's MAE and 🤗 ViTMAEForPreTraining of the same config,
                     alternating rounds on synthetic images on the device: images/s, step time and memory, ratio, MFU.
    --mode finetune  the same for finetune_classifier.py's ViT classifier against timm's VisionTransformer.
    --mode scope     what --compile's scope is worth: our MAE eager, blocks compiled, blocks and regions, whole model.
    --mode data      the input pipeline alone (read, decode, crop + flip, collate, to the device), as pretrain_mae.py.
    --mode both      the pipeline feeding this project's step: whichever is slower is the wall.
    --mode memory    memory against micro-batch, with and without --gradient_checkpointing (peak on a GPU, estimated
                     on a CPU from the tensors autograd saves for the backward pass).

Examples:

    python bench/benchmark_pretrain.py --model mae_vit_base_patch16 --batch_size 256 --precision bf16 --compile
    python bench/benchmark_pretrain.py --mode finetune --model mae_vit_base_patch16 --batch_size 256 --precision bf16
    python bench/benchmark_pretrain.py --mode data --path_to_data /data/imagenet --batch_size 256 --num_workers 16
    python bench/benchmark_pretrain.py --mode memory --model mae_vit_large_patch16 --precision bf16
"""
from __future__ import annotations

import argparse
import ast
import json
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.optim import build_adamw, param_groups_weight_decay  # noqa: E402
from engine.setup import set_gpu_math  # noqa: E402
from engine.step import apply_speed_options  # noqa: E402
from engine.trainer import train_step  # noqa: E402
from models import MAE_PRESETS, MaskedAutoencoder, VisionTransformer, encoder_config, mae_config  # noqa: E402
from models.mae import visible_count  # noqa: E402
from models.vit import Block, PatchEmbed  # noqa: E402
from pipeline.device_decode import decodes_on_device  # noqa: E402

# Dense peak FLOP/s per device and precision (vendor datasheets, without sparsity). fp32 means plain fp32 matmuls
# (--no-tf32, PyTorch's default), tf32 the fp32 rows on TF32 tensor cores (--tf32, the scripts' default on a GPU).
# A CPU has no entry: pass --peak_tflops.
PEAK_TFLOPS = {"H100": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
               "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
               "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}}


def block_flops(tokens: int, dim: int, mlp_ratio: float) -> int:
    """Forward FLOPs of one transformer block on `tokens` tokens (a multiply-add counts 2): qkv, scores,
    attention x values, projection, MLP."""
    hidden = int(dim * mlp_ratio)
    return 2 * tokens * dim * (3 * dim + dim + 2 * hidden) + 4 * tokens * tokens * dim


def mae_flops_per_image(config: dict, mask_ratio: float) -> int:
    """Forward FLOPs of the MAE for one image: patch projection of every patch, encoder on cls + visible patches,
    decoder embedding, decoder on cls + every patch, prediction head. Norms, softmax and the loss are left out."""
    patches = (config["img_size"] // config["patch_size"]) ** 2
    encoder_tokens = 1 + visible_count(patches, mask_ratio)
    decoder_tokens = 1 + patches
    patch_dim = config["patch_size"] ** 2 * config["in_chans"]
    dim, decoder_dim = config["embed_dim"], config["decoder_embed_dim"]
    return (2 * patches * patch_dim * dim
            + config["depth"] * block_flops(encoder_tokens, dim, config["mlp_ratio"])
            + 2 * encoder_tokens * dim * decoder_dim
            + config["decoder_depth"] * block_flops(decoder_tokens, decoder_dim, config["decoder_mlp_ratio"])
            + 2 * decoder_tokens * decoder_dim * patch_dim)


def vit_flops_per_image(config: dict, num_classes: int) -> int:
    """Forward FLOPs of the ViT classifier for one image: patch projection, blocks on cls + every patch, head."""
    patches = (config["img_size"] // config["patch_size"]) ** 2
    dim = config["embed_dim"]
    return (2 * patches * config["patch_size"] ** 2 * config["in_chans"] * dim
            + config["depth"] * block_flops(1 + patches, dim, config["mlp_ratio"]) + 2 * dim * num_classes)


def build_timm_vit(config: dict, num_classes: int, drop_path: float):
    """timm's VisionTransformer as finetune_classifier.py builds ours: cls token, global average pooling + fc_norm,
    the same drop-path schedule and LayerNorm eps (timm's position embedding is learned, ours fixed: one tensor)."""
    from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer

    return TimmVisionTransformer(
        img_size=config["img_size"], patch_size=config["patch_size"], in_chans=config["in_chans"],
        embed_dim=config["embed_dim"], depth=config["depth"], num_heads=config["num_heads"],
        mlp_ratio=config["mlp_ratio"], qkv_bias=True, num_classes=num_classes, global_pool="avg", fc_norm=True,
        drop_path_rate=drop_path, norm_layer=partial(torch.nn.LayerNorm, eps=config.get("layer_norm_eps", 1e-6)))


def build_hf_mae(config: dict):
    """🤗 transformers' ViTMAEForPreTraining with this config (SDPA attention, the same LayerNorm eps)."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    hf_config = ViTMAEConfig(
        hidden_size=config["embed_dim"], num_hidden_layers=config["depth"], num_attention_heads=config["num_heads"],
        intermediate_size=int(config["embed_dim"] * config["mlp_ratio"]), decoder_hidden_size=config["decoder_embed_dim"],
        decoder_num_hidden_layers=config["decoder_depth"], decoder_num_attention_heads=config["decoder_num_heads"],
        decoder_intermediate_size=int(config["decoder_embed_dim"] * config["decoder_mlp_ratio"]),
        image_size=config["img_size"], patch_size=config["patch_size"], num_channels=config["in_chans"],
        mask_ratio=config["mask_ratio"], norm_pix_loss=config["norm_pix_loss"], layer_norm_eps=1e-6, qkv_bias=True)
    return ViTMAEForPreTraining._from_config(hf_config, attn_implementation="sdpa")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())


def peak_flops(args, device: torch.device) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    name = device_name(device) if device.type == "cuda" else ""
    for key, table in PEAK_TFLOPS.items():
        if key in name:
            return table["tf32" if args.precision == "fp32" and args.tf32 else args.precision] * 1e12
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Trainer:
    """One model + AdamW, prepared by the run's Accelerator, stepped by ``engine.train_step``: the scripts' own step
    (autocast, GradScaler under fp16, the guarded optimizer step). ``call(model, *inputs)`` returns the loss."""

    def __init__(self, name: str, model: torch.nn.Module, args, call, scope: str | None = None):
        self.name, self.call, self.accelerator = name, call, args.accelerator
        if scope is not None:  # --mode scope
            apply_speed_options(model, argparse.Namespace(compile=scope in ("blocks", "regions"),
                                                          gradient_checkpointing=args.gradient_checkpointing))
            model.compile_regions = scope == "regions"
            if scope == "whole":
                model.compile()
        elif name == "ours":
            apply_speed_options(model, args)  # exactly what the scripts do with --compile / --gradient_checkpointing
        else:
            if args.gradient_checkpointing and hasattr(model, "set_grad_checkpointing"):  # timm
                model.set_grad_checkpointing(True)
            elif args.gradient_checkpointing:  # 🤗
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if args.compile:
                model.compile()
        device = self.accelerator.device
        optimizer = build_adamw(param_groups_weight_decay(model, 0.05), 1e-4, device=device)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.loss_sum = torch.zeros((), device=device)

    def step(self, *inputs: torch.Tensor) -> None:
        batch = {"pixel_values": inputs[0], "inputs": inputs}
        out, _ = train_step(self.accelerator, self.model, self.optimizer, iter([batch]),
                            lambda model, batch: (self.call(model, *batch["inputs"]), {}), 1, 0.0)
        self.loss_sum += out.loss  # no .item(): no host-device synchronisation inside the step

    def static_bytes(self) -> int:
        """Weights, and AdamW's two moments, resident between steps (gradients are freed after each step)."""
        return sum(p.numel() * p.element_size() * 3 for p in self.model.parameters())


def memory_now(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def mae_inputs(args, config: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic images (B, C, H, W) on the device and the masking noise (B, L): the same masks for every model."""
    images = torch.randn(args.batch_size, config["in_chans"], config["img_size"], config["img_size"], device=device)
    noise = torch.rand(args.batch_size, (config["img_size"] // config["patch_size"]) ** 2, device=device)
    return images, noise


def our_mae_loss(model: MaskedAutoencoder, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return model(images, noise=noise).loss


def run_model_mode(args, device: torch.device, config: dict) -> list[dict]:
    """Our MAE's pretraining step against 🤗's ViTMAEForPreTraining with the same config and masks."""
    torch.manual_seed(0)
    trainers = []
    if args.impl in ("ours", "both"):
        trainers.append(Trainer("ours", MaskedAutoencoder(**config), args, our_mae_loss))
    if args.impl in ("hf", "both"):
        trainers.append(Trainer("hf", build_hf_mae(config), args,
                                lambda model, images, noise: model(pixel_values=images, noise=noise).loss))
    return time_trainers(trainers, mae_inputs(args, config, device), args, device,
                         mae_flops_per_image(config, config["mask_ratio"]), "model", "hf")


COMPILE_SCOPES = ("eager", "blocks", "regions", "whole")


def run_scope_mode(args, device: torch.device, config: dict) -> list[dict]:
    """Our MAE's pretraining step with each of ``COMPILE_SCOPES`` compiled, from the same weights, in alternating
    rounds: what compiling the regions between the blocks (--compile) adds over the blocks alone, and how far it is from
    one whole-model graph (not used: DDP could no longer overlap its all-reduce with each block's backward pass)."""
    trainers = []
    for scope in COMPILE_SCOPES:
        torch.manual_seed(0)
        trainers.append(Trainer(scope, MaskedAutoencoder(**config), args, our_mae_loss, scope=scope))
    rows = time_trainers(trainers, mae_inputs(args, config, device), args, device,
                         mae_flops_per_image(config, config["mask_ratio"]), "scope", "eager")
    return [{**row, "compile": row["impl"] != "eager"} for row in rows]


def run_finetune_mode(args, device: torch.device, config: dict) -> list[dict]:
    """finetune_classifier.py's model (our ViT, global pooling + fc_norm, drop path) against timm's VisionTransformer
    built the same way, the fine-tuning reference most users know; both trained with label smoothing and the same
    AdamW (one weight-decay split, not the script's layer-decay groups: the same work per step)."""
    torch.manual_seed(0)
    encoder = encoder_config(config)

    def call(model, images, labels):
        return F.cross_entropy(model(images), labels, label_smoothing=0.1)

    trainers = []
    if args.impl in ("ours", "both"):
        trainers.append(Trainer("ours", VisionTransformer(**encoder, num_classes=args.num_classes, global_pool=True,
                                                          drop_path_rate=args.drop_path), args, call))
    if args.impl in ("timm", "both"):
        trainers.append(Trainer("timm", build_timm_vit(encoder, args.num_classes, args.drop_path), args, call))
    images = torch.randn(args.batch_size, config["in_chans"], config["img_size"], config["img_size"], device=device)
    labels = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    rows = time_trainers(trainers, (images, labels), args, device, vit_flops_per_image(encoder, args.num_classes),
                         "finetune", "timm")
    return [{**row, "num_classes": args.num_classes, "drop_path": args.drop_path} for row in rows]


def time_trainers(trainers: list, inputs: tuple, args, device: torch.device, flops: int, mode: str,
                  reference: str) -> list[dict]:
    """Warm-up steps, then ``args.rounds`` alternating rounds of ``args.steps`` steps each; a row per trainer with the
    median round, and each other trainer's speed-up over the ``reference`` one."""
    for trainer in trainers:
        for _ in range(args.warmup_steps):
            trainer.step(*inputs)
    sync(device)
    times = {t.name: [] for t in trainers}
    step_memory = {t.name: 0 for t in trainers}
    for round_index in range(args.rounds):
        # The order rotates each round, so drifts in clock or load, and going first, hit every model alike (with two
        # models: each first in every other round).
        first = round_index % len(trainers)
        order = trainers[first:] + trainers[:first]
        for trainer in order:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            before = memory_now(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                trainer.step(*inputs)
            sync(device)
            times[trainer.name].append((time.perf_counter() - start) / args.steps)
            if device.type == "cuda":
                step_memory[trainer.name] = max(step_memory[trainer.name], torch.cuda.max_memory_allocated(device) - before)
    peak = peak_flops(args, device)
    rows = []
    for trainer in trainers:
        step_time = statistics.median(times[trainer.name])
        images_per_sec = args.batch_size / step_time
        rows.append({
            "mode": mode, "impl": trainer.name, "model": args.model, "batch_size": args.batch_size,
            "precision": args.precision, "compile": args.compile, "gradient_checkpointing": args.gradient_checkpointing,
            "tf32": args.tf32 if device.type == "cuda" and args.precision == "fp32" else None,
            "images_per_sec": round(images_per_sec, 1), "step_time_ms": round(step_time * 1000, 2),
            "step_time_spread_ms": round((max(times[trainer.name]) - min(times[trainer.name])) * 1000, 2),
            "gflops_per_image_train": round(3 * flops / 1e9, 3),
            "mfu": round(3 * flops * images_per_sec / peak, 4) if peak else None,
            "peak_tflops_used": peak / 1e12 if peak else None,
            "memory_gib": round((step_memory[trainer.name] + trainer.static_bytes()) / 2**30, 2)
            if device.type == "cuda" else None,
            "finite_loss": bool(torch.isfinite(trainer.loss_sum).item()),
        })
    if reference in times:  # from the unrounded step times (images/s are rounded to 0.1: too coarse for ViT-B on a CPU)
        for row in rows:
            if row["impl"] != reference:
                row[f"speedup_vs_{reference}"] = round(statistics.median(times[reference]) /
                                                       statistics.median(times[row["impl"]]), 3)
    if args.profile:
        profile_steps(trainers, inputs, device, args.profile)
    return rows


def profile_steps(trainers, inputs: tuple, device: torch.device, top: int) -> None:
    """Where a step's time goes: the ``top`` operators by device time (self time, so nothing is counted twice) over
    three steps of each model, with each one's share of the total."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for trainer in trainers:
        with profile(activities=activities) as profiler:
            for _ in range(3):
                trainer.step(*inputs)
            sync(device)
        print(f"== {trainer.name}: top {top} operators by {sort_key}")
        print(profiler.key_averages().table(sort_by=sort_key, row_limit=top))


def training_samples(args, config: dict, decode_on_device: bool):
    """pretrain_mae.py's training samples (same dataset classes and transform)."""
    from pipeline.datasets import build_image_dataset
    from pipeline.samples import SeededSamples
    from pipeline.transforms import RandomResizedCropFlip

    base = build_image_dataset(args.dataset, args.path_to_data, "train", config["in_chans"], config["img_size"],
                               args.max_samples, None, encoded_jpeg=decode_on_device)
    return SeededSamples(base, RandomResizedCropFlip(config["img_size"]), 0,
                         (config["img_size"] // config["patch_size"]) ** 2)


def build_pipeline(args, config: dict, device: torch.device):
    """pretrain_mae.py's training loader (same samples, sampler, epochs chained in one iterator, loader settings)."""
    from engine.setup import default_num_workers
    from pipeline.loading import build_loader
    from pipeline.resident import resident_batches
    from pipeline.sampling import EpochChain
    from pipeline.shards import build_step_sampler

    samples = training_samples(args, config, decodes_on_device(args.decode, device))
    sampler = build_step_sampler(samples.base, args.batch_size, 1, 1, 0, 0)
    workers = args.num_workers if args.num_workers is not None else default_num_workers(device)
    chain = EpochChain(sampler)
    return resident_batches(args.data_on_device, samples.base, samples, chain, device) or \
        build_loader(samples, chain, workers, device)


def decode_paths_difference(args, config: dict, device: torch.device, count: int = 64) -> dict:
    """The same samples' views made by the on-device path and by the CPU path (PIL in the workers): the largest
    and the mean absolute difference, in uint8 levels."""
    from pipeline.loading import move_to_device
    from pipeline.samples import collate_skipping_bad

    views = []
    for on_device in (True, False):
        samples = training_samples(args, config, on_device)
        batch = collate_skipping_bad([samples[(i, 0)] for i in range(min(count, len(samples)))])
        views.append(move_to_device(batch, device, decode=args.decode)["pixel_values"].int())
    difference = (views[0] - views[1]).abs()
    return {"max_abs_diff_vs_cpu_decode": int(difference.max()),
            "mean_abs_diff_vs_cpu_decode": round(difference.float().mean().item(), 4)}


def make_jpegs(folder: Path, count: int, seed: int = 0) -> None:
    """Smooth random colour fields with noise: they compress about like photos (tens of kB at quality 90)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    (folder / "train" / "synthetic").mkdir(parents=True, exist_ok=True)
    for index in range(count):
        coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((500, 375), Image.BICUBIC)
        pixels = np.asarray(image, dtype=np.int16) + rng.integers(-20, 21, (375, 500, 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / "train" / "synthetic" / f"{index:06d}.jpg",
                                                                    quality=90)


def worker_ms_per_image(samples, count: int = 64) -> float:
    """What a loader worker spends on one image (read, decode, crop, flip, mask noise), timed in this process with
    one thread: the loader's images/s per worker, before collating and hand-over."""
    keys = [(index % len(samples), 0) for index in range(count)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a worker
    samples[keys[0]]  # first-call costs (file handles, memory maps)
    start = time.perf_counter()
    for key in keys:
        samples[key]
    elapsed = time.perf_counter() - start
    torch.set_num_threads(threads)
    return round(elapsed / count * 1000, 3)


def run_pipeline_mode(args, device: torch.device, config: dict, with_model: bool) -> list[dict]:
    from pipeline.loading import DeviceBatches
    from pipeline.transforms import Normalize, channel_stats

    if args.make_jpegs:
        if not args.path_to_data:
            raise SystemExit("--make_jpegs needs --path_to_data: the folder to write them to")
        make_jpegs(Path(args.path_to_data), args.make_jpegs)

    loader = build_pipeline(args, config, device)
    normalize = Normalize(*channel_stats(config["in_chans"], args.dataset)).to(device)
    trainer = Trainer("ours", MaskedAutoencoder(**config), args, our_mae_loss) if with_model else None
    seen, start, steps = 0, None, 0
    # The workers fill their prefetch queues during the warm-up; timing starts once those are drained, so the timed
    # window measures the steady rate and not batches made before it began.
    workers = getattr(loader, "num_workers", 0)  # (none for a set held on the device)
    warmup = max(args.warmup_steps, workers * (getattr(loader, "prefetch_factor", 0) or 0))
    batches = DeviceBatches(loader, device, ahead=args.decode_ahead, decode=args.decode)  # uint8 until on the device
    for batch in batches:
        images, noise = normalize(batch["pixel_values"]), batch["noise"]
        if trainer is not None:
            trainer.step(images, noise)
            bool(torch.isfinite(trainer.loss_sum))  # the scripts' one host sync per step (the finite-loss check)
        steps += 1
        if steps == warmup:
            sync(device)
            start = time.perf_counter()
        elif steps > warmup:
            seen += images.shape[0]
        if steps == warmup + args.steps:
            break
    batches.close()
    sync(device)
    elapsed = time.perf_counter() - start
    row = {"mode": "both" if with_model else "data", "impl": "ours" if with_model else "pipeline",
           "model": args.model, "dataset": args.dataset, "path_to_data": args.path_to_data,
           "decode": "none (held on the device)" if not hasattr(loader, "num_workers") else
           "none (pixel cache)" if args.dataset == "cache" else
           ("dali" if args.decode == "dali" else "device") if decodes_on_device(args.decode, device)
           and args.dataset in ("folder", "shards") else "cpu",
           "batch_size": args.batch_size, "num_workers": workers, "data_on_device": not hasattr(loader, "num_workers"),
           "precision": args.precision,
           "compile": args.compile, "decode_ahead": args.decode_ahead, "images_per_sec": round(seen / elapsed, 1),
           "step_time_ms": round(elapsed / args.steps * 1000, 2),
           "batches_per_epoch": loader.batch_sampler.sampler.steps_per_epoch, "epochs_chained": True,
           "warmup_steps": warmup}
    if not with_model and not row["data_on_device"]:
        row["worker_ms_per_image"] = worker_ms_per_image(loader.dataset)
    if row["decode"] in ("device", "dali") and not with_model:
        row.update(decode_paths_difference(args, config, device))
    return [row]


def saved_bytes_per_block(model: MaskedAutoencoder, images: torch.Tensor, noise: torch.Tensor, dtype) -> tuple[int, list[int]]:
    """Bytes autograd saves for the backward pass: in total, and inside each transformer block."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    current = {"block": None}
    per_block = [0] * len(blocks)
    total = [0]
    seen = set()

    def pack(tensor):
        key = (tensor.untyped_storage().data_ptr(), tensor.dtype)
        if key not in seen:  # a storage saved twice (e.g. by two ops) is held once
            seen.add(key)
            size = tensor.untyped_storage().nbytes()
            total[0] += size
            if current["block"] is not None:
                per_block[current["block"]] += size
        return tensor

    handles = []
    for index, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(lambda module, inputs, i=index: current.update(block=i)))
        handles.append(block.register_forward_hook(lambda module, inputs, output: current.update(block=None)))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
            model(images, noise=noise)
    for handle in handles:
        handle.remove()
    return total[0], per_block


def run_memory_mode(args, device: torch.device, config: dict) -> list[dict]:
    rows = []
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    model = MaskedAutoencoder(**config).to(device)
    static = sum(p.numel() * p.element_size() for p in model.parameters()) * 4  # weights, grads, AdamW moments
    patches = (config["img_size"] // config["patch_size"]) ** 2
    batches = args.memory_batches or [32, 64, 128, 256, 512]
    if device.type != "cuda":  # estimate: saved activations of a small probe batch, scaled per image
        probe = 4
        images = torch.randn(probe, config["in_chans"], config["img_size"], config["img_size"])
        total, per_block = saved_bytes_per_block(model, images, torch.rand(probe, patches), dtype)
        block_inputs = sum(tokens * dim * 4 for tokens, dim in block_token_dims(config)) * probe  # fp32 residual stream
        checkpointed = total - sum(per_block) + block_inputs + max(per_block)
        for batch in batches:
            for ckpt, saved in ((False, total), (True, checkpointed)):
                rows.append({"mode": "memory", "model": args.model, "precision": args.precision, "micro_batch": batch,
                             "gradient_checkpointing": ckpt, "memory_gib": round((static + saved * batch / probe) / 2**30, 2),
                             "kind": "estimate: weights+grads+AdamW (16 B/param) + saved activations (CPU autograd)"})
        return rows
    trainer_args = argparse.Namespace(**{**vars(args), "compile": False})
    for ckpt in (False, True):
        trainer_args.gradient_checkpointing = ckpt
        trainer = Trainer("ours", MaskedAutoencoder(**config), trainer_args, our_mae_loss)
        for batch in batches:
            images = torch.randn(batch, config["in_chans"], config["img_size"], config["img_size"], device=device)
            noise = torch.rand(batch, patches, device=device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            try:
                trainer.step(images, noise)
                trainer.step(images, noise)  # the second step has AdamW's moments allocated
                sync(device)
                peak = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            except torch.cuda.OutOfMemoryError:
                peak = "OOM"
            rows.append({"mode": "memory", "model": args.model, "precision": args.precision, "micro_batch": batch,
                         "gradient_checkpointing": ckpt, "memory_gib": peak, "kind": "measured peak allocated"})
            del images, noise
        del trainer
        args.accelerator.free_memory()  # (it holds what it prepared)
    return rows


def block_token_dims(config: dict) -> list[tuple[int, int]]:
    patches = (config["img_size"] // config["patch_size"]) ** 2
    encoder = [(1 + int(patches * (1 - config["mask_ratio"])), config["embed_dim"])] * config["depth"]
    return encoder + [(1 + patches, config["decoder_embed_dim"])] * config["decoder_depth"]


def run_optimizer_mode(args, device: torch.device, config: dict) -> list[dict]:
    """AdamW's step over the model's parameters (random gradients, the scripts' two weight-decay groups): the fused
    kernel that build_adamw picks and the default implementation, in alternating rounds; the median round."""
    model = MaskedAutoencoder(**config).to(device)
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    optimizers = {"fused": build_adamw(param_groups_weight_decay(model, 0.05), 1e-4, device=device),
                  "default": torch.optim.AdamW(param_groups_weight_decay(model, 0.05), lr=1e-4, betas=(0.9, 0.95))}
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for optimizer in optimizers.values():
        for _ in range(args.warmup_steps):
            optimizer.step()
    for _ in range(args.rounds):
        for name, optimizer in optimizers.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                optimizer.step()
            sync(device)
            times[name].append((time.perf_counter() - start) / args.steps * 1000)
    parameters = sum(param.numel() for param in model.parameters())
    return [{"mode": "optimizer", "impl": name, "model": args.model, "parameters": parameters,
             "fused": bool(optimizer.param_groups[0].get("fused")),
             "step_time_ms": round(statistics.median(times[name]), 2),
             "step_time_spread_ms": round(max(times[name]) - min(times[name]), 2)}
            for name, optimizer in optimizers.items()]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="model", choices=["model", "finetune", "scope", "data", "both", "memory", "optimizer"],
                        help="What to time (model: the pretraining step against 🤗; finetune: the fine-tuning step "
                             "against timm; scope: our pretraining step eager, with its blocks, blocks and regions, or "
                             "whole model compiled; optimizer: AdamW's step alone, fused against the default).")
    parser.add_argument("--model", default="mae_vit_tiny_patch4", choices=sorted(MAE_PRESETS), help="Preset to time.")
    parser.add_argument("--impl", default="both", choices=["ours", "hf", "timm", "both"],
                        help="This project's model, the reference (--mode model: 🤗 ViTMAEForPreTraining, hf; "
                             "--mode finetune: timm's VisionTransformer, timm), or both in alternating rounds.")
    parser.add_argument("--num_classes", type=int, default=1000, help="--mode finetune: classes of the head.")
    parser.add_argument("--drop_path", type=float, default=0.1,
                        help="--mode finetune: stochastic depth rate (finetune_classifier.py's default).")
    parser.add_argument("--batch_size", type=int, default=128, help="Images per step (one micro-batch).")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="Autocast dtype.")
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                        help="fp32 matrix products on TF32 tensor cores on a GPU, as the scripts' --tf32 (no effect on a CPU).")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile: ours by regions as --compile does, 🤗's whole model.")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="Recompute block activations in backward.")
    parser.add_argument("--patch_embed", default="conv", choices=["conv", "linear"],
                        help="Our patch embedding as the strided convolution, or as one matmul on the unfolded patches.")
    parser.add_argument("--inductor", nargs="+", default=[], metavar="KEY=VALUE",
                        help="torch._inductor.config settings for --compile, e.g. max_autotune=True.")
    parser.add_argument("--residual_dtype", default="fp32", choices=["fp32", "autocast"],
                        help="Our blocks' residual stream in fp32 (as trained), or in the autocast dtype (bf16/fp16).")
    parser.add_argument("--sdpa_backend", default="default", choices=["default", "cudnn", "flash", "efficient"],
                        help="Leave only this fused attention kernel (and the math fallback) to every model's SDPA.")
    parser.add_argument("--norm_pix_loss", action="store_true", help="Time with the per-patch normalised target.")
    parser.add_argument("--mask_ratio", type=float, default=0.75, help="Share of patches hidden from the encoder.")
    parser.add_argument("--steps", type=int, default=10, help="Timed steps per round.")
    parser.add_argument("--rounds", type=int, default=3, help="Alternating rounds; the median round is reported.")
    parser.add_argument("--warmup_steps", type=int, default=3,
                        help="Untimed steps first (compilation; --mode data/both: at least the workers' prefetched batches).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda.")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="Device peak for the MFU (default: the datasheet value for H100/H200/A100; none on a CPU).")
    parser.add_argument("--dataset", default=None, help="--mode data/both: as pretrain_mae.py's --dataset "
                                                        "(default: shards, cache or folder with --path_to_data, "
                                                        "else fashion_mnist).")
    parser.add_argument("--path_to_data", default=None, help="--mode data/both: an image folder (train/ inside), tar "
                                                             "shards or a pixel cache (make_pixel_cache.py).")
    parser.add_argument("--max_samples", type=int, default=None, help="--mode data/both: first N training images.")
    parser.add_argument("--num_workers", type=int, default=None,
                        help="--mode data/both: loader workers (default: pretrain_mae.py's, cores - 1 on a GPU).")
    parser.add_argument("--decode", default="auto", choices=["auto", "cpu", "device", "dali"],
                        help="--mode data/both: where a folder's JPEGs are decoded, as pretrain_mae.py's --decode "
                             "(auto: on the device when it is a GPU).")
    parser.add_argument("--data_on_device", default="auto", choices=["auto", "on", "off"],
                        help="--mode data/both: hold the set on the device and make the views there, as "
                             "pretrain_mae.py's flag.")
    parser.add_argument("--decode_ahead", action="store_true",
                        help="--mode data/both: as pretrain_mae.py's --decode_ahead (decode the next batch in a thread, "
                             "on a CUDA stream of its own, while the step trains).")
    parser.add_argument("--make_jpegs", type=int, default=0,
                        help="--mode data/both: first write this many synthetic 500x375 JPEGs (ImageNet's typical size, "
                             "quality 90) under --path_to_data/train/ (where no real image folder is at hand).")
    parser.add_argument("--memory_batches", type=int, nargs="+", default=None,
                        help="--mode memory: micro-batches to measure (default 32 64 128 256 512).")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="--mode model/finetune/scope: after timing, print the N operators that take the most device time "
                             "(torch.profiler, three steps per model; 0: no profile).")
    parser.add_argument("--output", default=None, help="Also append each result row as a JSON line to this file.")
    args = parser.parse_args(argv)
    from engine.flags import default_dataset

    args.dataset = default_dataset(args)
    if args.mode == "scope" and (args.compile or args.impl != "both"):
        parser.error("--mode scope times our model in every compile scope itself: drop --compile and --impl")
    if (args.impl == "hf" and args.mode != "model") or (args.impl == "timm" and args.mode != "finetune"):
        parser.error(f"--impl {args.impl} is the reference of --mode {'model' if args.impl == 'hf' else 'finetune'}: "
                     f"with --mode {args.mode} pass --impl ours or both")
    if args.mode in ("data", "both") and args.warmup_steps < 1:
        parser.error("--mode data/both times from the end of the warm-up: --warmup_steps must be at least 1")
    return args


def linear_patch_embed(self, images: torch.Tensor) -> torch.Tensor:
    """PatchEmbed's convolution (kernel = stride = patch) as one matmul on the unfolded patches, same weights."""
    batch, chans, height, width = images.shape
    p = self.patch_size
    patches = images.reshape(batch, chans, height // p, p, width // p, p).permute(0, 2, 4, 1, 3, 5)
    weight = self.proj.weight.reshape(self.proj.out_channels, -1)
    return F.linear(patches.reshape(batch, (height // p) * (width // p), -1), weight, self.proj.bias)


def low_precision_residual_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Block.forward with the residual stream in the autocast dtype: half the bytes in every residual add and in the
    norms' saved inputs (the norms still compute in fp32 under autocast)."""
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    x = x + self.drop_path(self.attn(self.norm1(x)))
    return x + self.drop_path(self.mlp(self.norm2(x)))


def apply_variants(args) -> None:
    """The step variants under test: --patch_embed linear, --inductor KEY=VALUE settings, --sdpa_backend,
    --residual_dtype."""
    if args.residual_dtype == "autocast":
        Block.forward = low_precision_residual_forward
    if args.sdpa_backend != "default":
        for backend in ("cudnn", "flash", "efficient"):
            getattr(torch.backends.cuda, f"enable_{backend.replace('efficient', 'mem_efficient')}_sdp")(
                backend == args.sdpa_backend)
    if args.patch_embed == "linear":
        PatchEmbed.forward = linear_patch_embed
    for setting in args.inductor:
        key, _, value = setting.partition("=")
        import torch._inductor.config as inductor_config

        setattr(inductor_config, key, ast.literal_eval(value))


def build_accelerator(args):
    """The process's Accelerator with --precision (a fresh one: main() may run several times in one process)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return Accelerator(cpu=args.device == "cpu", mixed_precision={"fp32": "no"}.get(args.precision, args.precision))


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    args.accelerator = build_accelerator(args)
    set_gpu_math(device, args.tf32)  # as the scripts set it
    apply_variants(args)
    config = mae_config(args.model, norm_pix_loss=args.norm_pix_loss, mask_ratio=args.mask_ratio)
    if args.mode in ("data", "both") and args.dataset == "fashion_mnist":
        config["in_chans"] = 1
    if args.mode == "model":
        rows = run_model_mode(args, device, config)
    elif args.mode == "finetune":
        rows = run_finetune_mode(args, device, config)
    elif args.mode == "scope":
        rows = run_scope_mode(args, device, config)
    elif args.mode == "memory":
        rows = run_memory_mode(args, device, config)
    elif args.mode == "optimizer":
        rows = run_optimizer_mode(args, device, config)
    else:
        rows = run_pipeline_mode(args, device, config, with_model=args.mode == "both")
    import transformers

    context = {"device": str(device), "device_name": device_name(device), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "transformers": transformers.__version__,
               "command": "python " + " ".join(sys.argv)}
    if args.patch_embed != "conv" or args.inductor or args.sdpa_backend != "default" or args.residual_dtype != "fp32":
        context.update(patch_embed=args.patch_embed, inductor=" ".join(args.inductor), sdpa_backend=args.sdpa_backend,
                       residual_dtype=args.residual_dtype)
    if args.mode == "finetune":
        import timm

        context["timm"] = timm.__version__
    for row in rows:
        row.update(context)
    emit_rows(rows, args.output)
    return rows


def emit_rows(rows: list[dict], output: str | None) -> None:
    """Print result rows as JSON lines and append them to ``output`` (--output) if given."""
    for row in rows:
        print(json.dumps(row))
    if output:
        with open(output, "a") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
