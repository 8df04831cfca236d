"""Streaming per-location Gaussian against a numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomalib_cfa_ncl.models.focusdist.gaussian import (
    CPU_LOCATION_CHUNK,
    SCALE_BOUNDS,
    StreamingGaussian,
    calibration_scale,
)


def _reference(samples: np.ndarray, regularization: float) -> tuple[np.ndarray, np.ndarray]:
    """samples (N, D, L) -> mean (L, D), precision (L, D, D) with the same relative ridge."""
    covariances = np.stack([np.cov(samples[:, :, loc], rowvar=False) for loc in range(samples.shape[2])])
    ridge = regularization * np.mean([np.diag(c).mean() for c in covariances]) + 1e-6
    eye = np.eye(samples.shape[1])
    precisions = np.stack([np.linalg.inv(c + ridge * eye) for c in covariances])
    return samples.mean(axis=0).T, precisions


@pytest.mark.parametrize("storage", ["float32", "float16"])
def test_streaming_fit_matches_numpy(storage: str) -> None:
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(5, 5))  # correlated channels
    samples = np.einsum("nfl,fg->ngl", rng.normal(size=(40, 5, 6)), mixing) + 3 * rng.normal(size=(1, 5, 6))
    gaussian = StreamingGaussian(regularization=0.01, storage_dtype=storage)
    tensor = torch.from_numpy(samples).float().reshape(40, 5, 2, 3)
    for chunk in tensor.split(7):  # several uneven batches
        gaussian.update(chunk)
    gaussian.finalize()
    mean, precision = _reference(samples, 0.01)
    assert np.allclose(gaussian.mean.numpy(), mean, atol=1e-5)
    stored = (gaussian.precision.float() * gaussian.precision_scale[:, None, None]).numpy()
    tolerance = 1e-4 if storage == "float32" else 2e-3
    assert np.allclose(stored, precision, rtol=tolerance, atol=tolerance * np.abs(precision).max())
    x = torch.randn(3, 5, 2, 3)
    delta = x.reshape(3, 5, 6).permute(0, 2, 1).numpy() - mean[None]
    expected = np.sqrt(np.einsum("bld,lde,ble->bl", delta, precision, delta)).reshape(3, 2, 3)
    assert np.allclose(gaussian.mahalanobis(x).numpy(), expected, rtol=10 * tolerance)


def test_eager_distances_by_chunks_of_locations_equal_the_exported_single_product(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)
    gaussian = StreamingGaussian(shrinkage=0.3)
    gaussian.update(torch.randn(30, 6, 5, 5))
    gaussian.finalize()
    gaussian.calibrate(torch.rand(25) + 0.5)
    assert 25 % CPU_LOCATION_CHUNK != 0  # several chunks, the last one shorter
    x = torch.randn(3, 6, 5, 5)
    eager = gaussian.mahalanobis(x)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    assert torch.equal(eager, gaussian.mahalanobis(x))  # bit for bit: same products per location


def test_one_image_and_constant_images_stay_invertible_and_finite() -> None:
    gaussian = StreamingGaussian()
    gaussian.update(torch.ones(1, 4, 3, 3))
    gaussian.finalize()
    assert torch.isfinite(gaussian.mahalanobis(torch.randn(2, 4, 3, 3))).all()


def test_large_offsets_do_not_lose_precision() -> None:
    """float64 sums keep the covariance of small variations on a large mean."""
    torch.manual_seed(0)
    base = torch.randn(1, 3, 1, 1) * 1e3
    samples = base + torch.randn(4000, 3, 1, 1)
    gaussian = StreamingGaussian(storage_dtype="float32")
    for chunk in samples.split(500):
        gaussian.update(chunk)
    gaussian.finalize()
    precision = gaussian.precision[0] * gaussian.precision_scale[0]
    assert torch.allclose(torch.diagonal(precision), torch.ones(3), rtol=0.1)


def test_finalize_without_images_says_what_to_do() -> None:
    with pytest.raises(ValueError, match="at least one normal image"):
        StreamingGaussian().finalize()


def test_neighbourhood_fit_pools_the_samples_of_neighbouring_locations() -> None:
    """With a 3x3 neighbourhood, each location's Gaussian is numpy's fit on its neighbours' samples together."""
    rng = np.random.default_rng(1)
    height, width, dim, count = 3, 4, 3, 30
    samples = rng.normal(size=(count, dim, height, width)) + rng.normal(size=(1, dim, height, width))
    gaussian = StreamingGaussian(regularization=0.01, storage_dtype="float32", neighbourhood=3)
    for chunk in torch.from_numpy(samples).float().split(8):
        gaussian.update(chunk)
    gaussian.finalize()
    pooled = []
    for row in range(height):
        for col in range(width):
            window = samples[:, :, max(row - 1, 0) : row + 2, max(col - 1, 0) : col + 2]
            pooled.append(window.transpose(0, 2, 3, 1).reshape(-1, dim))
    covariances = [np.cov(x, rowvar=False) for x in pooled]
    ridge = 0.01 * np.mean([np.diag(c).mean() for c in covariances]) + 1e-6
    precisions = np.stack([np.linalg.inv(c + ridge * np.eye(dim)) for c in covariances])
    assert np.allclose(gaussian.mean.numpy(), np.stack([x.mean(axis=0) for x in pooled]), atol=1e-5)
    stored = (gaussian.precision * gaussian.precision_scale[:, None, None]).numpy()
    assert np.allclose(stored, precisions, rtol=1e-4, atol=1e-4 * np.abs(precisions).max())
    with pytest.raises(ValueError, match="odd number"):
        StreamingGaussian(neighbourhood=2)


def _precision(gaussian: StreamingGaussian) -> torch.Tensor:
    return gaussian.precision.float() * gaussian.precision_scale[:, None, None]


def test_shrinkage_blends_each_location_with_the_mean_covariance() -> None:
    rng = np.random.default_rng(1)
    samples = rng.normal(size=(40, 4, 6)) * rng.uniform(0.5, 3.0, size=(1, 4, 6))  # each location its own scales
    tensor = torch.from_numpy(samples).float().reshape(40, 4, 2, 3)
    fitted = {}
    for shrinkage in (0.0, 0.3, 1.0):
        gaussian = StreamingGaussian(regularization=0.0, storage_dtype="float32", shrinkage=shrinkage)
        gaussian.update(tensor)
        gaussian.finalize()
        fitted[shrinkage] = gaussian
    own = np.stack([np.cov(samples[:, :, loc], rowvar=False) for loc in range(6)])
    for shrinkage, gaussian in fitted.items():
        expected = (1 - shrinkage) * own + shrinkage * own.mean(axis=0)
        covariance = torch.linalg.inv(_precision(gaussian).double()).numpy()
        assert np.allclose(covariance, expected, rtol=1e-3, atol=1e-4), shrinkage
        assert np.allclose(gaussian.mean.numpy(), samples.mean(axis=0).T, atol=1e-5)  # means stay per location
    shared = _precision(fitted[1.0])
    assert torch.allclose(shared, shared[:1].expand_as(shared), rtol=1e-4, atol=1e-5)


def test_variants_from_one_set_of_sums_equal_separate_fits() -> None:
    embeddings = torch.randn(30, 5, 3, 3)
    running = StreamingGaussian(neighbourhood=3)
    running.update(embeddings)
    variants = running.finalize_variants([0.0, 0.5])
    assert running.running_sum is None  # the sums are consumed
    for variant, shrinkage in zip(variants, (0.0, 0.5), strict=True):
        separate = StreamingGaussian(neighbourhood=3, shrinkage=shrinkage)
        separate.update(embeddings)
        separate.finalize()
        assert variant.shrinkage == shrinkage
        torch.testing.assert_close(variant.mean, separate.mean)
        torch.testing.assert_close(_precision(variant), _precision(separate))


@pytest.mark.parametrize("shrinkage", [-0.1, 1.5, float("nan")])
def test_shrinkage_outside_zero_to_one_is_refused(shrinkage: float) -> None:
    with pytest.raises(ValueError, match=r"covariance_shrinkage must lie in \[0, 1\]"):
        StreamingGaussian(shrinkage=shrinkage)


def test_calibration_divides_each_locations_distance_and_checks_its_scale() -> None:
    gaussian = StreamingGaussian(storage_dtype="float32")
    gaussian.update(torch.randn(20, 4, 2, 3))
    gaussian.finalize()
    x = torch.randn(2, 4, 2, 3)
    raw = gaussian.mahalanobis(x)
    scale = torch.tensor([1.0, 2.0, 0.5, 1.0, 1.0, 4.0])
    gaussian.calibrate(scale)
    torch.testing.assert_close(gaussian.mahalanobis(x), raw / scale.view(2, 3))
    with pytest.raises(ValueError, match="one scale per fitted location"):
        gaussian.calibrate(torch.ones(5))
    with pytest.raises(ValueError, match="positive"):
        gaussian.calibrate(torch.zeros(6))
    with pytest.raises(ValueError, match="fit the Gaussian first"):
        StreamingGaussian().calibrate(torch.ones(6))


def test_calibration_scale_is_relative_bounded_and_neutral_without_distances() -> None:
    torch.testing.assert_close(calibration_scale(torch.tensor([[2.0, 6.0]]), 2), torch.tensor([0.5, 1.5]))
    near_zero = calibration_scale(torch.tensor([[1e-6, 10.0, 10.0, 10.0]]), 1)
    assert float(near_zero.min()) == SCALE_BOUNDS[0]  # a constant background is not magnified
    assert bool((calibration_scale(torch.zeros(2, 2), 3) == 1).all())
    assert bool((calibration_scale(torch.ones(2, 2), 0) == 1).all())
