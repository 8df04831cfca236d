"""Coarse alignment: transformers, warps and the ICA loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from kornia.geometry.transform import invert_affine_transform
from skimage import data as skimage_data

from anomalib_cfa_ncl.models.focusdist.alignment import (
    SimilarityTransformer,
    compose_theta,
    resize,
    similarity_theta,
    warp,
)
from anomalib_cfa_ncl.models.focusdist.loss import ica_loss


def test_identity_initialised_transformer_returns_its_input() -> None:
    images = torch.rand(3, 3, 48, 48)
    theta = SimilarityTransformer(3).eval()(images)
    assert torch.allclose(theta, torch.eye(2, 3).expand(3, 2, 3))
    assert torch.allclose(warp(images, theta), images, atol=1e-4)  # float32 rounding of the sampling positions


def test_a_pose_shared_by_every_image_is_removed() -> None:
    """Centring: a transform common to the whole batch is no alignment, in training and in evaluation."""
    stn = SimilarityTransformer(3)
    torch.nn.init.normal_(stn.head.bias, std=2.0)  # a shared pose, as the degenerate optimum would learn
    same = torch.rand(1, 3, 48, 48).expand(4, -1, -1, -1)
    identity = torch.eye(2, 3).expand(4, 2, 3)
    stn.train()
    for _ in range(200):  # momentum 0.1: the running mean keeps 0.9^200 (7e-10) of its start, 0.9^100 kept 3e-5
        assert torch.allclose(stn(same), identity, atol=1e-5)
    assert torch.allclose(stn.eval()(same), identity, atol=1e-4)  # the running mean has converged to that pose

    varied = torch.rand(4, 3, 48, 48)
    torch.nn.init.normal_(stn.head.weight, std=0.1)
    params = stn.head(stn.localisation(varied))
    assert torch.allclose(stn.train().centre_pose(params).mean(dim=0), torch.zeros(4), atol=1e-6)


@pytest.mark.parametrize("size", [(8, 8), (16, 12), (64, 64), (40, 56)])
def test_resize_is_the_warp_by_the_identity(size: tuple) -> None:
    """Where nothing moved, the scoring resizes instead of warping: down and up, border values held alike."""
    tensor = torch.randn(2, 5, 16, 16, dtype=torch.float64)
    identity = torch.eye(2, 3, dtype=torch.float64).expand(2, 2, 3)
    expected = warp(tensor, identity, size=size, padding_mode="border")
    assert torch.allclose(resize(tensor, size), expected, atol=1e-10)
    assert resize(tensor.to(torch.bfloat16), size).dtype == torch.bfloat16


def test_compose_and_invert_are_consistent() -> None:
    params = torch.randn(4, 4)
    a = similarity_theta(params, math.pi / 4, math.log(1.25), 0.5)
    b = similarity_theta(torch.randn(4, 4), math.pi / 4, math.log(1.25), 0.5)
    assert torch.allclose(compose_theta(a, invert_affine_transform(a)), torch.eye(2, 3).expand(4, 2, 3), atol=1e-5)
    images = torch.rand(4, 1, 32, 32)
    # warping by a then b equals one warp by compose(a, b), away from the borders
    two_step = warp(warp(images, a, size=(64, 64)), b, size=(64, 64))
    one_step = warp(images, compose_theta(a, b), size=(64, 64))
    assert (two_step - one_step)[..., 16:48, 16:48].abs().mean() < 0.05


def _reference_warp(tensor: torch.Tensor, theta: torch.Tensor, size: tuple[int, int], padding: str) -> torch.Tensor:
    """The warp kornia replaced: torch's ``affine_grid`` and ``grid_sample`` with ``align_corners=False``."""
    grid = F.affine_grid(theta, [tensor.shape[0], tensor.shape[1], *size], align_corners=False)
    return F.grid_sample(tensor, grid, mode="bilinear", padding_mode=padding, align_corners=False)


@pytest.mark.parametrize(
    ("shape", "size"),
    [((3, 64, 64), (64, 64)), ((40, 32, 32), (16, 16)), ((24, 8, 8), (32, 32)), ((1, 17, 23), (64, 48))],
    ids=["image", "feature map to a coarser grid", "feature map to a finer grid", "distance map, odd sizes"],
)
@pytest.mark.parametrize("padding", ["border", "reflection"])
def test_kornia_warp_equals_the_affine_grid_reference(shape: tuple, size: tuple, padding: str) -> None:
    """One normalised transform warps every resolution as torch's reference does: equal up to float rounding."""
    theta = similarity_theta(torch.randn(4, 4, dtype=torch.float64), math.pi / 4, math.log(1.25), 0.5)
    tensor = torch.randn(4, *shape, dtype=torch.float64)
    expected = _reference_warp(tensor, theta, size, padding)
    assert torch.allclose(warp(tensor, theta, size=size, padding_mode=padding), expected, atol=1e-10)
    inverse = _reference_warp(tensor, invert_affine_transform(theta), size, padding)
    assert torch.allclose(warp(tensor, theta, size=size, padding_mode=padding, inverse=True), inverse, atol=1e-10)
    single = warp(tensor.float(), theta.float(), size=size, padding_mode=padding)
    assert (single - expected).abs().max() < 1e-3  # float32: rounding of the sampling positions only


def test_similarity_transform_is_a_scaled_rotation_and_shift() -> None:
    params = torch.randn(5, 4)
    theta = similarity_theta(params, math.pi / 4, math.log(1.25), 0.5)
    angle, scale = math.pi / 4 * torch.tanh(params[:, 0]), 1.25 ** torch.tanh(params[:, 1])
    expected = torch.stack([scale * torch.cos(angle), -scale * torch.sin(angle), scale * torch.sin(angle)], dim=1)
    assert torch.allclose(theta[:, [0, 0, 1], [0, 1, 0]], expected, atol=1e-6)
    assert torch.allclose(theta[:, :, 2], 0.5 * torch.tanh(params[:, 2:4]), atol=1e-6)


def test_transform_stays_within_bounds() -> None:
    theta = similarity_theta(torch.full((2, 4), 100.0), math.pi / 4, math.log(1.25), 0.5)
    scale = torch.linalg.det(theta[:, :, :2]).sqrt()
    assert torch.all(scale <= 1.25 + 1e-5)
    assert torch.all(theta[:, :, 2].abs() <= 0.5 + 1e-6)


def _one_image(size: int = 64) -> torch.Tensor:
    photo = skimage_data.camera()[::8, ::8].astype(np.float32) / 255.0
    image = torch.from_numpy(photo)[None, None]
    return torch.nn.functional.interpolate(image, size=(size, size), mode="bilinear").expand(1, 3, size, size)


def test_image_transformer_learns_to_undo_random_poses() -> None:
    torch.manual_seed(0)
    batch = 16
    angles = torch.empty(batch).uniform_(-0.35, 0.35)  # +-20 degrees
    shifts = torch.empty(batch, 2).uniform_(-0.15, 0.15)
    applied = torch.zeros(batch, 2, 3)
    applied[:, 0, 0], applied[:, 0, 1] = torch.cos(angles), -torch.sin(angles)
    applied[:, 1, 0], applied[:, 1, 1] = torch.sin(angles), torch.cos(angles)
    applied[:, :, 2] = shifts
    images = warp(_one_image().expand(batch, -1, -1, -1), applied, padding_mode="border")

    stn = SimilarityTransformer(3, hidden=8)
    optimiser = torch.optim.Adam(stn.parameters(), lr=3e-3)
    initial = ica_loss(images).item()
    for _ in range(150):
        optimiser.zero_grad()
        loss = ica_loss(warp(images, stn(images), padding_mode="border"))
        loss.backward()
        optimiser.step()
    stn.eval()
    with torch.no_grad():
        final = ica_loss(warp(images, stn(images), padding_mode="border")).item()
        total = compose_theta(applied, stn(images))  # input pose followed by the predicted correction
    assert final < 0.5 * initial
    # the residual pose after correction varies far less across the batch than the applied one
    residual_angle = torch.atan2(total[:, 1, 0], total[:, 0, 0])
    assert residual_angle.std() < 0.4 * angles.std()
    assert total[:, :, 2].std(dim=0).mean() < 0.5 * shifts.std(dim=0).mean()
