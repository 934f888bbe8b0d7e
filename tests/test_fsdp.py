"""FSDP2 on the CPU: accelerate runs FSDP only on GPUs (launched on a CPU, accelerate_configs/fsdp.yaml trains with
DDP over gloo), but torch's ``fully_shard`` runs on the CPU. Two gloo processes shard the MAE the way fsdp.yaml does
(FSDP2, each transformer Block a unit, resharded after forward) and train it with the scripts' fused AdamW and
device-side skip of a non-finite step; one unsharded model trains on the whole batch beside them."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from test_cluster import free_port

WORKER = r'''
import json, sys
import torch
import torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from models import MaskedAutoencoder, mae_config
from utils.optim import build_adamw, param_groups_weight_decay

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
sharded = MaskedAutoencoder(**mae_config("mae_vit_tiny_patch4"))
whole = MaskedAutoencoder(**mae_config("mae_vit_tiny_patch4"))
whole.load_state_dict(sharded.state_dict())
initial = {key: value.clone() for key, value in whole.state_dict().items()}
sharded.gradient_checkpointing = True  # (fsdp.yaml leaves it to --gradient_checkpointing: exercised here)
mesh = init_device_mesh("cpu", (world,))
for block in [*sharded.encoder.blocks, *sharded.decoder_blocks]:
    fully_shard(block, mesh=mesh, reshard_after_forward=True)
fully_shard(sharded, mesh=mesh)
optimizers = [build_adamw(param_groups_weight_decay(model, 0.05), 1e-3, device=torch.device("cpu"))
              for model in (sharded, whole)]
generator = torch.Generator().manual_seed(1)
steps, batch, per_rank = 4, 8, 8 // world
images = torch.randn(steps, batch, 1, 28, 28, generator=generator)
noise = torch.rand(steps, batch, 49, generator=generator)
losses = {"sharded": [], "whole": []}
for step in range(steps):
    poison = float("nan") if step == 2 else 1.0  # step 2: a non-finite loss, skipped on the device
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    for name, model, optimizer, rows in (("sharded", sharded, optimizers[0], mine), ("whole", whole, optimizers[1], slice(None))):
        loss = model(images[step, rows], noise=noise[step, rows]).loss * poison
        loss.backward()
        mean = loss.detach().clone()
        if name == "sharded":
            dist.all_reduce(mean)
            mean /= world
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        optimizer.found_inf = (~(torch.isfinite(mean) & torch.isfinite(norm))).float()
        optimizer.step()
        del optimizer.found_inf
        optimizer.zero_grad(set_to_none=True)
        losses[name].append(mean.item())
full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if rank == 0:
    reference = whole.state_dict()
    difference = max((full[key] - reference[key]).abs().max().item() for key in reference)
    moved = max((reference[key] - initial[key]).abs().max().item() for key in reference)
    shapes = all(full[key].shape == reference[key].shape for key in reference)
    open(sys.argv[2], "w").write(json.dumps({"losses": losses, "difference": difference, "shapes": shapes,
                                             "keys": sorted(full) == sorted(reference), "moved": moved}))
dist.barrier()  # (a process that leaves the group while the other still works aborts it)
dist.destroy_process_group()
'''


def test_fsdp2_on_two_cpu_processes_trains_like_one_unsharded_model(tmp_path):
    worker, result = tmp_path / "fsdp_worker.py", tmp_path / "result.json"
    worker.write_text(WORKER)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               str(worker), str(ROOT), str(result)]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-4000:]
    out = json.loads(result.read_text())
    sharded, whole = out["losses"]["sharded"], out["losses"]["whole"]
    assert sharded[2] != sharded[2] and whole[2] != whole[2]  # the NaN step, skipped by both
    for step in (0, 1, 3):
        assert sharded[step] == pytest.approx(whole[step], rel=1e-5)
    assert sharded[3] != pytest.approx(sharded[0], rel=1e-3)  # the weights moved between steps 0 and 3
    assert out["keys"] and out["shapes"]  # the gathered state dict is the plain model's: final weights save as usual
    # Adam's first steps move each weight by about the learning rate whatever the gradient's size, so the last bits of
    # an all-reduced gradient show at 1e-4 here: small against what the three updates moved the weights
    assert out["difference"] < 0.1 * out["moved"] and out["moved"] > 1e-3
