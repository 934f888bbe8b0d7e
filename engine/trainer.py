"""The one training loop of the three scripts. A script builds a :class:`Task` (its model, data, loss and evaluation)
and hands it to :class:`Trainer`, which owns everything else: ``accelerator.prepare``, the learning-rate schedule,
gradient accumulation, the guarded optimizer step, loss averages and throughput, logging, evaluation and checkpoint
cadence, resume, preemption, the final weights and the Hub push."""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields

import torch
from tqdm.auto import tqdm

from pipeline.loading import DeviceBatches
from utils.errors import UserError
from utils.visualize import save_curves

from .checkpoint import agreed_checkpoint, resume_from, save_checkpoint
from .preemption import StopSignal
from .records import MetricsLog, Throughput, save_final_weights
from .schedule import set_learning_rate
from .setup import RunDir
from .step import BadStepGuard, StepAverages, apply_speed_options, guarded_optimizer_step, readable_batch, sync_context

logger = logging.getLogger(__name__)


class Task:
    """What a script supplies. ``build`` returns (module to train, optimizer, step sampler, loader); ``loss`` returns
    one micro-batch's loss and the terms to average and log; ``evaluate`` returns the metrics of an evaluation."""

    name = "train"  # the progress bar's label
    script = "train.py"  # named in the message of a run stopped by non-finite losses
    log_train_rows = True  # a metrics row every --log_every steps; else one row per evaluation, with the train loss
    model_config: dict | None = None  # written as config.json beside each checkpoint's weights

    def build(self, accelerator):
        raise NotImplementedError

    def prepared(self, model, accelerator) -> None:
        """The module as ``accelerator.prepare`` returned it, before a resume (register extra state to checkpoint)."""

    def started(self) -> None:
        """After a resume, before the first step: say what the run is (``self.trainer`` has the step counts)."""

    def learning_rate(self, step: int, total_steps: int, steps_per_epoch: int) -> float:
        raise NotImplementedError

    def step_values(self, step: int, steps_per_epoch: int) -> dict:
        """Values this optimizer step uses (e.g. a curriculum's mask ratio), logged with its row."""
        return {}

    def check_batch(self, batch: dict) -> None:
        """Validate a loader batch on the host, before it moves to the device (a one-line error, no sync)."""

    def loss(self, model, batch: dict, values: dict) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def batch_images(self, batch: dict) -> int:
        return images_in(batch)

    def after_step(self, model) -> None:
        """After every optimizer step, a skipped one included (an EMA update)."""

    def train_mode(self, model) -> None:
        model.train()

    def eval_every(self, steps_per_epoch: int) -> int:
        """Steps between evaluations (0: only at the end of the run)."""
        return steps_per_epoch

    def evaluate(self, model, step: int) -> dict:
        return {}

    def report(self, row: dict) -> None:
        """Log an evaluation row's line."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def final_model(self, model):
        """The module whose weights are saved as the run's final weights."""
        return model

    def finish(self, model, step: int, result: dict) -> None:
        """After the final weights are written: results files, pictures, the Hub push."""


def images_in(batch: dict) -> int:
    return batch["pixel_values"].shape[0]


@dataclass(frozen=True)
class TrainConfig:
    """The loop's settings (the shared flags of engine/flags.py), checked once when made and never changed."""

    epochs: int | None = None
    max_train_steps: int | None = None  # wins over epochs
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 0.0  # 0: no clipping
    log_every: int = 10
    checkpointing_steps: int | None = None
    save_checkpoint_interval: int = 1  # epochs
    keep_checkpoints: int = 2  # 0: all
    max_bad_steps: int = 20
    resume_from_checkpoint: str | None = None  # a step_* folder, latest or auto
    eval_only: bool = False
    decode: str = "auto"  # where JPEGs left encoded by the loader are decoded: dali, else decode_jpeg
    decode_ahead: bool = False
    compile: bool = False
    gradient_checkpointing: bool = False

    def __post_init__(self):
        if not (self.epochs or self.max_train_steps):
            raise UserError("the run has no length: pass --epochs or --max_train_steps")
        for name in ("gradient_accumulation_steps", "log_every", "save_checkpoint_interval", "max_bad_steps"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name} must be positive, got {getattr(self, name)}")

    @classmethod
    def from_args(cls, args) -> "TrainConfig":
        """The loop's settings out of a script's parsed (and resolved) flags."""
        return cls(**{field.name: getattr(args, field.name) for field in fields(cls) if hasattr(args, field.name)})


@dataclass
class StepOutput:
    loss: torch.Tensor  # the step's loss, averaged over micro-batches and processes (on the device)
    terms: dict  # this process's loss terms, averaged over its micro-batches
    skipped: torch.Tensor  # True where the loss or the gradients were not finite: the update was not applied
    grad_norm: torch.Tensor
    images: int  # images this process trained on
    unreadable: torch.Tensor | int  # images of this step's batches that could not be read


def train_step(accelerator, model, optimizer, micro_batches, loss_fn, accumulation: int, max_grad_norm: float,
               last_batch: dict | None = None, count_images=images_in):
    """One optimizer step as every script takes it (and the benchmark times it): ``accumulation`` micro-batches, the
    gradient all-reduced on the last one only, ``loss_fn(model, batch) -> (loss, terms)``, then the guarded optimizer
    step (clipping, a non-finite step skipped on the device). Returns the step's output and its last readable batch."""
    step_loss, step_terms, images, unreadable = torch.zeros((), device=accelerator.device), {}, 0, 0
    for micro in range(accumulation):
        batch = next(micro_batches)  # on the device
        unreadable = unreadable + batch.get("num_skipped", 0)
        batch, weight = readable_batch(batch, last_batch)  # (all unreadable: the last batch again, at weight 0)
        last_batch = batch
        with sync_context(accelerator, model, micro, accumulation):
            loss, terms = loss_fn(model, batch)
            loss = loss * weight
            accelerator.backward(loss / accumulation)
        step_loss += loss.detach() / accumulation
        for name, value in terms.items():
            step_terms[name] = step_terms.get(name, 0.0) + value.detach() / accumulation
        images += count_images(batch)
    # (nothing read back to the host: skipped steps are counted on the device)
    skipped, grad_norm, step_loss = guarded_optimizer_step(accelerator, model, optimizer, step_loss, max_grad_norm)
    return StepOutput(step_loss, step_terms, skipped, grad_norm, images, unreadable), last_batch


class Trainer:
    def __init__(self, config: TrainConfig, accelerator, run_dir: RunDir, task: Task):
        self.config, self.accelerator, self.run_dir, self.task = config, accelerator, run_dir, task
        task.trainer = self
        self.metrics: MetricsLog | None = None

    def prepare(self):
        """Build the task's parts and prepare them; resume from --resume_from_checkpoint. Returns the trainer state."""
        config, accelerator, task = self.config, self.accelerator, self.task
        model, optimizer, sampler, loader = task.build(accelerator)
        apply_speed_options(model, config)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.sampler, self.loader = sampler, loader
        self.steps_per_epoch = sampler.steps_per_epoch
        self.total_steps = config.max_train_steps or config.epochs * self.steps_per_epoch
        task.prepared(self.model, accelerator)
        state = {"step": 0, "steps_per_epoch": self.steps_per_epoch, "global_batch": sampler.global_batch,
                 "num_processes": accelerator.num_processes, "loss_sum": 0.0, "loss_steps": 0, "term_sums": {},
                 "skipped_images": 0, "bad_steps_in_a_row": 0}
        resume = config.resume_from_checkpoint
        checkpoint = agreed_checkpoint(accelerator, resume, self.run_dir.checkpoints)
        if checkpoint is not None:
            state.update(resume_from(accelerator, checkpoint, self.run_dir.checkpoints, self.steps_per_epoch,
                                     sampler.global_batch, set_aside=not config.eval_only))
            for old, new in (("log_loss_sum", "loss_sum"), ("log_steps", "loss_steps"), ("log_term_sums", "term_sums")):
                if old in state:  # (checkpoints written before the loop was shared)
                    state[new] = state.pop(old)
            logger.info("resumed from %s at step %d (epoch %d)", checkpoint, state["step"],
                        state["step"] // self.steps_per_epoch)
        elif resume in ("latest", "auto"):
            logger.info("no checkpoint under %s yet: starting fresh", self.run_dir.checkpoints)
        task.load_state_dict(state.get("task", state))
        self.state = state
        task.started()
        return state

    def evaluate_only(self) -> dict:
        """Evaluate the prepared model (the checkpoint's, with --resume_from_checkpoint) without training."""
        self.prepare()
        return self.task.evaluate(self.model, self.state["step"])

    def fit(self) -> None:
        config, accelerator, task, run_dir = self.config, self.accelerator, self.task, self.run_dir
        state = self.prepare()
        model, optimizer, sampler = self.model, self.optimizer, self.sampler
        steps_per_epoch, total_steps = self.steps_per_epoch, self.total_steps
        step = state["step"]
        if accelerator.is_main_process:
            run_dir.root.mkdir(parents=True, exist_ok=True)
        self.metrics = MetricsLog(accelerator, run_dir.metrics, resume_step=step)
        eval_every = task.eval_every(steps_per_epoch)
        accumulation, processes = config.gradient_accumulation_steps, accelerator.num_processes
        guard = BadStepGuard(config.max_bad_steps, task.script, run_dir.checkpoints, accelerator.device,
                             state["bad_steps_in_a_row"])
        averages = StepAverages(accelerator.device, state["loss_sum"], state["loss_steps"], state["term_sums"])
        throughput = Throughput()
        skipped_images, skipped_pending = state["skipped_images"], torch.zeros((), device=accelerator.device)
        last_saved, last_evaluated, last_batch, result, lr = step, None, None, {}, 0.0

        def count_skipped() -> int:
            """Unreadable images so far, over all processes (a collective: every process calls it)."""
            nonlocal skipped_images
            skipped_images += int(accelerator.reduce(skipped_pending, reduction="sum"))
            skipped_pending.zero_()
            return skipped_images

        def checkpoint_now() -> None:
            nonlocal last_saved
            guard.check(step)
            count_skipped()
            state.update(step=step, **averages.state(), bad_steps_in_a_row=guard.in_a_row,
                         skipped_images=skipped_images, task=task.state_dict(), **sampler.state_dict(step))
            save_checkpoint(accelerator, run_dir.checkpoints, step, state, config.keep_checkpoints, task.model_config)
            last_saved = step

        def evaluate_now() -> dict:
            nonlocal last_evaluated, throughput
            images_per_sec = None if task.log_train_rows else round(throughput.rate(), 2)  # (before evaluating)
            values = task.evaluate(model, step)
            last_evaluated = step
            if values and not task.log_train_rows:
                row = {"step": step, "epoch": round(step / steps_per_epoch, 4),
                       "train_loss": averages.read()[1]["loss"], "lr": lr, "images_per_sec": images_per_sec, **values}
                self.metrics.log(row)
                task.report(row)
                averages.reset()
                throughput = Throughput()  # the next interval's rate starts after this evaluation
            task.train_mode(model)
            return values

        stop, stopping = StopSignal(), False
        progress = tqdm(total=total_steps, initial=step, disable=not accelerator.is_main_process, desc=task.name)
        for holder in (self.loader.batch_sampler, self.loader.dataset):  # EpochChain, or a stream: one iterator for
            if hasattr(holder, "first_step"):  # the rest of the run, from this step on
                holder.first_step = step
        batches = DeviceBatches(self.loader, accelerator.device, ahead=config.decode_ahead,
                                check=task.check_batch, decode=config.decode)
        micro_batches = iter(batches) if step < total_steps else None  # (no workers for a finished run)
        task.train_mode(model)
        with progress:  # closed before an error is printed, so the error stays the last line
            while step < total_steps and not stopping:
                lr = task.learning_rate(step, total_steps, steps_per_epoch)
                set_learning_rate(optimizer, lr)
                values = task.step_values(step, steps_per_epoch)
                out, last_batch = train_step(accelerator, model, optimizer, micro_batches,
                                             lambda model, batch: task.loss(model, batch, values), accumulation,
                                             config.max_grad_norm, last_batch, task.batch_images)
                skipped_pending += out.unreadable
                throughput.add(out.images * processes)
                skipped, grad_norm, step_loss, step_terms = out.skipped, out.grad_norm, out.loss, out.terms
                step += 1
                progress.update(1)
                guard.update(skipped)
                averages.add({"loss": step_loss, **step_terms}, skipped)  # (terms: this process's; loss: the mean)
                task.after_step(model)
                # A skipped step (its update not applied) gets no row and no scheduled checkpoint.
                if (step % config.log_every == 0 or (task.log_train_rows and step == total_steps)) and not guard.check(step):
                    if task.log_train_rows:
                        row = {"step": step, "epoch": round(step / steps_per_epoch, 4), **averages.read()[1], "lr": lr,
                               **values, "grad_norm": float(grad_norm), "images_per_sec": round(throughput.rate(), 2),
                               "skipped_images": count_skipped()}
                        self.metrics.log(row)
                        averages.reset()
                        progress.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}",
                                             img_s=f"{row['images_per_sec']:.0f}")
                    else:
                        progress.set_postfix(loss=f"{averages.read()[1]['loss']:.4f}", lr=f"{lr:.2e}")
                if (eval_every and step % eval_every == 0) or step == total_steps:
                    result = evaluate_now() or result
                epoch_end = step % steps_per_epoch == 0 and (step // steps_per_epoch) % config.save_checkpoint_interval == 0
                every_n = config.checkpointing_steps and step % config.checkpointing_steps == 0
                # The last step and epoch ends always checkpoint (a skipped step's weights are the last applied
                # step's); the every-N-steps checkpoints skip a skipped step.
                if step == total_steps or epoch_end or (every_n and not guard.check(step)):
                    checkpoint_now()
                if stop.requested(accelerator):
                    stopping = True
        batches.close()
        if stopping and step < total_steps:
            if last_saved != step:
                checkpoint_now()
            stop.exit_preempted(step, total_steps, run_dir.checkpoints)
        if last_evaluated != step:  # resumed at the end: nothing trained, evaluate what was loaded
            result = task.evaluate(model, step) or result
        save_final_weights(accelerator, task.final_model(model), run_dir.final)
        task.finish(model, step, result)
        if accelerator.is_main_process:
            save_curves(run_dir.metrics, run_dir.root / "curves.png")
        if skipped_images:
            logger.warning("%d unreadable images were skipped", skipped_images)
