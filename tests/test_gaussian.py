"""Streaming per-location Gaussian against a numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomalib_cfa_ncl.models.focusdist.gaussian import StreamingGaussian


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
