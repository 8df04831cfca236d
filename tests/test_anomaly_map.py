"""The anomaly map: resize (or inverse warp) and blur, as two matrix products per map."""

from __future__ import annotations

import pytest
import torch
from kornia.filters import GaussianBlur2d

from anomalib_cfa_ncl.models.focusdist.alignment import resize, warp
from anomalib_cfa_ncl.models.focusdist.anomaly_map import AnomalyMapGenerator


def _kornia_blur(sigma: float, side: int) -> GaussianBlur2d:
    return GaussianBlur2d((side, side), (sigma, sigma), border_type="reflect", separable=True)


@pytest.mark.parametrize(("grid", "size", "sigma"), [((32, 32), (256, 256), 4.0), ((20, 24), (160, 192), 2.0)])
def test_the_map_is_the_blurred_resize(grid: tuple[int, int], size: tuple[int, int], sigma: float) -> None:
    generator = AnomalyMapGenerator(sigma)
    distance = torch.rand(3, *grid, generator=torch.Generator().manual_seed(0)) * 5
    distance[1, 4, 7] = 40.0  # a sharp peak: the border and the tails of the blur matter
    expected = _kornia_blur(sigma, generator.side)(resize(distance.unsqueeze(1), size))
    torch.testing.assert_close(generator(distance, None, size), expected, atol=1e-5, rtol=1e-5)


def test_the_map_is_the_blurred_inverse_warp() -> None:
    generator = AnomalyMapGenerator()
    distance = torch.rand(2, 32, 32, generator=torch.Generator().manual_seed(1)) * 5
    theta = torch.tensor([[[0.9, 0.1, 0.05], [-0.1, 0.9, 0.0]], [[1.1, 0.0, -0.1], [0.0, 1.1, 0.1]]])
    warped = warp(distance.unsqueeze(1), theta, size=(256, 256), padding_mode="border", inverse=True)
    expected = _kornia_blur(4.0, generator.side)(warped)
    torch.testing.assert_close(generator(distance, theta, (256, 256)), expected, atol=1e-5, rtol=1e-5)


def test_the_map_is_float32_for_half_distances() -> None:
    generator = AnomalyMapGenerator()
    anomaly_map = generator(torch.rand(1, 32, 32).half(), None, (256, 256))
    assert anomaly_map.dtype == torch.float32 and anomaly_map.shape == (1, 1, 256, 256)
