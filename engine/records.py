"""What a run leaves: metrics.jsonl rows and tracker logs, images per second, the final weights."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from accelerate import Accelerator
from safetensors.torch import save_file



class MetricsLog:
    """Append rows to ``metrics.jsonl`` (main process) and the trackers. On resume, rows after the
    checkpoint's step (left by the interrupted run) are dropped, so the file reads as one run."""

    def __init__(self, accelerator: Accelerator, path: Path, resume_step: int | None = None):
        self.accelerator, self.path = accelerator, path
        if accelerator.is_main_process and path.exists():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            keep = [r for r in rows if resume_step is not None and r.get("step", 0) <= resume_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def log(self, row: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        clean = {k: (float(v) if isinstance(v, float) and math.isfinite(v) else v) for k, v in row.items()}
        with self.path.open("a") as handle:
            handle.write(json.dumps(clean) + "\n")
        self.accelerator.log({k: v for k, v in clean.items() if isinstance(v, (int, float)) and k != "step"},
                             step=row["step"])

    def log_image(self, name: str, image, step: int) -> None:
        """Log a (H, W, C) uint8 numpy picture to the trackers that take images."""
        if not self.accelerator.is_main_process:
            return
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image(name, image, step, dataformats="HWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({name: wandb.Image(image)}, step=step)


class Throughput:
    """Images per second between two calls of ``rate()``."""

    def __init__(self):
        self.start, self.images = time.perf_counter(), 0

    def add(self, images: int) -> None:
        self.images += images

    def rate(self) -> float:
        now = time.perf_counter()
        value = self.images / max(now - self.start, 1e-9)
        self.start, self.images = now, 0
        return value


def save_final_weights(accelerator: Accelerator, model, directory: Path) -> None:
    """Write ``config.json`` + ``model.safetensors`` (the ``from_pretrained`` format) from any process layout:
    the full state dict is gathered on every process (a collective under FSDP) and written by the main one."""
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, str(directory / "model.safetensors"),
                  metadata={"format": "pt"})
        (directory / "config.json").write_text(json.dumps(unwrapped._hub_mixin_config, indent=2, sort_keys=True))
    accelerator.wait_for_everyone()
