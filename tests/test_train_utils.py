
import copy
import json
import math
from contextlib import contextmanager

import pytest
import torch
from accelerate import Accelerator
from conftest import ROOT

from engine.checkpoint import (
    complete_checkpoints, load_checkpoint, resolve_checkpoint, save_checkpoint, set_aside_newer,
)
from engine.optim import param_groups_weight_decay
from engine.schedule import scaled_learning_rate, set_learning_rate, warmup_cosine
from engine.step import sync_context
from models import MaskedAutoencoder
from utils.errors import UserError


def test_warmup_then_cosine():
    assert warmup_cosine(0, 100, 10, 1.0) == 0.0
    assert warmup_cosine(5, 100, 10, 1.0) == pytest.approx(0.5)
    assert warmup_cosine(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 10, 1.0, min_lr=0.1) == pytest.approx(0.1)
    assert scaled_learning_rate(1.5e-4, 2048, 8) == pytest.approx(1.5e-4 * 64)


def test_weight_decay_groups_exclude_norms_biases_and_tokens():
    model = MaskedAutoencoder(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=2,
                              decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    decay, no_decay = param_groups_weight_decay(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert {"encoder.cls_token", "mask_token", "encoder.blocks.0.norm1.weight", "decoder_pred.bias"} <= no_decay_names
    assert all(names[id(p)].endswith("weight") and p.ndim >= 2 for p in decay["params"])
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    optimizer = torch.optim.AdamW([dict(decay, lr_scale=0.5), no_decay])
    set_learning_rate(optimizer, 1e-3)
    assert [g["lr"] for g in optimizer.param_groups] == [5e-4, 1e-3]


def test_checkpoints_are_atomic_rotated_and_resolved(tmp_path):
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        save_checkpoint(accelerator, root, step, {"step": step}, keep=2)
    assert [p.name for p in complete_checkpoints(root)] == ["step_00000002", "step_00000003"]
    # A save that died half-way (no COMPLETE marker) is never picked.
    (root / ".partial_step_00000004").mkdir()
    (root / "step_00000005").mkdir()
    assert resolve_checkpoint("latest", root).name == "step_00000003"
    with pytest.raises(UserError, match="not a complete checkpoint"):
        resolve_checkpoint(str(root / "step_00000005"), root)
    assert resolve_checkpoint("latest", tmp_path / "none") is None
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    assert load_checkpoint(accelerator, root / "step_00000003") == {"step": 3}
    assert torch.equal(model.state_dict()["weight"], saved["weight"])

    # Resuming from step 2 sets step 3 aside; the next save (keep=1) never deletes the checkpoint it wrote.
    moved = set_aside_newer(root, root / "step_00000002")
    assert [p.name for p in moved] == ["step_00000003"] and (root / "abandoned" / "step_00000003").exists()
    save_checkpoint(accelerator, root, 3, {"step": 3}, keep=1)
    assert [p.name for p in complete_checkpoints(root)] == ["step_00000003"]
    assert not list(root.glob(".partial_*"))  # the dead partial save was cleaned up
    save_checkpoint(accelerator, root, 1, {"step": 1}, keep=1)  # even when it is older than the others
    assert [p.name for p in complete_checkpoints(root)] == ["step_00000001"]


def test_a_checkpoint_of_an_unfused_adamw_resumes_fused_with_the_same_update(tmp_path):
    """A loaded optimizer state brings its writer's implementation flag (torch); load_checkpoint keeps this run's:
    a CPU checkpoint from before AdamW was fused there resumes fused, and takes the step the unfused one takes."""
    from engine.optim import build_adamw

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    writer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=False)
    model, writer = accelerator.prepare(model, writer)
    for _ in range(2):
        model(torch.randn(4, 3)).square().sum().backward()
        writer.step()
        writer.zero_grad()
    save_checkpoint(accelerator, tmp_path, 2, {"step": 2}, keep=0)
    reader = build_adamw([{"params": list(model.parameters())}], 0.1, betas=(0.9, 0.999), device=accelerator.device)
    accelerator._optimizers = []
    reader = accelerator.prepare(reader)
    assert reader.param_groups[0]["fused"]
    load_checkpoint(accelerator, tmp_path / "step_00000002")
    assert all(group["fused"] for group in reader.param_groups)  # (torch alone would leave fused=False here)
    inputs = torch.randn(4, 3)
    expected = {name: value.clone() for name, value in model.state_dict().items()}
    reference = torch.optim.AdamW([torch.nn.Parameter(value.clone()) for value in expected.values()], lr=0.1)
    model(inputs).square().sum().backward()
    for param, ref in zip(model.parameters(), reference.param_groups[0]["params"]):
        ref.grad = param.grad.clone()
        reference.state[ref] = {k: v.clone() for k, v in reader.state[param].items()}
    reader.step()
    reference.step()
    for param, ref in zip(model.parameters(), reference.param_groups[0]["params"]):
        assert torch.allclose(param, ref, atol=1e-6)


def test_gradients_are_synchronised_on_the_last_micro_batch_only():
    class RecordingAccelerator:
        def __init__(self):
            self.no_sync_calls = 0

        def no_sync(self, model):
            self.no_sync_calls += 1
            return torch.no_grad()  # any context manager

    accelerator = RecordingAccelerator()
    contexts = [sync_context(accelerator, None, micro, 4) for micro in range(4)]
    assert accelerator.no_sync_calls == 3
    assert type(contexts[-1]).__name__ == "nullcontext"


def test_stop_signal_once_asks_to_stop_twice_exits_at_once():
    """One SIGUSR1 sets the request (a repeat within 2 s is the same stop, as when the scheduler and torchrun both
    deliver it); a second one later exits at once with 128 + the signal number."""
    import subprocess
    import sys

    from conftest import ROOT

    script = (
        "import os, signal, time\n"
        "from accelerate import Accelerator\n"
        "from engine.preemption import StopSignal\n"
        "stop, accelerator = StopSignal(), Accelerator(cpu=True)\n"
        "assert not stop.requested(accelerator)\n"
        "os.kill(os.getpid(), signal.SIGUSR1); os.kill(os.getpid(), signal.SIGTERM)\n"
        "assert stop.requested(accelerator) and stop.received == signal.SIGUSR1\n"
        "print('requested', flush=True)\n"
        "time.sleep(StopSignal.REPEAT_WINDOW_S + 0.2)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(5)\n"
        "print('still running')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["requested"], result.stderr[-2000:]
    assert result.returncode == 128 + 15


def test_a_process_exits_with_a_loader_whose_workers_are_still_alive(tmp_path):
    """Loader workers ignore SIGTERM (the main process checkpoints first); a loader's iterator still alive at exit
    (held by an error's traceback, a global), even without its loader, must not make the exit wait for them forever."""
    import subprocess
    import sys

    script = tmp_path / "alive.py"
    script.write_text(
        "import sys, torch\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from pipeline.sampling import StepBatchSampler\nfrom utils.errors import DataError\n"
        "from pipeline.loading import build_loader\n"
        "class Unreadable(torch.utils.data.Dataset):\n"
        "    def __len__(self): return 16\n"
        "    def __getitem__(self, key): raise DataError('cannot be read')\n"
        "loader = build_loader(Unreadable(), StepBatchSampler(16, 8, 1), 1, torch.device('cpu'))\n"
        "batches = iter(loader)\n"
        "del loader  # the iterator outlives its loader\n"
        "try:\n"
        "    next(batches)\n"
        "except DataError:\n"
        "    print('raised')\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "raised"


def test_emulated_mixed_precision_on_a_cpu_is_named_with_the_fix(monkeypatch, caplog):
    """A GPU command's --mixed_precision bf16 on a CPU without native bf16 (about 15x slower than fp32 here)."""
    import types

    import engine.setup as run

    assert isinstance(run.cpu_has_native("bf16"), bool)
    cpu_bf16 = types.SimpleNamespace(device=torch.device("cpu"), mixed_precision="bf16", is_main_process=True)
    for native, warned in ((False, True), (True, False)):
        monkeypatch.setattr(run, "cpu_has_native", lambda precision, native=native: native)
        caplog.clear()
        run.warn_if_precision_is_emulated(cpu_bf16)
        assert ("leave --mixed_precision out on this machine" in caplog.text) is warned
    caplog.clear()
    monkeypatch.setattr(run, "cpu_has_native", lambda precision: False)
    run.warn_if_precision_is_emulated(types.SimpleNamespace(device=torch.device("cpu"), mixed_precision="no",
                                                            is_main_process=True))
    assert caplog.text == ""


def test_an_fsdp_config_that_fell_back_to_ddp_is_named(monkeypatch, caplog):
    """accelerate launch --config_file accelerate_configs/fsdp.yaml on a CPU: accelerate trains without FSDP."""
    import types

    from accelerate.utils import DistributedType

    import engine.setup as run

    for use_fsdp, distributed_type, warning in (("true", DistributedType.MULTI_CPU, "this run on cpu is DDP over gloo"),
                                                ("True", DistributedType.NO, "this run on cpu is one process"),
                                                ("true", DistributedType.FSDP, None),
                                                ("false", DistributedType.MULTI_CPU, None),
                                                ("", DistributedType.NO, None)):
        monkeypatch.setenv("ACCELERATE_USE_FSDP", use_fsdp)
        caplog.clear()
        run.warn_if_fsdp_fell_back(types.SimpleNamespace(device=torch.device("cpu"), is_main_process=True,
                                                         distributed_type=distributed_type))
        if warning is None:
            assert caplog.text == "", (use_fsdp, distributed_type)
        else:
            assert "asks for FSDP, but accelerate runs FSDP only on GPUs: " + warning in caplog.text


def test_tf32_is_on_for_a_gpu_only_and_torch_compile_can_still_read_the_precision():
    """--tf32 (the default) sets the legacy flags on a GPU: torch.compile reads the precision through the legacy API,
    which raises once it is mixed with the newer fp32_precision one. A CPU keeps PyTorch's settings."""
    import pretrain_mae
    from engine.setup import set_gpu_math

    assert pretrain_mae.parse_args([]).tf32 is True and pretrain_mae.parse_args(["--no-tf32"]).tf32 is False
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = (matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark)
    try:
        matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark = False, True, False
        set_gpu_math(torch.device("cpu"), tf32=True)
        assert not matmul.allow_tf32 and not cudnn.benchmark
        set_gpu_math(torch.device("cpu"), tf32=False)
        assert cudnn.allow_tf32  # PyTorch's own default, left alone
        set_gpu_math(torch.device("cuda"), tf32=True)
        assert matmul.allow_tf32 and cudnn.allow_tf32 and cudnn.benchmark
        assert torch.get_float32_matmul_precision() == "high"  # raises if the two APIs were mixed
        set_gpu_math(torch.device("cuda"), tf32=False)
        assert not matmul.allow_tf32 and not cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark = before


@contextmanager
def host_reads_forbidden(allowed: tuple = ()):
    """Inside it, reading a tensor's value on the host (what waits for a GPU) raises, except for the ``allowed``
    tensors (ones kept on the CPU on purpose). On the CPU this checks the code path: the per-step functions must
    leave every decision on the device."""
    def guard(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if not any(self is tensor for tensor in allowed):
                raise AssertionError(f"a tensor's value was read on the host ({name})")
            return original(self, *args, **kwargs)
        return read

    with pytest.MonkeyPatch.context() as patch:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
            patch.setattr(torch.Tensor, name, guard(name))
        yield


def test_a_non_finite_step_is_skipped_on_the_device_by_the_fused_adamw():
    """guarded_optimizer_step gives the fused AdamW the non-finite flag as found_inf: a NaN step leaves the weights
    and the optimizer state as they were, a finite one takes the same update as a plain AdamW, and neither reads a
    value back to the host; the guard and the running averages count on the device, and are read at check/read."""
    from engine.optim import build_adamw
    from engine.step import BadStepGuard, StepAverages, guarded_optimizer_step

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 1))
    reference_model = copy.deepcopy(model)
    optimizer = build_adamw(param_groups_weight_decay(model, 0.05), 0.1, device=accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    reference = torch.optim.AdamW(param_groups_weight_decay(reference_model, 0.05), lr=0.1, betas=(0.9, 0.95))
    guard = BadStepGuard(2, "test.py", "checkpoints/", accelerator.device)
    averages = StepAverages(accelerator.device)
    inputs = torch.randn(8, 3)

    def step(poison: bool) -> torch.Tensor:
        with host_reads_forbidden():
            loss = model(inputs).square().mean() * (float("nan") if poison else 1.0)
            loss.backward()
            skipped, _, mean_loss = guarded_optimizer_step(accelerator, model, optimizer, loss.detach(), 0.0)
            guard.update(skipped)
            averages.add({"loss": mean_loss}, skipped)
        return skipped

    assert not step(poison=False)
    first_loss = reference_model(inputs).square().mean()
    first_loss.backward()
    reference.step()
    for param, expected in zip(model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(param, expected, rtol=1e-6, atol=1e-7)
    assert not guard.check(step=1)
    weights = [param.detach().clone() for param in model.parameters()]
    states = [{k: v.clone() for k, v in optimizer.state[param].items()} for param in model.parameters()]
    assert step(poison=True)
    for param, weight, state in zip(model.parameters(), weights, states):
        assert torch.equal(param, weight)
        assert all(torch.equal(value, state[key]) for key, value in optimizer.state[param].items())  # step count too
    assert "fused" in optimizer.param_groups[0] and optimizer.param_groups[0]["fused"]
    assert not hasattr(optimizer.optimizer, "found_inf")  # (left as GradScaler leaves it: removed after the step)
    applied, means = averages.read()
    assert applied == 1 and means["loss"] == pytest.approx(first_loss.item(), rel=1e-6)  # the NaN step not summed
    assert guard.check(step=2)  # the latest step was skipped; 1 in a row is under the limit of 2
    assert not step(poison=False)
    assert not guard.check(step=3)
    step(poison=True)
    step(poison=True)
    with pytest.raises(SystemExit, match="2 consecutive steps had a non-finite loss"):
        guard.check(step=5)


def test_the_model_ema_matches_its_formula_without_reading_the_device():
    """ModelEma: the first update copies, later ones move each float weight and buffer towards the model's by
    1 - min(decay, (1 + n) / (10 + n)) (timm/MAE's warm-up), in one foreach call that reads nothing back."""
    from engine.step import ModelEma

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = ModelEma(model, decay=0.5)
    expected = {name: value.clone().float() for name, value in model.state_dict().items()}
    for n in range(4):
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param))
        model(torch.randn(5, 3))  # moves BatchNorm's running statistics and num_batches_tracked
        with host_reads_forbidden(allowed=(ema.n_averaged,)):  # (a CPU counter: reading it does not wait for a GPU)
            ema.update_parameters(model)
        rate = 0.0 if n == 0 else 1.0 - min(0.5, (1.0 + n) / (10.0 + n))
        for name, value in model.state_dict().items():
            if value.is_floating_point():
                expected[name] = expected[name] + (value - expected[name]) * (rate if n else 1.0)
            else:
                expected[name] = value.clone()
    averaged = ema.module.state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(averaged[name], value.to(averaged[name].dtype), rtol=1e-6, atol=1e-6)
    assert int(ema.n_averaged) == 4 and set(ema.state_dict()) == {"n_averaged", *(f"module.{k}" for k in averaged)}


def test_a_stop_signal_on_one_process_stops_every_process_one_call_later(tmp_path):
    """With several processes, StopSignal.requested answers for the previous call (its all-reduce is read without
    waiting for the step just queued): a signal that reaches rank 1 before call 2 stops both ranks at call 3."""
    from conftest import run_script

    script = tmp_path / "stop.py"
    script.write_text(
        "import json, os, signal, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from accelerate import Accelerator\n"
        "from engine.preemption import StopSignal\n"
        "accelerator = Accelerator(cpu=True)\n"
        "stop, answers = StopSignal(), []\n"
        "for call in range(5):\n"
        "    if call == 2 and accelerator.process_index == 1:\n"
        "        os.kill(os.getpid(), signal.SIGUSR1)\n"
        "    answers.append(stop.requested(accelerator))\n"
        f"open({str(tmp_path)!r} + f'/rank{{accelerator.process_index}}.json', 'w').write(json.dumps(answers))\n"
        "accelerator.end_training()  # (as the scripts end; without it gloo's teardown at exit can abort)\n"
    )
    run_script(str(script), processes=2, timeout=120)  # (an absolute path: ROOT / script is the script itself)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == [False, False, False, True, True]


def test_running_sums_and_the_bad_step_run_resume_from_a_checkpoint_state():
    """What a checkpoint keeps of StepAverages (every sum, loss terms included, and the applied steps) and of
    BadStepGuard (the skipped steps in a row): rebuilt from it, both go on as the uninterrupted ones."""
    from engine.step import BadStepGuard, StepAverages

    cpu = torch.device("cpu")
    values = [{"loss": torch.tensor(v), "loss_hf": torch.tensor(v / 10)} for v in (1.0, float("nan"), 3.0, 5.0)]
    skips = [torch.tensor(s) for s in (False, True, False, False)]
    whole, guard = StepAverages(cpu), BadStepGuard(3, "test.py", "checkpoints/", cpu)
    for value, skipped in zip(values[:2], skips[:2]):
        whole.add(value, skipped)
        guard.update(skipped)
    assert guard.check(step=2)  # (what a checkpoint runs first)
    saved = whole.state()
    assert saved == {"loss_sum": 1.0, "loss_steps": 1, "term_sums": {"loss_hf": pytest.approx(0.1)}}
    resumed = StepAverages(cpu, saved["loss_sum"], saved["loss_steps"], saved["term_sums"])
    for value, skipped in zip(values[2:], skips[2:]):
        whole.add(value, skipped)
        resumed.add(value, skipped)
    assert resumed.read() == whole.read() == (3, {"loss": 3.0, "loss_hf": pytest.approx(0.3)})
    whole.reset()
    whole.add(values[1], skips[1])  # an interval of skipped steps only: no mean to give, not a loss of 0
    applied, means = whole.read()
    assert applied == 0 and math.isnan(means["loss"]) and math.isnan(means["loss_hf"])

    resumed_guard = BadStepGuard(3, "test.py", "checkpoints/", cpu, in_a_row=guard.in_a_row)
    for _ in range(2):  # 1 skipped before the checkpoint + 2 after = the limit of 3
        resumed_guard.update(torch.tensor(True))
    with pytest.raises(SystemExit, match="3 consecutive steps"):
        resumed_guard.check(step=4)
