"""Mixed precision: transforms, distances and maps stay in float32 when the backbone runs under autocast."""

from __future__ import annotations

import math

import torch

from anomalib_cfa_ncl import FocusDistModel
from anomalib_cfa_ncl.models.focusdist.alignment import similarity_theta, warp


def test_half_precision_parameters_give_a_float32_transform() -> None:
    """On CUDA, autocast runs ``exp`` in float32 and ``tanh`` in half: kornia rejected the mix (seen on an H200)."""
    params = torch.tensor([[0.3, -0.2, 0.1, 0.4]])
    for dtype in (torch.float16, torch.bfloat16):
        theta = similarity_theta(params.to(dtype), math.pi / 4, 0.2, 0.3)
        assert theta.dtype == torch.float32
        assert torch.allclose(theta, similarity_theta(params.to(dtype).float(), math.pi / 4, 0.2, 0.3))


def test_warp_under_autocast_samples_in_float32_and_keeps_the_dtype() -> None:
    images = torch.rand(2, 3, 64, 64)
    theta = similarity_theta(torch.tensor([[0.3, -0.2, 0.1, 0.4]]).expand(2, 4), math.pi / 4, 0.2, 0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = warp(images.bfloat16(), theta)
    assert half.dtype == torch.bfloat16
    assert (half.float() - warp(images, theta)).abs().max() < 2e-2  # bfloat16 rounding of the values only


def test_scores_under_autocast_are_float32_and_close_to_full_precision() -> None:
    torch.manual_seed(0)
    model = FocusDistModel(backbone="resnet18", pre_trained=False, n_features=32, image_alignment=False).eval()
    model.fit_statistics([torch.rand(6, 3, 64, 64)])
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        full = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(images)
    assert mixed.anomaly_map.dtype == torch.float32
    assert mixed.pred_score.dtype == torch.float32
    span = float(full.anomaly_map.max() - full.anomaly_map.min())
    assert (mixed.anomaly_map - full.anomaly_map).abs().max() < 0.1 * span  # only the backbone ran in bfloat16
