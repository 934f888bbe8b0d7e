"""The pieces of an optimizer step every script shares: micro-batches without an all-reduce before the last, the
guarded optimizer step, loss averages and the bad-step guard kept on the device, the EMA of the weights."""
from __future__ import annotations

import logging
from contextlib import nullcontext

import torch

from utils.errors import UserError

logger = logging.getLogger(__name__)


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
    """--gradient_checkpointing and --compile, on the plain model before accelerator.prepare. --compile compiles
    regions, not the whole model: each transformer block, and the MAE's patch embedding with the masking, decoder
    input, and prediction with the loss (``MaskedAutoencoder.region``; the mask's noise is drawn eagerly, and a
    changing count of visible patches recompiles once). Each block keeps its own backward graph for DDP to overlap its
    all-reduce with, and the weights' names do not change, so checkpoints and final weights are the same as
    without it."""
    from models.vit import Block

    for module in model.modules():
        if args.gradient_checkpointing and hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = True
        if args.compile and isinstance(module, Block):
            module.compile()
        if args.compile and hasattr(module, "compile_regions"):
            module.compile_regions = True


def guarded_optimizer_step(accelerator, model, optimizer, step_loss: torch.Tensor, max_grad_norm: float):
    """Clip, then step unless the loss or the gradients are non-finite; returns (skipped, grad_norm, mean loss),
    tensors on the device.

    ``step_loss`` is this process's loss of the step; it is averaged over processes so that every process takes the
    same decision. A fused AdamW (what ``build_adamw`` makes on CUDA and the CPU) takes it on the device: it is given
    the flag as ``found_inf``, GradScaler's way of skipping a step, so the step reads nothing back to the host. Other
    optimizers read the flag (one host-device synchronisation). Under fp16 the GradScaler skips the steps whose
    unscaled gradients are non-finite (and lowers its scale) itself, handing a fused AdamW its own ``found_inf``;
    those are the steps this flag marks, since the norm is taken after unscaling. (accelerate's
    ``optimizer_step_was_skipped`` can't tell: the scaler calls a fused optimizer's step either way.)
    """
    grad_norm = accelerator.clip_grad_norm_(
        [p for p in model.parameters() if p.requires_grad], max_grad_norm if max_grad_norm > 0 else float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a replicated DTensor; as a plain tensor it adds to the counters
        grad_norm = grad_norm.full_tensor()
    mean_loss = accelerator.reduce(step_loss.detach(), reduction="mean")
    skipped = ~(torch.isfinite(mean_loss) & torch.isfinite(grad_norm))
    torch_optimizer = getattr(optimizer, "optimizer", optimizer)  # (accelerate wraps it)
    if accelerator.scaler is not None:
        optimizer.step()
    elif torch_optimizer.defaults.get("fused"):
        torch_optimizer.found_inf = skipped.float()
        try:
            optimizer.step()
        finally:
            del torch_optimizer.found_inf
    elif not skipped.item():
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return skipped, grad_norm, mean_loss


class StepAverages:
    """Sums of per-step values (the loss, loss terms) over the applied optimizer steps since the last reset, kept on
    the device: adding a step reads nothing back to the host; ``read`` (one synchronisation) runs at --log_every."""

    def __init__(self, device: torch.device, loss_sum: float = 0.0, steps: int = 0, term_sums: dict | None = None):
        self.device = device
        sums = {"loss": loss_sum, **(term_sums or {})}
        self.sums = {name: torch.full((), float(value), device=device) for name, value in sums.items()}
        self.steps = torch.full((), steps, dtype=torch.long, device=device)

    def add(self, values: dict[str, torch.Tensor], skipped: torch.Tensor) -> None:
        """Add one optimizer step's values unless it was skipped (its values may be NaN)."""
        for name, value in values.items():
            if name not in self.sums:
                self.sums[name] = torch.zeros((), device=self.device)
            self.sums[name] += torch.where(skipped, 0.0, value)
        self.steps += ~skipped

    def read(self) -> tuple[int, dict[str, float]]:
        """(applied steps, {name: mean over them}) since the last reset; the means are NaN when every step since
        was skipped (an epoch row then says so rather than logging a loss of 0)."""
        names = list(self.sums)
        means = torch.stack([self.sums[name] for name in names]) / self.steps  # (0 / 0: NaN)
        steps, *values = torch.cat([self.steps.reshape(1).to(means.dtype), means]).tolist()
        return int(steps), dict(zip(names, values))

    def state(self) -> dict:
        """The running sums and step count, for a checkpoint (resuming mid-interval logs the same row)."""
        sums = {name: float(total) for name, total in self.sums.items()}
        return {"loss_sum": sums.pop("loss"), "loss_steps": int(self.steps), "term_sums": sums}

    def reset(self) -> None:
        for total in self.sums.values():
            total.zero_()
        self.steps.zero_()


class BadStepGuard:
    """Stops the run once ``limit`` optimizer steps in a row were skipped. It counts on the device, so a step reads
    nothing back to the host; ``check`` reads the counts, and the scripts call it at --log_every and before a
    checkpoint, so a run stops there (its weights are those of the last applied step)."""

    def __init__(self, limit: int, script: str, checkpoint_dir, device: torch.device, in_a_row: int = 0):
        self.limit, self.script, self.checkpoint_dir = limit, script, checkpoint_dir
        # skipped since the last check, in a row now (a checkpoint's, on resume), longest since the last check
        self.counts = torch.tensor([0, in_a_row, in_a_row], dtype=torch.long).to(device)
        self.in_a_row = in_a_row

    def update(self, skipped: torch.Tensor) -> None:
        skipped, in_a_row = skipped.long(), self.counts[1]
        self.counts[0].add_(skipped)
        in_a_row.add_(1).mul_(skipped)  # 0 again after an applied step
        torch.maximum(self.counts[2], in_a_row, out=self.counts[2])

    def check(self, step: int) -> bool:
        """Warn of the steps skipped since the last check, stop the run if ``limit`` were in a row, and return
        whether the latest step was skipped."""
        skipped, in_a_row, longest = self.counts.tolist()
        if skipped:
            logger.warning("%d of the steps up to step %d skipped: non-finite loss or gradients (%d in a row at most)",
                           skipped, step, longest)
        if longest and longest >= self.limit:
            raise SystemExit(f"{self.script}: stopping: {longest} consecutive steps had a non-finite loss; the "
                             f"last good checkpoint is under {self.checkpoint_dir}. Lower the learning rate, set "
                             "--max_grad_norm, or use bf16 instead of fp16.")
        self.counts[0].zero_()
        self.counts[2].copy_(self.counts[1])
        self.in_a_row = in_a_row  # (what a checkpoint saves: check() runs first)
        return in_a_row > 0


class ModelEma(torch.optim.swa_utils.AveragedModel):
    """An exponential moving average of the weights and buffers (``--model_ema``) whose update reads nothing back
    from the device: one ``_foreach_lerp_`` with a decay computed on the host, warming up as (1 + n) / (10 + n) and
    capped at ``decay`` (n: the updates so far, a CPU counter). Updated at every optimizer step, a skipped one
    included (its weights are those of the last applied step), as timm's EMA is. Its state dict is AveragedModel's."""

    def __init__(self, model: torch.nn.Module, decay: float):
        super().__init__(model, use_buffers=True)
        self.decay = decay

    @torch.no_grad()
    def update_parameters(self, model: torch.nn.Module) -> None:
        pairs = list(zip([*self.module.parameters(), *self.module.buffers()], [*model.parameters(), *model.buffers()]))
        updates = int(self.n_averaged)  # (a CPU buffer)
        averaged = [(average, current) for average, current in pairs if updates and average.is_floating_point()]
        copied = [(average, current) for average, current in pairs if not (updates and average.is_floating_point())]
        if averaged:  # (the first update copies everything; later ones copy BatchNorm's num_batches_tracked)
            rate = min(self.decay, (1.0 + updates) / (10.0 + updates))
            torch._foreach_lerp_([a for a, _ in averaged], [c for _, c in averaged], 1.0 - rate)
        for average, current in copied:
            average.copy_(current)
        self.n_averaged += 1


def broadcast_buffers(accelerator, module: torch.nn.Module) -> None:
    """Give every process the main process's buffers (BatchNorm running statistics). Without SyncBatchNorm (CPU
    runs) each process's statistics drift apart; evaluating with the main one's is evaluating the saved model."""
    if accelerator.num_processes > 1:
        for buffer in module.buffers():
            torch.distributed.broadcast(buffer, src=0)
