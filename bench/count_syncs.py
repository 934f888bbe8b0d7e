"""Run one of the training scripts with CUDA's synchronisation warnings on, and count where the host waited for the GPU.

    python bench/count_syncs.py pretrain_mae.py --dataset synthetic --model mae_vit_base_patch16 \
        --per_gpu_batch_size 64 --max_train_steps 60 --log_every 20 --vis_every 0 --log_with none

torch.cuda.set_sync_debug_mode("warn") makes every synchronising CUDA call warn from its Python line; this prints those
lines, most frequent first (one counted ``--max_train_steps`` times or more syncs every step). Without CUDA it only
runs the script.
"""
from __future__ import annotations

import collections
import runpy
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    script = ROOT / sys.argv[1]
    sys.argv = [str(script), *sys.argv[2:]]
    sys.path.insert(0, str(ROOT))
    import torch

    counts: collections.Counter = collections.Counter()
    show = warnings.showwarning

    def count(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            counts[f"{Path(filename).relative_to(ROOT) if filename.startswith(str(ROOT)) else filename}:{lineno}"] += 1
        else:
            show(message, category, filename, lineno, file, line)

    warnings.showwarning = count
    warnings.simplefilter("always")
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode("warn")
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        print(f"synchronising calls: {sum(counts.values())} in all, by line (most frequent first):")
        for where, times in counts.most_common(15):
            print(f"  {times:6d}  {where}")


if __name__ == "__main__":
    main()
