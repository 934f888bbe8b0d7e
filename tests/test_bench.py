"""bench/benchmark_pretrain.py: the FLOP count behind the MFU, and each mode producing finite figures (speed itself
is never asserted: benchmarks print figures, tests check that they are computed right)."""
import importlib.util
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import ROOT
from models import MaskedAutoencoder, mae_config

spec = importlib.util.spec_from_file_location("benchmark_pretrain", ROOT / "bench" / "benchmark_pretrain.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


@pytest.mark.parametrize("name,ratio", [("mae_vit_tiny_patch4", 0.75), ("mae_vit_small_patch16", 0.5)])
def test_flops_per_image_equal_pytorchs_count(name, ratio):
    config = mae_config(name, mask_ratio=ratio)
    model = MaskedAutoencoder(**config).eval()
    images = torch.randn(2, config["in_chans"], config["img_size"], config["img_size"])
    # The math attention path runs as matmuls, which the counter sees (the fused CPU kernel it does not count).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images)
    assert bench.mae_flops_per_image(config, ratio) == counter.get_total_flops() // 2


def test_linear_patch_embedding_equals_the_convolution():
    from models.vit import PatchEmbed

    torch.manual_seed(0)
    embed = PatchEmbed(32, 8, 3, 24)
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(bench.linear_patch_embed(embed, images), embed(images), rtol=1e-5, atol=1e-5)


def test_model_mode_times_ours_and_transformers_on_the_same_config():
    rows = bench.main(["--batch_size", "8", "--steps", "1", "--rounds", "2", "--warmup_steps", "1",
                       "--peak_tflops", "1.0", "--device", "cpu"])
    ours, hf = rows
    assert (ours["impl"], hf["impl"]) == ("ours", "hf")
    for row in rows:
        assert row["images_per_sec"] > 0 and row["finite_loss"] and 0 < row["mfu"] < 1
        assert row["gflops_per_image_train"] == pytest.approx(3 * bench.mae_flops_per_image(
            mae_config("mae_vit_tiny_patch4", mask_ratio=0.75), 0.75) / 1e9, abs=1e-3)
    assert ours["speedup_vs_hf"] == pytest.approx(hf["step_time_ms"] / ours["step_time_ms"], rel=1e-2)


def test_vit_flops_per_image_equal_pytorchs_count():
    from models import VisionTransformer, encoder_config

    encoder = encoder_config(mae_config("mae_vit_tiny_patch4"))
    model = VisionTransformer(**encoder, num_classes=10, global_pool=True).eval()
    images = torch.randn(2, encoder["in_chans"], encoder["img_size"], encoder["img_size"])
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images)
    assert bench.vit_flops_per_image(encoder, 10) == counter.get_total_flops() // 2


def test_finetune_mode_times_ours_and_timm_built_alike():
    """The fine-tuning step against timm's ViT: the same shapes (timm learns its position embedding, the one tensor
    ours has as a fixed buffer), and a row each with finite losses and the same FLOP count."""
    from models import VisionTransformer, encoder_config

    encoder = encoder_config(mae_config("mae_vit_tiny_patch4"))
    ours = VisionTransformer(**encoder, num_classes=10, global_pool=True, drop_path_rate=0.1)
    theirs = bench.build_timm_vit(encoder, 10, 0.1)
    assert sum(p.numel() for p in ours.parameters()) + ours.pos_embed.numel() == sum(p.numel() for p in theirs.parameters())
    rows = bench.main(["--mode", "finetune", "--num_classes", "10", "--batch_size", "8", "--steps", "1", "--rounds", "2",
                       "--warmup_steps", "1", "--peak_tflops", "1.0", "--device", "cpu"])
    assert [row["impl"] for row in rows] == ["ours", "timm"]
    for row in rows:
        assert row["mode"] == "finetune" and row["finite_loss"] and row["images_per_sec"] > 0 and 0 < row["mfu"] < 1
        assert row["gflops_per_image_train"] == pytest.approx(3 * bench.vit_flops_per_image(encoder, 10) / 1e9, abs=1e-3)
    assert rows[0]["speedup_vs_timm"] == pytest.approx(rows[1]["step_time_ms"] / rows[0]["step_time_ms"], rel=1e-2)
    with pytest.raises(SystemExit):  # timm is the fine-tuning reference, 🤗 the pretraining one
        bench.parse_args(["--mode", "model", "--impl", "timm"])


def test_scope_mode_compiles_what_each_scope_names(monkeypatch):
    """--mode scope: eager compiles nothing, blocks only the transformer blocks, regions the blocks and the MAE's
    regions (as --compile), whole the model in one graph; a row each, with the speed-up over eager. torch.compile is
    recorded and left out here (compiling four variants takes minutes on this CPU; test_models_mae checks that the
    compiled regions match eager)."""
    import models.mae
    from models.vit import Block

    compiled = []

    def record(fn, *args, **kwargs):
        compiled.append(fn)
        return fn

    monkeypatch.setattr(torch, "compile", record)
    monkeypatch.setattr(models.mae, "_COMPILED", {})  # (what region() compiles is kept there, for every model)
    args = bench.parse_args(["--mode", "scope", "--batch_size", "8", "--steps", "1", "--rounds", "2",
                             "--warmup_steps", "1", "--peak_tflops", "1.0", "--device", "cpu"])
    args.accelerator = bench.build_accelerator(args)
    config = mae_config("mae_vit_tiny_patch4")
    seen = {}
    for scope in bench.COMPILE_SCOPES:
        model = MaskedAutoencoder(**config)
        before = len(compiled)
        bench.Trainer(scope, model, args, lambda m, x, noise: m(x, noise=noise).loss, scope=scope)
        images = torch.randn(2, config["in_chans"], config["img_size"], config["img_size"])
        model(images)  # region() compiles on first use
        blocks = [m for m in model.modules() if isinstance(m, Block)]
        seen[scope] = (len(compiled) - before, all(b._compiled_call_impl is not None for b in blocks),
                       model.compile_regions, model._compiled_call_impl is not None)
    num_blocks = config["depth"] + config["decoder_depth"]
    assert seen["eager"] == (0, False, False, False)
    assert seen["blocks"] == (num_blocks, True, False, False)
    assert seen["regions"] == (num_blocks + 3, True, True, False)  # + encoder input, decoder input, prediction/loss
    assert seen["whole"] == (1, False, False, True)
    with pytest.raises(SystemExit):  # the mode compiles each scope itself
        bench.parse_args(["--mode", "scope", "--compile"])

    compiled.clear()
    monkeypatch.setattr(models.mae, "_COMPILED", {})
    rows = bench.main(["--mode", "scope", "--batch_size", "8", "--steps", "1", "--rounds", "2", "--warmup_steps", "1",
                       "--peak_tflops", "1.0", "--device", "cpu"])
    assert [row["impl"] for row in rows] == list(bench.COMPILE_SCOPES)
    assert len(compiled) == 2 * num_blocks + 3 + 1  # the blocks twice, the regions once, the whole model once
    assert [row["compile"] for row in rows] == [False, True, True, True] and "speedup_vs_eager" not in rows[0]
    for row in rows[1:]:
        assert row["finite_loss"] and row["speedup_vs_eager"] == pytest.approx(
            rows[0]["step_time_ms"] / row["step_time_ms"], rel=1e-2)


def test_both_models_learn_the_same_task_from_the_same_config():
    """The 🤗 model built for the comparison has our shapes: the same parameter count."""
    config = mae_config("mae_vit_tiny_patch4", mask_ratio=0.75, norm_pix_loss=False)
    ours = sum(p.numel() for p in MaskedAutoencoder(**config).parameters() if p.requires_grad)
    theirs = sum(p.numel() for p in bench.build_hf_mae(config).parameters() if p.requires_grad)
    assert ours == theirs


def test_data_and_memory_modes(fashion_mnist_dir):
    data = bench.main(["--mode", "both", "--batch_size", "16", "--steps", "6", "--warmup_steps", "1",
                       "--max_samples", "64"])  # 4 batches per epoch: the timed steps run into the second epoch
    assert data[0]["mode"] == "both" and data[0]["images_per_sec"] > 0
    loader_only = bench.main(["--mode", "data", "--batch_size", "16", "--steps", "2", "--warmup_steps", "1",
                              "--max_samples", "64"])
    assert loader_only[0]["mode"] == "data" and 0 < loader_only[0]["worker_ms_per_image"] < 1000
    optimizer = {row["impl"]: row for row in bench.main(["--mode", "optimizer", "--steps", "2", "--rounds", "1",
                                                         "--warmup_steps", "1"])}
    assert optimizer["fused"]["fused"] and not optimizer["default"]["fused"]  # (the CPU has the fused kernel)
    assert all(row["step_time_ms"] > 0 and row["parameters"] > 1e6 for row in optimizer.values())
    memory = bench.main(["--mode", "memory", "--memory_batches", "8", "16"])
    by_key = {(row["micro_batch"], row["gradient_checkpointing"]): row["memory_gib"] for row in memory}
    assert by_key[(16, False)] > by_key[(8, False)] > by_key[(8, True)] > 0 and all(map(math.isfinite, by_key.values()))


def test_count_syncs_counts_the_synchronisation_warnings_by_line(tmp_path):
    """bench/count_syncs.py tallies CUDA's sync-debug warnings by the line that made them and lets other warnings
    through (on a CPU nothing synchronises, so a script stands in, warning as torch.cuda.set_sync_debug_mode does)."""
    import subprocess
    import sys

    script = tmp_path / "loop.py"
    script.write_text(
        "import sys, warnings\n"
        "assert sys.argv[1:] == ['--steps', '3']\n"
        "for step in range(3):\n"
        "    warnings.warn('called a synchronizing CUDA operation')\n"
        "warnings.warn('called a synchronizing CUDA operation')\n"
        "warnings.warn('something else')\n"
    )
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "count_syncs.py"), str(script), "--steps", "3"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "synchronising calls: 4 in all, by line (most frequent first):"
    assert [line.split() for line in lines[1:]] == [["3", f"{script}:4"], ["1", f"{script}:5"]]
    assert "something else" in result.stderr


def load_bench(name: str):
    module_spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_decode_routes_give_the_same_crops(tmp_path):
    """PIL and torchvision decode the same files into the same seeded windows: the crops agree to rounding."""
    decode = load_bench("benchmark_decode")
    bench.make_jpegs(tmp_path, 6)
    files = sorted(tmp_path.rglob("*.jpg"))
    encoded, sizes = [f.read_bytes() for f in files], [(375, 500)] * len(files)
    windows = decode.crop_windows(sizes, seed=3)
    assert windows == decode.crop_windows(sizes, seed=3) and windows != decode.crop_windows(sizes, seed=4)
    for top, left, h, w in windows:
        assert 0 <= top and top + h <= 375 and 0 <= left and left + w <= 500
        assert 0.2 * 375 * 500 * 0.99 <= h * w <= 375 * 500 and 3 / 4 * 0.99 <= w / h <= 4 / 3 * 1.01
    device = torch.device("cpu")
    pil = decode.Route("pil", device, 32)(encoded, sizes, seed=3)
    tv = decode.Route("tv_cpu", device, 32)(encoded, sizes, seed=3)
    assert pil.shape == tv.shape == (6, 3, 32, 32) and pil.dtype == tv.dtype == torch.uint8
    assert (pil.float() - tv.float()).abs().mean() < 4  # two resamplers and IDCTs, the same pixels
    other = decode.Route("tv_cpu", device, 32)(encoded, sizes, seed=4)
    assert (other.float() - tv.float()).abs().mean() > 4  # other windows: other crops
    together = decode.Route("tv_cuda_windows", device, 32)(encoded, sizes, seed=3)  # (its decode: here on the CPU)
    assert together.shape == tv.shape and (together.float() - tv.float()).abs().mean() < 4


def test_the_dali_decode_route_cuts_the_same_windows(tmp_path, dali):
    decode = load_bench("benchmark_decode")
    bench.make_jpegs(tmp_path, 4)
    encoded = [f.read_bytes() for f in sorted(tmp_path.rglob("*.jpg"))]
    sizes, device = [(375, 500)] * len(encoded), torch.device("cpu")
    fused = decode.Route("dali_cpu", device, 32)(encoded, sizes, seed=3)
    tv = decode.Route("tv_cpu", device, 32)(encoded, sizes, seed=3)
    assert fused.shape == tv.shape == (4, 3, 32, 32) and fused.dtype == torch.uint8
    assert (fused.float() - tv.float()).abs().mean() < 4  # bicubic against bilinear on the same windows
    assert (decode.Route("tv_cpu", device, 32)(encoded, sizes, seed=4).float() - fused.float()).abs().mean() > 4


def test_attention_backends_agree_where_they_run(capsys):
    attention = load_bench("benchmark_attention")
    q, k, v = (torch.randn(2, 3, 13, 16, requires_grad=True) for _ in range(3))
    seconds = attention.time_backend(attention.BACKENDS["math"], q, k, v, steps=1)
    assert seconds > 0 and q.grad is not None and torch.isfinite(q.grad).all()
    with pytest.raises(RuntimeError):  # cuDNN attention has no CPU kernel: the script reports it as not run
        attention.time_backend(attention.BACKENDS["cudnn"], q, k, v, steps=1)


def test_the_low_precision_residual_variant_keeps_the_blocks_output():
    """--residual_dtype autocast: the block's residual stream in bf16 under autocast, its output that of the fp32
    stream up to bf16 rounding (whether training losses match is for a run to show)."""
    from models.vit import Block

    block = Block(32, 2).eval()
    x = torch.randn(4, 10, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference, low = block(x), bench.low_precision_residual_forward(block, x)
    assert reference.dtype == torch.float32 and low.dtype == torch.bfloat16
    assert torch.allclose(low.float(), reference, atol=0.05, rtol=0.02) and not torch.equal(low.float(), reference)
