"""Crash-safe, resumable checkpoints: accelerate ``save_state`` written to a temporary folder, completed with a
marker that lists every file's size and SHA-256, then renamed into place. An interrupted save never destroys the
previous checkpoint, and one damaged later on disk is noticed before it is loaded."""
from __future__ import annotations

import hashlib
import json
import logging
import pickle
import re
import shutil
from pathlib import Path

import torch

from utils.errors import UserError

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
DAMAGED_DIR = "damaged"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_verified: dict[str, list] = {}  # checkpoints this process hashed: path -> its files' modification times


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """The completion marker: each file's size and SHA-256, so damage after the save can be told apart."""
    files = {str(p.relative_to(folder)): [p.stat().st_size, file_digest(p)]
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != COMPLETE_MARKER}
    (folder / COMPLETE_MARKER).write_text(json.dumps({"files": files}, indent=1))


def damage(folder: Path) -> str | None:
    """What is wrong with a complete checkpoint (a file missing, cut short or changed), or None if it reads as
    written. The plain "ok" marker of checkpoints written before the manifest existed lists nothing to check."""
    try:
        text = (folder / COMPLETE_MARKER).read_text()
        files = {} if text.strip() == "ok" else json.loads(text)["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"its {COMPLETE_MARKER} marker can't be read ({type(error).__name__}: {error})"
    try:
        stamps = []
        for name, (size, _) in files.items():
            path = folder / name
            if not path.is_file():
                return f"{path} is missing"
            stat = path.stat()
            if stat.st_size != size:
                return f"{path} has {stat.st_size} bytes, {size} were written"
            stamps.append((name, stat.st_mtime_ns))
        if _verified.get(str(folder)) == stamps:  # hashed already by this process, and untouched since
            return None
        for name, (_, digest) in files.items():
            if file_digest(folder / name) != digest:
                return f"{folder / name} differs from what was written (SHA-256 mismatch)"
    except OSError as error:  # (moved to damaged/ by the main process while this one was reading it)
        return f"it could not be read ({error})"
    _verified[str(folder)] = stamps
    return None


def set_aside_damaged(checkpoint: Path, problem: str, checkpoint_root: Path) -> None:
    """Move a damaged checkpoint to ``damaged/`` (never deleted) and say so; only the main process moves it (the
    others skip it all the same, having found the same damage or no longer finding it)."""
    logger.warning("checkpoint %s is damaged: %s; it goes to %s/ and the run resumes from the previous complete one",
                   checkpoint, problem, DAMAGED_DIR)
    from accelerate import PartialState

    if PartialState().is_main_process:
        target = checkpoint_root / DAMAGED_DIR / checkpoint.name
        target.parent.mkdir(exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        try:
            checkpoint.rename(target)
        except OSError:  # already moved
            pass


def complete_checkpoints(checkpoint_root: Path) -> list[Path]:
    """Finished checkpoints under ``checkpoint_root``, oldest first."""
    if not checkpoint_root.is_dir():
        return []
    found = [p for p in checkpoint_root.iterdir() if _STEP_DIR.match(p.name) and (p / COMPLETE_MARKER).exists()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def save_checkpoint(accelerator, checkpoint_root: Path, step: int, trainer_state: dict, keep: int,
                    model_config: dict | None = None) -> Path:
    """Save the full training state at ``step``; keep only the newest ``keep`` checkpoints (0 = keep all).
    ``model_config`` is written as ``config.json`` so the folder's ``model.safetensors`` is loadable alone."""
    final = checkpoint_root / f"step_{step:08d}"
    partial = checkpoint_root / f".partial_step_{step:08d}"
    if accelerator.is_main_process:
        for stale in checkpoint_root.glob(".partial_step_*") if checkpoint_root.is_dir() else []:
            shutil.rmtree(stale, ignore_errors=True)  # saves that died half-way
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
        if model_config is not None:
            (partial / "config.json").write_text(json.dumps(model_config, indent=2, sort_keys=True))
        write_manifest(partial)
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        if keep > 0:
            others = [c for c in complete_checkpoints(checkpoint_root) if c != final]
            for old in others[:max(0, len(others) - (keep - 1))]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resolve_checkpoint(resume_from: str, checkpoint_root: Path) -> Path | None:
    """``latest`` / ``auto`` -> the newest complete checkpoint of this run (None if there is none, so the same
    command line can be requeued forever); else a path. Half-written saves (no marker) are never chosen."""
    if resume_from in ("latest", "auto"):
        found = complete_checkpoints(checkpoint_root)
        for checkpoint in reversed(found):
            problem = damage(checkpoint)
            if problem is None:
                return checkpoint
            set_aside_damaged(checkpoint, problem, checkpoint_root)
        if found:  # every one damaged: starting afresh would silently throw the run away
            raise UserError(f"every checkpoint under {checkpoint_root} is damaged (moved to {DAMAGED_DIR}/, the log "
                            "says what is wrong with each): repair one, or start afresh in a new --experiment_name")
        return None
    path = Path(resume_from).expanduser()
    if not (path / COMPLETE_MARKER).exists():
        raise UserError(f"--resume_from_checkpoint {resume_from} is not a complete checkpoint folder "
                        f"(no {COMPLETE_MARKER} marker): pass a step_* folder under checkpoints/, 'latest' or 'auto'")
    problem = damage(path)
    if problem is not None:
        raise UserError(f"checkpoint {path} is damaged: {problem}; pass an earlier step_* folder, or 'auto' to take "
                        "the newest undamaged one")
    return path


def agreed_checkpoint(accelerator, resume_from: str | None, checkpoint_root: Path) -> Path | None:
    """:func:`resolve_checkpoint` on the main process only (it hashes the files and sets damaged ones aside), its
    answer, or its one-line error, sent to every other process."""
    if not resume_from:
        return None
    if accelerator.num_processes == 1:
        return resolve_checkpoint(resume_from, checkpoint_root)
    from accelerate.utils import broadcast_object_list

    answer = [None, None]
    if accelerator.is_main_process:
        try:
            found = resolve_checkpoint(resume_from, checkpoint_root)
            answer = [str(found) if found else None, None]
        except Exception as error:  # every process stops with it, rather than the others waiting for an answer
            answer = [None, str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"]
            broadcast_object_list(answer)
            raise
    found, error = broadcast_object_list(answer)
    if error:
        raise UserError(f"the main process could not choose the checkpoint to resume from: {error}")
    return Path(found) if found else None


def resumed_layout(args, num_processes: int, checkpoint: Path | None) -> dict:
    """The settings a resume changes. On another number of processes (a job requeued on fewer or more GPUs) the
    checkpoint's global batch is split over the processes this run has (``per_gpu_batch_size``): the optimizer steps
    keep their images and learning rate, and the epoch continues with the same samples in the same order. Tar shards
    also need the checkpoint's layout (``shard_resume``, for ShardStepSampler). Empty for a fresh start."""
    if checkpoint is None:
        return {}
    saved = json.loads((checkpoint / TRAINER_STATE).read_text())
    before = saved.get("num_processes", num_processes)
    shards = getattr(args, "dataset", None) == "shards"
    layout = {}
    if shards and ("shard_layout" in saved or before != num_processes):
        epoch = saved["step"] // saved["steps_per_epoch"]
        layout["shard_resume"] = {"steps_per_epoch": saved["steps_per_epoch"],
                                  "shard_layout": saved.get("shard_layout", [epoch, before])}
    if before == num_processes:
        return layout
    per_process, rest = divmod(saved["global_batch"], num_processes)
    if rest or per_process % args.gradient_accumulation_steps:
        raise UserError(f"checkpoint {checkpoint} has a global batch of {saved['global_batch']}, which {num_processes} "
                        f"processes cannot share in whole micro-batches (--gradient_accumulation_steps "
                        f"{args.gradient_accumulation_steps}): resume on a number of processes that divides it")
    logger.warning("resharding: %s was written by %d processes and this run has %d; each process now takes %d images "
                   "per step (--per_gpu_batch_size %d), so every step keeps the global batch of %d and the epoch "
                   "continues with the same samples in the same order%s", checkpoint, before, num_processes,
                   per_process, args.per_gpu_batch_size, saved["global_batch"],
                   "; tar shards are split anew from the next epoch" if shards else "")
    return {**layout, "per_gpu_batch_size": per_process}


def load_checkpoint(accelerator, path: Path) -> dict:
    """Restore model, optimizer, scaler and RNG states; return the trainer state (``step`` etc.). The optimizers
    keep this run's implementation (fused or not): a loaded state would otherwise bring the writer's."""
    optimizers = [getattr(optimizer, "optimizer", optimizer) for optimizer in accelerator._optimizers]
    implementations = [[{key: group[key] for key in ("fused", "foreach") if key in group}
                        for group in optimizer.param_groups] for optimizer in optimizers]
    try:
        accelerator.load_state(str(path))
    except RuntimeError as error:  # e.g. size mismatches: another architecture
        lines = str(error).splitlines() or [type(error).__name__]
        detail = next((line.strip() for line in lines if "size mismatch" in line), None)
        if detail is None:
            raise UserError(f"checkpoint {path} can't be read ({lines[0][:200]}): pass an earlier step_* folder") from None
        raise UserError(f"checkpoint {path} does not fit this model ({detail}): resume with the model flags "
                        "of the run that wrote it") from None
    except (OSError, EOFError, ValueError, pickle.UnpicklingError) as error:
        raise UserError(f"checkpoint {path} can't be read ({type(error).__name__}: {str(error)[:200]}): pass an "
                        "earlier step_* folder") from None
    for optimizer, groups in zip(optimizers, implementations):
        keep_implementation(optimizer, groups)
    return json.loads((path / TRAINER_STATE).read_text())


def keep_implementation(optimizer, groups: list[dict]) -> None:
    """Put back the ``fused``/``foreach`` flags a loaded state replaced (e.g. a CPU checkpoint written before AdamW
    was fused there). A fused optimizer keeps its step counts as float32 on the parameters' device."""
    for group, flags in zip(optimizer.param_groups, groups):
        group.update(flags)
        if group.get("fused"):
            for param in group["params"]:
                state = optimizer.state.get(param, {})
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].to(param.device, torch.float32)


def resume_from(accelerator, checkpoint: Path, checkpoint_root: Path, steps_per_epoch: int, global_batch: int,
                set_aside: bool = True) -> dict:
    """Load ``checkpoint`` into the prepared objects and return its trainer state. The data must cut into the
    same optimizer steps as when it was written; checkpoints newer than it are set aside (see set_aside_newer)."""
    saved = load_checkpoint(accelerator, checkpoint)
    saved.pop("num_processes", None)  # the run's own count goes into its next checkpoints (see resumed_layout)
    if saved["steps_per_epoch"] != steps_per_epoch or saved["global_batch"] != global_batch:
        raise UserError(f"checkpoint {checkpoint} was written with {saved['steps_per_epoch']} steps per epoch of "
                        f"{saved['global_batch']} images, this run has {steps_per_epoch} of {global_batch}: "
                        "resume with the same data and global batch")
    if set_aside and accelerator.is_main_process:
        for moved in set_aside_newer(checkpoint_root, checkpoint):
            logger.info("set aside %s: it is newer than the checkpoint this run resumes from", moved)
    accelerator.wait_for_everyone()
    return saved


def set_aside_newer(checkpoint_root: Path, resumed: Path) -> list[Path]:
    """Resuming from an older checkpoint abandons the newer ones: move them to ``abandoned/`` so that
    ``latest`` and the keep-K pruning follow the resumed run, without deleting anything."""
    step = int(_STEP_DIR.match(resumed.name).group(1)) if _STEP_DIR.match(resumed.name) else None
    if step is None or resumed.parent.resolve() != checkpoint_root.resolve():
        return []
    moved = []
    for newer in complete_checkpoints(checkpoint_root):
        if int(_STEP_DIR.match(newer.name).group(1)) > step:
            target = checkpoint_root / "abandoned" / newer.name
            target.parent.mkdir(exist_ok=True)
            shutil.rmtree(target, ignore_errors=True)
            newer.rename(target)
            moved.append(target)
    return moved
