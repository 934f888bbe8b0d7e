"""models/pca.py: PCA-filtered targets on data of known structure, and their use in pretrain_mae.py."""
import pytest
import torch

from conftest import read_metrics, run_script
from models.pca import PCABasis, fit_pca, pca_target


def low_rank_images(count=400, rank=6, shape=(1, 8, 8), seed=0):
    """Images = mean + sum of `rank` fixed patterns with decreasing scales + a little noise."""
    generator = torch.Generator().manual_seed(seed)
    dim = shape[0] * shape[1] * shape[2]
    patterns = torch.linalg.qr(torch.randn(dim, rank, generator=generator))[0].T  # orthonormal (rank, D)
    scales = torch.tensor([2.0 ** -k for k in range(rank)]) * 4
    codes = torch.randn(count, rank, generator=generator) * scales
    data = 0.5 + codes @ patterns + 0.001 * torch.randn(count, dim, generator=generator)
    return data.view(count, *shape)


def test_top_and_bottom_targets_split_the_image_and_keep_the_requested_variance():
    images = low_rank_images()
    basis = fit_pca(images)
    for share in (0.25, 0.5, 0.9):
        top, bottom = pca_target(images, basis, "pca_top", share), pca_target(images, basis, "pca_bottom", 1 - share)
        torch.testing.assert_close(top + bottom, images, rtol=0, atol=1e-4)  # they add up to the image
        top_centred = (top - basis.mean.view(1, 1, 8, 8)).flatten(1)
        assert (top_centred * bottom.flatten(1)).sum(1).abs().max() < 1e-3  # and are orthogonal
        kept = top_centred.pow(2).sum() / (len(images) - 1) / basis.total_variance
        step = basis.variances[: basis.count_for_share(share)][-1] / basis.total_variance
        assert share - 1e-6 <= kept <= share + step + 1e-6  # the requested share, within one component
    bottom_variance = pca_target(images, basis, "pca_bottom", 0.25).flatten(1).pow(2).sum() / (len(images) - 1)
    assert bottom_variance / basis.total_variance <= 0.25 + 1e-6


def test_randomized_top_components_match_an_exact_svd():
    images = low_rank_images(count=300, rank=5, shape=(3, 8, 8))
    exact, fast = fit_pca(images, num_components=5), fit_pca(images, num_components=5, randomized=True)
    torch.testing.assert_close(fast.variances, exact.variances, rtol=1e-3, atol=1e-6)
    projector = lambda basis: basis.components.T @ basis.components  # noqa: E731  (sign-free comparison)
    torch.testing.assert_close(projector(fast), projector(exact), rtol=0, atol=1e-3)


def test_basis_round_trips_through_safetensors(tmp_path):
    basis = fit_pca(low_rank_images(), num_components=4)
    basis.save(tmp_path / "pca.safetensors")
    loaded = PCABasis.load(tmp_path / "pca.safetensors")
    assert loaded.shape == (1, 8, 8) and loaded.total_variance == basis.total_variance
    assert torch.equal(loaded.components, basis.components)


@pytest.mark.slow
def test_pca_bottom_pretraining_fits_saves_and_reuses_the_basis(tmp_path, fashion_mnist_dir):
    common = ["--target", "pca_bottom", "--pca_samples", 500, "--max_samples", 256, "--per_gpu_batch_size", 64,
              "--encoder_embed_dim", 32, "--encoder_depth", 1, "--encoder_num_heads", 2, "--decoder_embed_dim", 16,
              "--decoder_depth", 1, "--decoder_num_heads", 2, "--log_with", "none", "--working_directory", tmp_path]
    run_script("pretrain_mae.py", *common, "--max_train_steps", 4, "--log_every", 1, "--experiment_name", "bottom")
    basis = PCABasis.load(tmp_path / "bottom" / "pca.safetensors")
    assert basis.shape == (1, 28, 28) and all(torch.isfinite(torch.tensor(r["loss"])) for r in read_metrics(tmp_path / "bottom"))
    run_script("pretrain_mae.py", *common, "--max_train_steps", 1, "--experiment_name", "reuse",
               "--pca_path", tmp_path / "bottom" / "pca.safetensors")
    bad = run_script("pretrain_mae.py", *common, "--max_train_steps", 1, "--experiment_name", "bad", "--img_size", 32,
                     "--pca_path", tmp_path / "bottom" / "pca.safetensors", check=False)
    assert bad.returncode == 2 and "was fitted on (1, 28, 28) images, this run has (1, 32, 32)" in bad.stderr
    wrong = run_script("pretrain_mae.py", *common, "--pca_variance", 1.5, "--experiment_name", "x", check=False)
    assert wrong.returncode == 2 and "--pca_variance must be in (0, 1)" in wrong.stderr


def test_eigenspace_errors_split_the_error_between_top_and_bottom():
    from models.pca import eigenspace_errors

    images = low_rank_images()
    basis = fit_pca(images)
    mask = torch.ones_like(images)
    assert eigenspace_errors(images, images, mask, basis, 0.25) == (0.0, 0.0)
    along_top = images + 0.3 * basis.components[0].view(1, 1, 8, 8)  # an error in the first component only
    top, bottom = eigenspace_errors(along_top, images, mask, basis, 0.25)
    assert top == pytest.approx(0.09 / 64, rel=1e-3) and bottom < 1e-9


def test_eigenspace_metrics_are_logged_during_pretraining(tmp_path, fashion_mnist_dir):
    run_script("pretrain_mae.py", "--eigenspace_metrics", "--pca_samples", 300, "--max_samples", 128,
               "--per_gpu_batch_size", 64, "--epochs", 1, "--encoder_embed_dim", 32, "--encoder_depth", 1,
               "--encoder_num_heads", 2, "--decoder_embed_dim", 16, "--decoder_depth", 1, "--decoder_num_heads", 2,
               "--log_with", "none", "--working_directory", tmp_path, "--experiment_name", "eigen")
    rows = read_metrics(tmp_path / "eigen", reconstruction_rows=True)
    assert rows and rows[-1]["val_error_top"] > 0 and rows[-1]["val_error_bottom"] > 0
    assert (tmp_path / "eigen" / "pca.safetensors").exists()
