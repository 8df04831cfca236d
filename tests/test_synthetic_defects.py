"""The synthetic defects the gate decides on: reproducible, local, and thin where they should be."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812

from anomalib_cfa_ncl.models.focusdist.synthetic_defects import anomalous_copies, perlin_anomalies, thin_anomalies


def _images(count: int = 6, size: int = 128) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(3))


def test_thin_defects_are_reproducible_and_leave_the_global_random_state_alone() -> None:
    images = _images()
    torch.manual_seed(5)
    expected_next = torch.rand(1)
    torch.manual_seed(5)
    first = thin_anomalies(images)
    assert torch.equal(torch.rand(1), expected_next)
    second = thin_anomalies(images)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_thin_defects_change_only_their_masks_pixels_and_are_thin() -> None:
    images = _images()
    anomalous, masks = thin_anomalies(images)
    assert masks.shape == (6, 128, 128) and masks.dtype == torch.bool
    assert bool(masks.flatten(1).any(dim=1).all())  # every image has one
    outside = ~masks[:, None].expand_as(images)
    assert torch.equal(anomalous[outside], images[outside])
    assert float((anomalous - images).abs().amax()) > 0.05
    # thin: eroding by a 5x5 window (what a line at most 4 px wide cannot fill) leaves almost nothing
    eroded = -F.max_pool2d(-masks[:, None].float(), 5, stride=1, padding=2)
    assert float(eroded.sum()) <= 0.05 * float(masks.sum())
    assert float(masks.float().mean()) < 0.05


def test_thin_defects_are_thinner_than_the_perlin_blobs() -> None:
    images = _images()
    eroded = [
        float((-F.max_pool2d(-masks[:, None].float(), 5, stride=1, padding=2)).sum() / masks.sum())
        for _, masks in (perlin_anomalies(images), thin_anomalies(images))
    ]
    assert eroded[1] < 0.05 < eroded[0]  # blobs keep most of their area under the same erosion


def test_defects_in_normalised_images_are_drawn_in_their_pixel_values() -> None:
    """anomalib's generator is made for ``[0, 1]`` images: its fill blended into normalised values is another defect."""
    pixels = _images()
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    normalised = (pixels - mean.view(3, 1, 1)) / std.view(3, 1, 1)
    in_pixels = anomalous_copies(pixels)
    for (anomalous, masks), (expected, expected_masks) in zip(
        anomalous_copies(normalised, (mean, std)), in_pixels, strict=True
    ):
        assert torch.equal(masks, expected_masks)
        inside = masks[:, None].expand_as(pixels)
        assert torch.equal(anomalous[~inside], normalised[~inside])  # the rest keeps its exact values
        restored = anomalous * std.view(3, 1, 1) + mean.view(3, 1, 1)
        assert torch.allclose(restored[inside], expected[inside], atol=1e-5)
    # without the normalisation the same defects land elsewhere in value: the argument is not a no-op
    naive, _ = perlin_anomalies(normalised)
    perlin, masks = anomalous_copies(normalised, (mean, std))[0]
    inside = masks[:, None].expand_as(pixels)
    assert float((naive - perlin)[inside].abs().mean()) > 0.1


def test_images_in_pixel_values_get_both_families_unchanged() -> None:
    images = _images()
    for (anomalous, masks), (expected, expected_masks) in zip(
        anomalous_copies(images), (perlin_anomalies(images), thin_anomalies(images)), strict=True
    ):
        assert torch.equal(anomalous, expected) and torch.equal(masks, expected_masks)
