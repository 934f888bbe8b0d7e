"""Stop signals (a scheduler's SIGTERM / SIGUSR1, Ctrl-C): stop after the current optimizer step with a checkpoint,
then exit with a code that asks to be requeued."""
from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import torch

from pipeline.loading import STOP_SIGNALS

logger = logging.getLogger(__name__)


EXIT_PREEMPTED = 75  # EX_TEMPFAIL ("try again"): stopped by a signal after writing a checkpoint; requeue the job

PREEMPTED_MARKER = "PREEMPTED"  # written into checkpoints/ by such a stop (holds the step)


class StopSignal:
    """SIGTERM / SIGUSR1 (what SLURM and most schedulers send before a kill) and SIGINT (Ctrl-C) ask the run to
    stop after the current optimizer step, with a checkpoint; a second signal (more than 2 s later) exits at once."""

    REPEAT_WINDOW_S = 2.0  # a scheduler and the launcher (torchrun forwards SIGTERM) often deliver the same stop twice

    def __init__(self):
        self.received: int | None = None
        self.received_at = 0.0
        self._flag = self._sum = self._sum_ready = None  # (several processes: see requested)
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
        """Whether any process got a stop signal. Every process must call it at the same steps (a collective).

        With several processes it answers for the previous call: each call all-reduces this step's flag and copies
        the sum to the host without waiting, and the next call waits for that copy only (on a GPU, the end of the
        previous step), not for the step just queued; so the stop comes one step later, and no step waits for the
        device to drain."""
        if accelerator.num_processes == 1:
            return self.received is not None
        if self._flag is None:
            self._flag = torch.zeros((), device=accelerator.device)
            self._sum = torch.zeros((), pin_memory=accelerator.device.type == "cuda")
        requested = False
        if self._sum_ready is not None:  # the previous call's sum
            self._sum_ready.synchronize()
            requested = bool(self._sum > 0)  # (a host tensor)
        self._flag.fill_(float(self.received is not None))
        cuda = accelerator.device.type == "cuda"  # (elsewhere the copy is done when it returns)
        self._sum.copy_(accelerator.reduce(self._flag, reduction="sum"), non_blocking=cuda)
        self._sum_ready = torch.cuda.Event() if cuda else _NoEvent()
        self._sum_ready.record()
        return requested

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


class _NoEvent:
    """A blocking copy is done when it returns: nothing to record or wait for."""

    def record(self) -> None:
        pass

    def synchronize(self) -> None:
        pass
