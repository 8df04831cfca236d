"""The alignment gate: scoring frame chosen on held-back training images with synthetic anomalies."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from skimage import data as skimage_data
from torch import nn
from torchmetrics.functional.classification import binary_auroc

from anomalib_cfa_ncl import FocusDistModel
from anomalib_cfa_ncl.models.focusdist.alignment import similarity_theta, warp
from anomalib_cfa_ncl.models.focusdist.gate import (
    MAX_HELD_BACK,
    RESAMPLES,
    _decide_pooling,
    bootstrap_aurocs,
    cross_calibrated,
    held_back_mask,
    resampled_separations,
    separation,
)
from anomalib_cfa_ncl.models.focusdist.gaussian import calibration_scale
from anomalib_cfa_ncl.models.focusdist.pooling import GridPooling

SIZE = 64


def _photo() -> torch.Tensor:
    photo = torch.from_numpy(skimage_data.astronaut().astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    return F.interpolate(photo, size=(SIZE, SIZE), mode="area")


class KnownPoses(nn.Module):
    """Stands in for a trained image transformer: returns the transform of the nearest known image."""

    def __init__(self, images: torch.Tensor, thetas: torch.Tensor) -> None:
        super().__init__()
        self.images, self.thetas = images, thetas

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        distances = torch.cdist(images.flatten(1), self.images.flatten(1))
        return self.thetas[distances.argmin(dim=1)]


def _model_with_poses(images: torch.Tensor, thetas: torch.Tensor) -> FocusDistModel:
    torch.manual_seed(0)
    model = FocusDistModel(
        backbone="resnet18", pre_trained=False, feature_alignment=False, ncl=False, n_features=64, patch_bank=0
    )
    model.image_transformer = KnownPoses(images, thetas)
    return model


def _posed(count: int, strength: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of one photo under random similarity poses, and the transforms that undo them."""
    generator = torch.Generator().manual_seed(seed)
    params = strength * torch.randn(count, 4, generator=generator)
    poses = similarity_theta(params, math.pi / 4, math.log(1.25), 0.5)
    images = warp(_photo().expand(count, -1, -1, -1), poses, padding_mode="reflection")
    # the transform that undoes a pose: warping by its inverse maps the posed image back onto the photo
    linear = torch.linalg.inv(poses[:, :, :2])
    undo = torch.cat([linear, -(linear @ poses[:, :, 2:])], dim=2)
    return images, undo


def test_held_back_images_are_every_fifth_and_bounded() -> None:
    first = held_back_mask(0, 12, already_held=0)
    assert first.nonzero().flatten().tolist() == [0, 5, 10]
    assert held_back_mask(12, 8, already_held=3).nonzero().flatten().tolist() == [3]  # image 15
    assert int(held_back_mask(0, 10 * MAX_HELD_BACK, already_held=MAX_HELD_BACK - 1).sum()) == 1


def test_gate_keeps_an_alignment_that_undoes_the_poses() -> None:
    images, undo = _posed(120, strength=1.0)  # 24 held back: enough to tell beyond noise, calibrated or not
    model = _model_with_poses(images, undo)
    model.fit_statistics([images])
    separation_input, separation_aligned = model.alignment_gate.separation.tolist()
    assert separation_aligned > separation_input
    assert bool(model.alignment_gate.enabled)


def test_gate_drops_an_alignment_that_scrambles_aligned_images() -> None:
    """Images already in one pose: a transformer that moves each differently only blurs the statistics."""
    images = _photo().expand(30, -1, -1, -1) + 0.01 * torch.randn(30, 3, SIZE, SIZE)
    generator = torch.Generator().manual_seed(1)
    scramble = similarity_theta(0.6 * torch.randn(30, 4, generator=generator), math.pi / 4, math.log(1.25), 0.5)
    model = _model_with_poses(images, scramble)
    model.fit_statistics([images])
    separation_input, separation_aligned = model.alignment_gate.separation.tolist()
    assert separation_input > separation_aligned
    assert not bool(model.alignment_gate.enabled)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.align_images(images[:2])[0], images[:2])  # evaluation uses the input frame


def test_the_input_frame_runs_no_image_transformer(monkeypatch) -> None:
    """In PyTorch and in an exported graph: the export fixes the decision, without which it keeps both frames."""
    images = _photo().expand(6, -1, -1, -1)
    model = _model_with_poses(images, similarity_theta(torch.zeros(6, 4), math.pi / 4, math.log(1.25), 0.5)).eval()
    calls: list[int] = []
    model.image_transformer.register_forward_hook(lambda *_: calls.append(1))
    gate = model.alignment_gate
    model.align_images(images)
    assert calls == [1]  # kept (the decision before any fit)
    gate.enabled.fill_(False)
    assert torch.equal(model.align_images(images)[0], images) and calls == [1]
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)  # a traced buffer has no value to branch on
    assert not gate.chose_input_frame()
    with gate.decision_fixed():
        assert gate.chose_input_frame()
        model.align_images(images)
    assert calls == [1] and gate.exported_decision is None


def test_gate_keeps_the_input_frame_and_says_why_without_enough_images(caplog) -> None:
    images, undo = _posed(4, strength=0.6)
    model = _model_with_poses(images, undo)
    with caplog.at_level(logging.INFO):
        model.fit_statistics([images])
    assert not bool(model.alignment_gate.enabled)
    assert torch.isnan(model.alignment_gate.separation).all()
    assert "too few to tell whether the image alignment helps" in caplog.text


def test_gate_keeps_the_input_frame_for_identical_images() -> None:
    """Nothing to align: both frames score alike, and a tie keeps the input frame."""
    images = _photo().expand(20, -1, -1, -1).clone()
    model = _model_with_poses(images, similarity_theta(torch.zeros(20, 4), math.pi / 4, math.log(1.25), 0.5))
    model.fit_statistics([images])
    assert not bool(model.alignment_gate.enabled)


def _unaligned_model(
    shrinkage: float = 0.3, calibration: bool = True, grid_pooling: int = 5, patch_bank: int = 0
) -> FocusDistModel:
    torch.manual_seed(0)
    return FocusDistModel(
        backbone="resnet18",
        pre_trained=False,
        image_alignment=False,
        n_features=64,
        covariance_shrinkage=shrinkage,
        distance_calibration=calibration,
        grid_pooling=grid_pooling,
        patch_bank=patch_bank,
    )


def test_a_part_in_a_fixed_pose_keeps_each_locations_own_covariance(caplog) -> None:
    """Without an image transformer the held-back images still decide the shrinkage: a photo's locations differ."""
    noise = torch.randn(40, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    images = _photo().expand(40, -1, -1, -1) + 0.05 * noise
    model = _unaligned_model()
    with caplog.at_level(logging.INFO):
        model.fit_statistics([images])
    assert model.gaussian.shrinkage == 0.0
    assert "shrinkage 0 used" in caplog.text


def test_the_chosen_shrinkage_is_the_one_fitted() -> None:
    images = torch.rand(20, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    model = _unaligned_model(shrinkage=1.0)
    model.fit_statistics([images])
    reference = _unaligned_model(shrinkage=model.gaussian.shrinkage)
    reference.grid_pooling.enabled.copy_(model.grid_pooling.enabled)
    reference.gaussian.update(reference.eval().embed(images)[0].detach())
    reference.gaussian.finalize()
    torch.testing.assert_close(model.gaussian.precision, reference.gaussian.precision)


def test_identical_images_keep_each_locations_own_covariance() -> None:
    """Nothing varies, so shrinking changes no score: a tie keeps the unshrunk covariance."""
    model = _unaligned_model()
    model.fit_statistics([_photo().expand(20, -1, -1, -1).clone()])
    assert model.gaussian.shrinkage == 0.0


def test_without_any_choice_or_calibration_no_image_is_held_back(monkeypatch) -> None:
    model = _unaligned_model(shrinkage=0.0, calibration=False, grid_pooling=1)
    monkeypatch.setattr("anomalib_cfa_ncl.models.focusdist.torch_model.choose_scoring", _fail)
    model.fit_statistics([torch.rand(10, 3, SIZE, SIZE)])  # one pass, nothing to decide
    assert model.gaussian.is_fitted
    assert bool((model.gaussian.location_scale == 1).all())


def test_calibration_evens_out_the_normal_distances_of_the_border() -> None:
    """Held-back normal images score higher at the border; calibrated, their border and interior score alike."""
    images = _noise_texture(60)
    profiles = {}
    for calibration in (False, True):
        model = _unaligned_model(shrinkage=0.0, calibration=calibration)
        model.fit_statistics([images])
        with torch.no_grad():
            distance = model.gaussian.mahalanobis(model.embed(_noise_texture(20, seed=1))[0]).mean(dim=0)
        ring = torch.ones_like(distance, dtype=torch.bool)
        ring[1:-1, 1:-1] = False
        profiles[calibration] = float(distance[ring].mean() / distance[~ring].mean())
    assert profiles[False] > 1.1  # the problem: the border of unseen normal images scores higher
    assert abs(profiles[True] - 1.0) < abs(profiles[False] - 1.0) / 2


def test_calibration_is_cross_fitted_no_image_calibrates_itself() -> None:
    """Each held-back image is divided by the scale of the images of the other parity only."""
    normal = torch.ones(4, 2, 2)
    normal[1::2, 0, 0] = 3.0  # odd images: location 0 is three times as far
    anomalous = 2 * normal
    calibrated_normal, calibrated_anomalous = cross_calibrated(normal, anomalous)
    odd_scale = calibration_scale(normal[1::2].sum(0), 2).view(2, 2)  # mean distances 3, 1, 1, 1 -> 2, 2/3, ...
    torch.testing.assert_close(calibrated_normal[0], normal[0] / odd_scale)
    torch.testing.assert_close(calibrated_normal[1], normal[1])  # even images are all ones: scale 1
    torch.testing.assert_close(calibrated_anomalous, 2 * calibrated_normal)


def _noise_texture(count: int, seed: int = 0) -> torch.Tensor:
    """Smooth random texture crops: every position alike, so only the border differs."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(count, 3, SIZE // 4, SIZE // 4, generator=generator)
    return F.interpolate(noise, size=(SIZE, SIZE), mode="bilinear", align_corners=False)


def _fail(*_args: object) -> None:
    msg = "nothing to decide: choose_scoring must not run"
    raise AssertionError(msg)


def test_separation_of_large_distances_is_not_squashed() -> None:
    """Mahalanobis distances are often 20 to 40: perfectly separated ones must give AUROC 1, not a sigmoid's ties."""
    normal = (torch.tensor([30.0, 31.0]), torch.full((2, 4, 4), 30.0))
    anomalous_maps = torch.full((2, 4, 4), 30.0)
    anomalous_maps[:, :2] = 45.0
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[:, :2] = True
    assert float(separation(normal, (torch.tensor([40.0, 41.0]), anomalous_maps), masks)) == 2.0


def test_calibration_is_dropped_where_the_held_back_images_score_worse_with_it(monkeypatch, caplog) -> None:
    """The calibration is the default, but a held-back verdict against it beyond noise leaves the distances raw."""
    model = _unaligned_model(shrinkage=0.0)
    model.fit_statistics([_noisy_photo()])
    assert not bool((model.gaussian.location_scale == 1).all())  # kept here: it scores the held-back images better

    def swapped(normal: torch.Tensor, *anomalous: torch.Tensor, reduce: object = None) -> tuple:
        return anomalous[0], *(normal for _ in anomalous)  # a "calibration" that makes normal images look anomalous

    monkeypatch.setattr("anomalib_cfa_ncl.models.focusdist.gate.cross_calibrated", swapped)
    model = _unaligned_model(shrinkage=0.0)
    with caplog.at_level(logging.INFO, logger="anomalib_cfa_ncl"):
        model.fit_statistics([_noisy_photo()])
    assert caplog.text.splitlines()[-1].endswith(": uncalibrated.")
    assert bool((model.gaussian.location_scale == 1).all())


def _noisy_photo(count: int = 60) -> torch.Tensor:
    """A photo in a fixed pose with pixel noise: synthetic anomalies on it stand out clearly."""
    noise = torch.randn(count, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    return _photo().expand(count, -1, -1, -1) + 0.05 * noise


def test_weighted_aurocs_equal_scoring_each_resample_itself() -> None:
    """One sort for all resamples gives what torchmetrics gives on each resample's own copies, ties included."""
    generator = torch.Generator().manual_seed(3)
    count, per_image = 12, 50
    scores = torch.randint(0, 20, (count * per_image,), generator=generator).float()  # many ties
    labels = torch.rand(count * per_image, generator=generator) < 0.3
    image_index = torch.arange(count).repeat_interleave(per_image)
    resamples = torch.randint(count, (5, count), generator=generator)
    weights = torch.stack([torch.bincount(row, minlength=count) for row in resamples]).double()
    for row, auroc in zip(resamples, bootstrap_aurocs(scores, labels, image_index, weights), strict=True):
        drawn = torch.cat([torch.nonzero(image_index == image).flatten() for image in row])
        expected = binary_auroc(scores[drawn] / scores.max(), labels[drawn].long())
        assert float(auroc) == pytest.approx(float(expected), abs=1e-6)


def test_a_resample_without_one_class_scores_zero_as_torchmetrics_does() -> None:
    scores, labels = torch.rand(4), torch.tensor([False, False, True, True])
    weights = torch.tensor([[1.0, 1.0, 0.0, 0.0]])  # draws only the normal images
    assert float(bootstrap_aurocs(scores, labels, torch.arange(4), weights)[0]) == 0.0


def test_the_first_separation_is_of_all_images_the_others_of_the_resamples() -> None:
    generator = torch.Generator().manual_seed(4)
    normal = (torch.rand(6, generator=generator), torch.rand(6, 8, 8, generator=generator))
    anomalous = (torch.rand(6, generator=generator) + 0.2, torch.rand(6, 8, 8, generator=generator) + 0.1)
    masks = torch.rand(6, 8, 8, generator=generator) > 0.5
    resamples = torch.tensor([[0, 0, 1, 2, 3, 3], [5, 4, 4, 4, 1, 0]])
    separations = resampled_separations(normal, anomalous, masks, resamples)
    assert separations.shape == (3,)
    torch.testing.assert_close(separations[0], separation(normal, anomalous, masks))
    for row, indices in zip(separations[1:], resamples, strict=True):
        picked = separation(
            (normal[0][indices], normal[1][indices]), (anomalous[0][indices], anomalous[1][indices]), masks[indices]
        )
        torch.testing.assert_close(row, picked)


def test_the_pooling_is_kept_only_where_it_separates_better_beyond_the_noise(caplog) -> None:
    separations = torch.ones(RESAMPLES + 1, 2, 2, 2)  # (rows, poolings, shrinkages, calibrations)
    separations[1 : 1 + 96, 1] = 1.1  # pooled better in 96 of 100 resamples
    with caplog.at_level(logging.INFO):
        assert _decide_pooling(separations, 5)
    assert "5x5 average pooling" in caplog.text and ": pooled." in caplog.text
    separations[1 : 1 + 96, 1] = 1.0
    separations[1 : 1 + 94, 1] = 1.1  # 94 %: within the noise
    assert not _decide_pooling(separations, 5)
    separations[1 : 1 + 95, 1] = 1.1  # exactly 95 %: kept (a float32 share, 0.94999999, had refused it)
    assert _decide_pooling(separations, 5)
    assert not _decide_pooling(separations[:, :1], 5)  # no pooling candidate


def test_the_embedding_is_pooled_only_where_chosen() -> None:
    model = _unaligned_model().eval()
    images = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        unpooled = model.embed(images)[0]
        model.grid_pooling.enabled.fill_(True)
        pooled = model.embed(images)[0]
        with model.grid_pooling.off():
            torch.testing.assert_close(model.embed(images)[0], unpooled)
    torch.testing.assert_close(pooled, F.avg_pool2d(unpooled, 5, stride=1, padding=2, count_include_pad=False))
    assert bool(model.grid_pooling.enabled)  # restored after the block


def test_a_fit_decides_the_pooling_and_scores_as_it_decided(caplog) -> None:
    """The log names the decision, and the Gaussian is fitted on the embedding as decided (pooled or not)."""
    images = _noise_texture(40)
    model = _unaligned_model()
    with caplog.at_level(logging.INFO):
        model.fit_statistics([images])
    decided = bool(model.grid_pooling.enabled)
    assert ("pooled." if decided else "not pooled.") in caplog.text
    with torch.no_grad():
        distance = model.gaussian.mahalanobis(model.eval().embed(images[:4])[0])
    assert bool(torch.isfinite(distance).all())


def test_without_a_pooling_candidate_the_embedding_passes_through_untouched() -> None:
    """``grid_pooling=1`` (the default) adds nothing to the scoring graph: the exported model stays as it was."""
    pooling = GridPooling(1)
    pooling.enabled.fill_(True)  # even a checkpoint that says "pooled" cannot pool without a side
    embedding = torch.rand(1, 4, 8, 8)
    assert pooling(embedding) is embedding
    assert not pooling.is_candidate
