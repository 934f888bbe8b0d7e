import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def skip_or_fail(missing: str):
    """Skip a test that needs what this machine lacks; in CI (MAE_REQUIRE_DATA), where every test runs, fail it."""
    if os.environ.get("MAE_REQUIRE_DATA"):
        pytest.fail(missing)
    pytest.skip(missing)


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
        skip_or_fail("trains on the real Fashion-MNIST images, which are missing: "
                     "apt-get install dataset-fashion-mnist")
    return FASHION_MNIST


@pytest.fixture(scope="session")
def dali():
    """nvidia.dali (``--decode dali``; its pipelines run on the CPU here), skipped where it is not installed."""
    from pipeline.dali_decode import import_dali
    from utils.errors import UserError

    try:
        return import_dali()
    except UserError:
        skip_or_fail("needs NVIDIA DALI: pip install nvidia-dali-cuda130")


def free_port() -> int:
    """A TCP port nobody listens on now, so two test runs on one machine never meet."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_script(script: str, *args, processes: int = 1, check: bool = True, timeout: int = 300):
    """Run one of the top-level scripts in a fresh process (1 process: python; more: accelerate launch, gloo)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1" if processes > 1 else os.environ.get("OMP_NUM_THREADS", ""))
    env.pop("OMP_NUM_THREADS", None) if not env["OMP_NUM_THREADS"] else None
    if processes == 1:
        command = [sys.executable, str(ROOT / script)]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(ROOT / "accelerate_configs" / "cpu_2proc.yaml"), "--num_processes", str(processes),
                   "--main_process_port", str(free_port()), str(ROOT / script)]
    result = subprocess.run(command + [str(a) for a in args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def run_in_process(script: str, *args) -> tuple[int, str]:
    """Call a top-level script's main() in this process as ``python script ARGS`` would (through run_cli) and return
    (exit code, stderr with the run's log lines). For the argument-error tests: a fresh interpreter spends ~5 s
    importing before it reads its arguments; run_script stays the check of the real command line. What a run
    changes in the process (stop-signal handlers, RNG states, threads, log levels, accelerate's state) is put back."""
    import contextlib
    import importlib
    import io
    import logging
    import random
    import signal

    import numpy as np
    import torch
    from accelerate.state import AcceleratorState, GradientState

    from pipeline.loading import STOP_SIGNALS
    from utils.errors import run_cli

    module = importlib.import_module(Path(script).stem)
    stderr, program = io.StringIO(), sys.argv[0]
    handlers = {stop: signal.getsignal(stop) for stop in STOP_SIGNALS}
    rng_states = torch.get_rng_state(), random.getstate(), np.random.get_state()
    root, accelerate_logger = logging.getLogger(), logging.getLogger("accelerate")
    levels, threads = (root.level, accelerate_logger.level), torch.get_num_threads()
    log = logging.StreamHandler(stderr)  # (pytest's handlers on the root logger make the run's basicConfig a no-op)
    log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(log)
    root.setLevel(logging.INFO)
    sys.argv[0] = script
    try:
        with contextlib.redirect_stderr(stderr):
            run_cli(lambda: module.main([str(a) for a in args]))
        code = 0
    except SystemExit as stop:
        code = stop.code
    finally:
        sys.argv[0] = program
        root.removeHandler(log)
        root.setLevel(levels[0])
        accelerate_logger.setLevel(levels[1])
        for stop, handler in handlers.items():
            signal.signal(stop, handler if handler is not None else signal.SIG_DFL)
        torch.set_rng_state(rng_states[0])
        random.setstate(rng_states[1])
        np.random.set_state(rng_states[2])
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(reset_partial_state=True)  # a later Accelerator may ask for other settings
        GradientState._reset_state()
    return code, stderr.getvalue()


def sigterm_script(script: str, *args, ready, timeout: int = 180) -> tuple[int, str]:
    """Start one of the scripts (1 process), wait until ``ready()`` says training is under way, send SIGTERM and
    return (exit code, stderr)."""
    import signal
    import time

    process = subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None and not ready():
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=timeout)
    return process.returncode, stderr


def read_metrics(run_dir: Path, reconstruction_rows: bool = False) -> list[dict]:
    """metrics.jsonl's training rows (or, with ``reconstruction_rows``, pretraining's validation rows)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [row for row in rows if ("val_psnr_masked" in row) == reconstruction_rows]


def without_timing(rows) -> list[dict]:
    """metrics rows less their images_per_sec (wall-clock dependent), for comparing two runs row by row."""
    return [{k: v for k, v in row.items() if k != "images_per_sec"} for row in rows]


def copy_stopped_after(run: Path, copy: Path, step: int) -> Path:
    """A copy of a finished run as if it had died right after its checkpoint of ``step``: the later checkpoints
    and final/ are gone."""
    shutil.copytree(run, copy)
    for checkpoint in (copy / "checkpoints").glob("step_*"):
        if int(checkpoint.name.split("_")[1]) > step:
            shutil.rmtree(checkpoint)
    shutil.rmtree(copy / "final")
    return copy


def without_key_bias(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Drop the key third of a fused qkv bias. Its gradient is zero up to rounding (softmax ignores a shift shared by
    all keys), and AdamW turns that noise into lr-sized steps that differ with the summation order."""
    if not name.endswith("attn.qkv.bias"):
        return tensor
    query, _, value = tensor.chunk(3)
    return torch.cat([query, value])


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="Also run the tests marked slow (CI does).")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: whole-script runs beyond one per script (run with --runslow, as CI does)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow", default=False) or config.option.markexpr:  # an explicit -m selects by itself
        return
    skip = pytest.mark.skip(reason="slow: pass --runslow to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
