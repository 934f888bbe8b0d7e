"""Several nodes: a two-node torchrun job (c10d rendezvous over localhost) against one process with the same global batch."""
import math
import os
import subprocess
import sys
import uuid

import psutil  # installed with accelerate
import pytest
import torch
from conftest import ROOT, free_port, read_metrics, run_script, without_key_bias
from safetensors.torch import load_file
from test_pretrain import SMALL

NODE_TIMEOUT = 180  # seconds for the whole two-node run; it takes about 15 on two idle cores


def kill_marked(marker: str) -> None:
    """SIGKILL every process started with ``marker`` in its environment: the torchrun agents and their workers
    (torchrun starts each worker in a session of its own, so killing an agent's process group would miss them)."""
    marked = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("MAE_TEST_MARKER") == marker:
                marked.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    for process in marked:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(marked, timeout=10)


def run_nodes(nodes: int, script_args: list, log_dir) -> list[tuple[int, str]]:
    """Start ``nodes`` torchrun agents of one process each, as if on separate machines, joined by a c10d rendezvous
    on 127.0.0.1; return each node's (exit code, output). No process outlives this call, whatever happens."""
    marker = uuid.uuid4().hex
    # One thread per process: the "nodes" share this machine's cores (MAE_CPU_THREADS overrides the per-node share).
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MAE_CPU_THREADS="1", MAE_TEST_MARKER=marker)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc_per_node", "1",
                "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "--rdzv_id", marker]
    logs = [log_dir / f"node{rank}.log" for rank in range(nodes)]
    agents = []
    try:
        for rank, log in enumerate(logs):
            with log.open("w") as handle:
                agents.append(subprocess.Popen(
                    launcher + ["--node_rank", str(rank), str(ROOT / "pretrain_mae.py"), *map(str, script_args)],
                    cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT))
        for agent in agents:
            agent.wait(timeout=NODE_TIMEOUT)
    finally:
        kill_marked(marker)
        for agent in agents:
            agent.wait()
    return [(agent.returncode, log.read_text()) for agent, log in zip(agents, logs)]


@pytest.mark.slow
def test_two_nodes_equal_one_process(tmp_path, fashion_mnist_dir, monkeypatch):
    # 128 samples, global batch 16: 8 steps per epoch, 16 steps in two epochs; 2 micro-batches per step.
    common = ["--working_directory", tmp_path, "--max_samples", 128, "--max_train_steps", 16, "--warmup_epochs", 0.25,
              "--base_learning_rate", 1e-2, "--log_every", 1, "--vis_every", 0, "--gradient_accumulation_steps", 2,
              *SMALL]
    nodes = run_nodes(2, ["--experiment_name", "two_nodes", "--per_gpu_batch_size", 8, *common], tmp_path)
    for rank, (code, output) in enumerate(nodes):
        assert code == 0, f"node {rank} exited with {code}:\n{output[-4000:]}"
    # Rendezvous ranks follow join order, not --node_rank: whichever node holds rank 0 logged the summary.
    assert "global batch 16 (micro-batch 4 x 2 accumulation x 2 processes)" in nodes[0][1] + nodes[1][1]
    monkeypatch.setenv("MAE_CPU_THREADS", "1")  # two threads slow down badly when other jobs share the cores
    run_script("pretrain_mae.py", "--experiment_name", "one", "--per_gpu_batch_size", 16, *common)
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two_nodes")
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, 17))
    losses = [r["loss"] for r in two]
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-4:]) < 0.8 * sum(losses[:4]), losses
    for a, b in zip(one, two):
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
    wa = load_file(tmp_path / "one" / "final" / "model.safetensors")
    wb = load_file(tmp_path / "two_nodes" / "final" / "model.safetensors")
    for key in wa:
        torch.testing.assert_close(without_key_bias(key, wa[key]), without_key_bias(key, wb[key]), rtol=1e-3, atol=1e-5)
