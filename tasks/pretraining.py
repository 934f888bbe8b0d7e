"""The pretraining task: the MAE objective (pixels or PCA-filtered targets, the optional Laplacian and uniformity
terms, curriculum masking) and reconstruction grids as its evaluation."""
from __future__ import annotations

import json
import logging
import math
from functools import partial
from pathlib import Path

import torch

from engine import Task
from engine.flags import hub_options
from engine.optim import build_adamw, param_groups_weight_decay
from engine.records import MetricsLog
from engine.schedule import scaled_learning_rate, warmup_cosine
from engine.setup import RunDir
from models import MaskedAutoencoder
from models.losses import high_frequency_loss, uniformity_loss
from models.masking import curriculum_ratio, mask_noise
from models.pca import PCABasis, eigenspace_errors, fit_pca, pca_target
from pipeline.datasets import build_image_dataset
from pipeline.device_decode import decodes_on_device
from pipeline.loading import build_loader
from pipeline.resident import resident_batches
from pipeline.samples import SeededSamples, collate_skipping_bad
from pipeline.sampling import EpochChain
from pipeline.shards import build_step_sampler
from pipeline.streaming import HeadDataset, HubStream, StreamEpochs, build_stream_loader, epoch_size, open_stream
from pipeline.transforms import Normalize, RandomResizedCropFlip, ResizeCenterCrop, channel_stats
from utils.errors import UserError
from utils.hub import push_run
from utils.metrics import reconstruction_metrics
from utils.visualize import panels_to_picture, reconstruction_panels, save_picture

logger = logging.getLogger(__name__)


def pca_basis(args, run_dir: RunDir, normalize: Normalize, accelerator) -> PCABasis:
    """The run's PCA: its own pca.safetensors (a resumed run), --pca_path, or fitted now on --pca_samples training
    images (main process, saved with the run, then read by every process)."""
    path = run_dir.root / "pca.safetensors"
    source = path if path.exists() else Path(args.pca_path) if args.pca_path else None
    if source is None:
        if accelerator.is_main_process:
            base = first_images(args, "train", args.pca_samples)
            view = ResizeCenterCrop(args.img_size)
            images = [view(item[0]) for item in (base[i] for i in range(len(base))) if item is not None]
            basis = fit_pca(normalize(torch.stack(images).to(accelerator.device)).cpu(), seed=args.seed)
            run_dir.root.mkdir(parents=True, exist_ok=True)
            basis.save(path)
            logger.info("PCA fitted on %d images: %d components kept for %s at %.0f%% of the variance", len(images),
                        basis.count_for_share(args.pca_variance if args.target == "pca_top" else 1 - args.pca_variance),
                        args.target, 100 * args.pca_variance)
        accelerator.wait_for_everyone()
        source = path
    elif not source.exists():
        raise UserError(f"--pca_path {source} does not exist: pass a run's pca.safetensors")
    basis = PCABasis.load(source)
    expected = (args.input_channels, args.img_size, args.img_size)
    if tuple(basis.shape) != expected:
        raise UserError(f"the PCA in {source} was fitted on {basis.shape} images, this run has {expected}: fit a new "
                        "one (drop --pca_path) or match --img_size / --input_channels")
    return basis.to(accelerator.device)


def extra_loss_terms(args, mae: MaskedAutoencoder, images: torch.Tensor, output) -> dict[str, torch.Tensor]:
    """The optional terms, unweighted: ``hf`` (Laplacian of the reconstruction vs the target's, masked pixels)
    and ``uniformity`` (of the mean visible-token embedding of each image in this process's micro-batch)."""
    terms = {}
    if args.hf_loss_weight > 0:
        target = mae.unpatchify(mae.target(images).float())  # pixels, or per-patch normalised pixels
        terms["hf"] = high_frequency_loss(mae.unpatchify(output.pred.float()), target, mae.pixel_mask(output.mask))
    if args.uniformity_weight > 0:
        terms["uniformity"] = uniformity_loss(output.latent[:, 1:].mean(dim=1), args.uniformity_t)
    return terms


def strategy_noise(args, grid_size: tuple[int, int]):
    """The per-sample mask noise of --mask_strategy (None: uniform noise, the plain MAE). Block masks are laid out
    for the largest ratio of the run: a lower curriculum ratio keeps their first blocks."""
    if args.mask_strategy == "random":
        return None
    ratio = max(args.mask_ratio, args.mask_ratio_start or 0.0)
    return partial(mask_noise, args.mask_strategy, grid_size, ratio)


def first_images(args, split: str, count: int):
    """The first ``count`` images of a split: indexed, or the head of a stream (``--streaming``)."""
    if args.streaming:
        return HeadDataset(args.dataset[3:], split, count, args.input_channels, hub_options(args))
    return build_image_dataset(args.dataset, args.path_to_data, split, args.input_channels, args.img_size, count,
                               hub_options(args))


def build_train_loader(args, num_patches: int, grid_size: tuple[int, int], accelerator):
    """Training loader: each process reads its own slice of every optimizer step (see StepBatchSampler), or its
    own part of a stream (``--streaming``, see pipeline/streaming.py)."""
    if args.streaming:
        options = hub_options(args)
        stream, image_column, label_column = open_stream(args.dataset[3:], "train", options)
        schedule = StreamEpochs(epoch_size(stream, args.max_samples),
                                args.per_gpu_batch_size, args.gradient_accumulation_steps, accelerator.num_processes,
                                accelerator.process_index, args.seed, args.num_workers)
        data = HubStream(stream, image_column, label_column, args.input_channels, schedule,
                         RandomResizedCropFlip(args.img_size), num_patches, strategy_noise(args, grid_size),
                         args.shuffle_buffer)
        return build_stream_loader(data, args.num_workers, accelerator.device), schedule
    base = build_image_dataset(args.dataset, args.path_to_data, "train", args.input_channels, args.img_size,
                               args.max_samples, hub_options(args),
                               encoded_jpeg=decodes_on_device(args.decode, accelerator.device))
    samples = SeededSamples(base, RandomResizedCropFlip(args.img_size), args.seed, num_patches,
                            strategy_noise(args, grid_size))
    sampler = build_step_sampler(base, args.per_gpu_batch_size, args.gradient_accumulation_steps,
                                 accelerator.num_processes, accelerator.process_index, args.seed,
                                 getattr(args, "shard_resume", None))
    chain = EpochChain(sampler)
    loader = resident_batches(args.data_on_device, base, samples, chain, accelerator.device) or \
        build_loader(samples, chain, args.num_workers, accelerator.device)
    return loader, sampler


def fixed_vis_batch(args, num_patches: int, grid_size: tuple[int, int]) -> dict:
    """The same validation images and masks for every picture of the run."""
    base = first_images(args, "val", args.num_vis_images)
    samples = SeededSamples(base, ResizeCenterCrop(args.img_size), args.seed, num_patches,
                            strategy_noise(args, grid_size))
    return collate_skipping_bad([samples[(i, 0)] for i in range(min(args.num_vis_images, len(samples)))])


@torch.no_grad()
def eigenspace_row(model, mae: MaskedAutoencoder, images: torch.Tensor, noise: torch.Tensor, basis: PCABasis,
                   share: float) -> dict:
    was_training = model.training
    model.eval()
    output = model(images, noise=noise)
    model.train(was_training)
    reconstruction = mae.reconstruct(output.pred.float(), images.float())  # normalised space, as the PCA
    top, bottom = eigenspace_errors(reconstruction, images, mae.pixel_mask(output.mask), basis, share)
    return {"val_error_top": top, "val_error_bottom": bottom}


def save_reconstructions(accelerator, model, vis_batch: dict, normalize: Normalize, run_dir: RunDir,
                         metrics: MetricsLog, step: int, epoch: int, log_metrics: bool = True,
                         eigenspace: tuple[PCABasis, float] | None = None) -> Path:
    """Every process runs the forward (FSDP needs all of them); the main one writes and logs the picture and
    the reconstruction metrics (a metrics.jsonl row of its own)."""
    images = normalize(vis_batch["pixel_values"].to(accelerator.device))
    if log_metrics:
        noise = vis_batch["noise"].to(accelerator.device)
        row = {"step": step, **reconstruction_metrics(model, accelerator.unwrap_model(model), images, noise, normalize)}
        if eigenspace is not None:
            row.update(eigenspace_row(model, accelerator.unwrap_model(model), images, noise, *eigenspace))
        metrics.log(row)
    panels = reconstruction_panels(model, accelerator.unwrap_model(model), images,
                                   vis_batch["noise"].to(accelerator.device), normalize.inverse)
    path = run_dir.root / "reconstructions" / f"epoch_{epoch:04d}_step_{step:08d}.png"
    if accelerator.is_main_process:
        picture = panels_to_picture(panels)
        save_picture(picture, path)
        metrics.log_image("reconstructions", picture, step)
    return path


class Pretraining(Task):
    """The MAE objective: masked-patch reconstruction (pixels or a PCA-filtered target), the optional Laplacian and
    uniformity terms, curriculum masking; reconstruction grids as its evaluation."""

    name, script = "pretrain", "pretrain_mae.py"

    def __init__(self, args, config: dict, run_dir: RunDir):
        self.args, self.config, self.run_dir, self.model_config = args, config, run_dir, config
        self.loss_weights = {"hf": args.hf_loss_weight, "uniformity": args.uniformity_weight}
        self.picture = None

    def build(self, accelerator):
        args = self.args
        if args.resume_from_pretrained:
            model = MaskedAutoencoder.from_pretrained(args.resume_from_pretrained, revision=args.revision,
                                                      **self.config)
            logger.info("continuing pretraining from %s", args.resume_from_pretrained)
        else:
            model = MaskedAutoencoder(**self.config)
        with accelerator.main_process_first():  # a Hub data set is downloaded once, then read from the cache
            loader, sampler = build_train_loader(args, model.num_patches, model.grid_size, accelerator)
            self.vis_batch = fixed_vis_batch(args, model.num_patches, model.grid_size)
        self.accelerator = accelerator
        self.normalize = Normalize(*channel_stats(args.input_channels, args.dataset)).to(accelerator.device)
        needs_pca = args.target != "pixels" or args.eigenspace_metrics
        self.pca = pca_basis(args, self.run_dir, self.normalize, accelerator) if needs_pca else None
        self.eigenspace = (self.pca, args.pca_variance) if args.eigenspace_metrics else None
        self.peak_lr = scaled_learning_rate(args.base_learning_rate, args.per_gpu_batch_size, accelerator.num_processes)
        optimizer = build_adamw(param_groups_weight_decay(model, args.weight_decay), self.peak_lr,
                                device=accelerator.device)
        return model, optimizer, sampler, loader

    def prepared(self, model, accelerator) -> None:
        self.plain_mae = accelerator.unwrap_model(model)

    def started(self) -> None:
        trainer, args, accelerator = self.trainer, self.args, self.accelerator
        saved_parts, parts = trainer.state.get("stream_parts"), trainer.sampler.state_dict(0).get("stream_parts")
        if args.streaming and saved_parts and saved_parts != parts:
            logger.warning("resumed with the stream split into %d parts (processes x loader workers) where the "
                           "checkpoint had %d: the parts differ, so the images differ from an uninterrupted "
                           "run's", parts, saved_parts)
        samples = trainer.steps_per_epoch * trainer.sampler.global_batch if args.streaming else \
            len(trainer.loader.dataset)
        logger.info("%d samples, %d steps/epoch, %d steps in all, global batch %d (micro-batch %d x %d accumulation x "
                    "%d processes), peak lr %.3g, %s precision", samples, trainer.steps_per_epoch,
                    trainer.total_steps, trainer.sampler.global_batch, trainer.sampler.micro_batch,
                    args.gradient_accumulation_steps, accelerator.num_processes, self.peak_lr,
                    accelerator.mixed_precision)

    def learning_rate(self, step: int, total_steps: int, steps_per_epoch: int) -> float:
        warmup = round(self.args.warmup_epochs * steps_per_epoch)
        return warmup_cosine(step, total_steps, warmup, self.peak_lr, self.args.min_learning_rate)

    def step_values(self, step: int, steps_per_epoch: int) -> dict:
        args = self.args
        return {"mask_ratio": curriculum_ratio(step, steps_per_epoch, args.mask_ratio, args.mask_ratio_start,
                                               args.mask_curriculum_epochs)}

    def loss(self, model, batch: dict, values: dict):
        args = self.args
        images = self.normalize(batch["pixel_values"])
        targets = pca_target(images, self.pca, args.target, args.pca_variance) if args.target != "pixels" else None
        output = model(images, noise=batch["noise"], mask_ratio=values["mask_ratio"], target_images=targets)
        if not any(weight > 0 for weight in self.loss_weights.values()):
            return output.loss, {}
        terms = extra_loss_terms(args, self.plain_mae, images if targets is None else targets, output)
        loss = output.loss + sum(self.loss_weights[name] * value for name, value in terms.items())
        return loss, {f"loss_{name}": value for name, value in {"pixel": output.loss, **terms}.items()}

    def eval_every(self, steps_per_epoch: int) -> int:
        return self.args.vis_every * steps_per_epoch

    def evaluate(self, model, step: int) -> dict:
        self.picture = save_reconstructions(self.accelerator, model, self.vis_batch, self.normalize, self.run_dir,
                                            self.trainer.metrics, step,
                                            math.ceil(step / self.trainer.steps_per_epoch), eigenspace=self.eigenspace)
        return {}

    def finish(self, model, step: int, result: dict) -> None:
        args, run_dir = self.args, self.run_dir
        logger.info("done: %d steps; weights in %s, reconstructions in %s", step, run_dir.final, self.picture)
        if args.push_to_hub and self.accelerator.is_main_process:
            rows = run_dir.metrics.read_text().splitlines() if run_dir.metrics.exists() else []
            push_run(self.accelerator, args, run_dir.root, "pretraining", json.loads(rows[-1]) if rows else {},
                     self.picture)
