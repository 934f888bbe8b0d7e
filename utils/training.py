"""The pieces of a training step that every script shares: loader, accumulation, the guarded optimizer step."""
from __future__ import annotations

import atexit
import logging
import os
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .data import collate_skipping_bad
from .errors import UserError

logger = logging.getLogger(__name__)


def build_loader(samples, batch_sampler, num_workers: int, device: torch.device) -> DataLoader:
    """A loader over ``(index, epoch)`` keys. Its private generator keeps the global RNG untouched, so a run
    resumed from a checkpoint (which restores the global RNG) draws the same mixup/erasing as one never stopped."""
    return WorkerLoader(samples, batch_sampler=batch_sampler, num_workers=num_workers, collate_fn=collate_skipping_bad,
                        pin_memory=device.type == "cuda", persistent_workers=num_workers > 0,
                        generator=torch.Generator().manual_seed(0), worker_init_fn=ignore_stop_signals)


class WorkerLoader(DataLoader):
    """A DataLoader whose worker processes are killed at exit if they are still running (their iterator is held by an
    exception's traceback, or was dropped while a worker was busy): they ignore SIGTERM (see ignore_stop_signals), so
    multiprocessing's own clean-up, SIGTERM then join, would wait for them forever."""

    def _get_iterator(self):
        iterator = super()._get_iterator()
        workers = list(getattr(iterator, "_workers", []))
        if workers:  # (registered after multiprocessing's clean-up, so it runs first)
            atexit.register(kill_workers_left, workers, os.getpid())
        return iterator


def kill_workers_left(workers: list, parent_pid: int) -> None:
    left = [worker for worker in workers if os.getpid() == parent_pid and worker.is_alive()]
    if left and hasattr(signal, "SIGCHLD"):  # torch's SIGCHLD handler would report each kill as a worker failure
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for worker in left:
        worker.kill()


STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1", "SIGINT") if hasattr(signal, name))
EXIT_PREEMPTED = 75  # EX_TEMPFAIL ("try again"): stopped by a signal after writing a checkpoint; requeue the job
PREEMPTED_MARKER = "PREEMPTED"  # written into checkpoints/ by such a stop (holds the step)


def ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave stop signals to the main process, which checkpoints and then shuts them down."""
    for stop in STOP_SIGNALS:
        signal.signal(stop, signal.SIG_IGN)


class StopSignal:
    """SIGTERM / SIGUSR1 (what SLURM and most schedulers send before a kill) and SIGINT (Ctrl-C) ask the run to
    stop after the current optimizer step, with a checkpoint; a second signal (more than 2 s later) exits at once."""

    REPEAT_WINDOW_S = 2.0  # a scheduler and the launcher (torchrun forwards SIGTERM) often deliver the same stop twice

    def __init__(self):
        self.received: int | None = None
        self.received_at = 0.0
        for stop in STOP_SIGNALS:
            signal.signal(stop, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            if time.monotonic() - self.received_at > self.REPEAT_WINDOW_S:
                os._exit(128 + signum)
            return
        self.received, self.received_at = signum, time.monotonic()
        logger.warning("%s received: stopping after this optimizer step with a checkpoint (send it again to exit "
                       "at once)", signal.Signals(signum).name)

    def requested(self, accelerator) -> bool:
        """Whether any process got a stop signal. Every process must call it at the same step (a collective)."""
        if accelerator.num_processes == 1:
            return self.received is not None
        flag = torch.tensor(float(self.received is not None), device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum") > 0)

    def exit_preempted(self, step: int, total_steps: int, checkpoint_dir) -> None:
        """After the stop's checkpoint is written: leave the PREEMPTED marker, say how to continue and exit with
        EXIT_PREEMPTED. Job scripts requeue on the marker: multi-process launchers (torchrun, accelerate launch)
        report a worker's exit code 75 as 1."""
        cause = signal.Signals(self.received).name if self.received else "a stop signal on another process"
        if int(os.environ.get("RANK", "0")) == 0:
            (Path(checkpoint_dir) / PREEMPTED_MARKER).write_text(f"{step}\n")
        logger.warning("stopped by %s at step %d of %d; checkpoint in %s: run the same command with "
                       "--resume_from_checkpoint auto to continue", cause, step, total_steps, checkpoint_dir)
        raise SystemExit(EXIT_PREEMPTED)


def readable_batch(batch: dict, last_batch: dict | None) -> tuple[dict, float]:
    """(batch, loss weight). A micro-batch whose images were all unreadable is replaced by the previous one at
    weight 0, so that every process still runs its forward/backward and the gradient all-reduce stays in step."""
    if "pixel_values" in batch:
        return batch, 1.0
    if last_batch is None:
        raise UserError("the first batch had no readable image: check the files under --path_to_data")
    return last_batch, 0.0


def sync_context(accelerator, model, micro: int, accumulation: int):
    """No gradient all-reduce on the micro-batches before the last one of an optimizer step."""
    return accelerator.no_sync(model) if micro < accumulation - 1 else nullcontext()


def apply_speed_options(model: torch.nn.Module, args) -> None:
    """--gradient_checkpointing and --compile, on the plain model before accelerator.prepare. Compiling block by
    block keeps the masking (data-dependent gather, a ratio that may change per step) in eager mode; the weights'
    names do not change, so checkpoints and final weights are the same as without it."""
    from models.vit import Block

    for module in model.modules():
        if args.gradient_checkpointing and hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = True
        if args.compile and isinstance(module, Block):
            module.compile()


def guarded_optimizer_step(accelerator, model, optimizer, step_loss: torch.Tensor, max_grad_norm: float):
    """Clip, then step unless the loss or the gradients are non-finite; returns (skipped, grad_norm, mean loss).

    ``step_loss`` is this process's loss of the step; it is averaged over processes so that every process
    takes the same decision. Under fp16 the GradScaler skips overflowing steps (and lowers its scale) itself.
    One host-device synchronisation per optimizer step.
    """
    grad_norm = accelerator.clip_grad_norm_(
        [p for p in model.parameters() if p.requires_grad], max_grad_norm if max_grad_norm > 0 else float("inf"))
    mean_loss = accelerator.reduce(step_loss.detach(), reduction="mean")
    if accelerator.scaler is not None:
        optimizer.step()
        skipped = accelerator.optimizer_step_was_skipped
    else:
        skipped = not bool(torch.isfinite(mean_loss) & torch.isfinite(grad_norm))
        if not skipped:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return skipped, grad_norm, mean_loss


class BadStepGuard:
    """Counts consecutive skipped steps and stops the run once there are ``limit`` in a row."""

    def __init__(self, limit: int, script: str, checkpoint_dir):
        self.limit, self.script, self.checkpoint_dir, self.in_a_row = limit, script, checkpoint_dir, 0

    def update(self, skipped: bool, step: int) -> None:
        if not skipped:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        logger.warning("step %d skipped: non-finite loss or gradients (%d in a row)", step, self.in_a_row)
        if self.in_a_row >= self.limit:
            raise SystemExit(f"{self.script}: stopping: {self.in_a_row} consecutive steps had a non-finite loss; the "
                             f"last good checkpoint is under {self.checkpoint_dir}. Lower the learning rate, set "
                             "--max_grad_norm, or use bf16 instead of fp16.")


def broadcast_buffers(accelerator, module: torch.nn.Module) -> None:
    """Give every process the main process's buffers (BatchNorm running statistics). Without SyncBatchNorm (CPU
    runs) each process's statistics drift apart; evaluating with the main one's is evaluating the saved model."""
    if accelerator.num_processes > 1:
        for buffer in module.buffers():
            torch.distributed.broadcast(buffer, src=0)
