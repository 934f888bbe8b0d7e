"""Crash-safe, resumable checkpoints: accelerate ``save_state`` written to a temporary folder, completed
with a marker, then renamed into place, so an interrupted save never destroys the previous checkpoint."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from .errors import UserError

COMPLETE_MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def complete_checkpoints(checkpoint_root: Path) -> list[Path]:
    """Finished checkpoints under ``checkpoint_root``, oldest first."""
    if not checkpoint_root.is_dir():
        return []
    found = [p for p in checkpoint_root.iterdir() if _STEP_DIR.match(p.name) and (p / COMPLETE_MARKER).exists()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def save_checkpoint(accelerator, checkpoint_root: Path, step: int, trainer_state: dict, keep: int) -> Path:
    """Save the full training state at ``step``; keep only the newest ``keep`` checkpoints (0 = keep all)."""
    final = checkpoint_root / f"step_{step:08d}"
    partial = checkpoint_root / f".partial_step_{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
        (partial / COMPLETE_MARKER).write_text("ok\n")
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        if keep > 0:
            for old in complete_checkpoints(checkpoint_root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resolve_checkpoint(resume_from: str, checkpoint_root: Path) -> Path | None:
    """``latest`` -> the newest complete checkpoint of this run (None if there is none); else a path."""
    if resume_from == "latest":
        found = complete_checkpoints(checkpoint_root)
        return found[-1] if found else None
    path = Path(resume_from).expanduser()
    if not (path / COMPLETE_MARKER).exists():
        raise UserError(f"--resume_from_checkpoint {resume_from} is not a complete checkpoint folder "
                        f"(no {COMPLETE_MARKER} marker): pass a step_* folder under checkpoints/ or 'latest'")
    return path


def load_checkpoint(accelerator, path: Path) -> dict:
    """Restore model, optimizer, scaler and RNG states; return the trainer state (``step`` etc.)."""
    accelerator.load_state(str(path))
    return json.loads((path / TRAINER_STATE).read_text())
