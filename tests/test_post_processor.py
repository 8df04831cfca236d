"""Thresholds halfway between two validation scores: no validation image sits on the threshold."""

from __future__ import annotations

import pytest
import torch
from anomalib.data import ImageBatch
from anomalib.metrics import F1AdaptiveThreshold

from anomalib_cfa_ncl import FocusDist
from anomalib_cfa_ncl.models.focusdist.post_processor import FocusDistPostProcessor, MidpointF1AdaptiveThreshold


def _threshold(metric_class: type, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    metric = metric_class(fields=["pred_score", "gt_label"])
    for part in range(0, len(scores), 3):  # several batches, as in a validation loop
        chunk = slice(part, part + 3)
        metric.update(ImageBatch(image=torch.zeros(len(scores[chunk]), 3, 4, 4), pred_score=scores[chunk],
                                 gt_label=labels[chunk]))  # fmt: skip
    return metric.compute()


def test_midpoint_labels_the_validation_images_as_anomalib_does_with_a_margin() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (40,), generator=generator)
    scores = torch.rand(40, generator=generator) + 0.3 * labels
    anomalib_value = _threshold(F1AdaptiveThreshold, scores, labels)
    midpoint = _threshold(MidpointF1AdaptiveThreshold, scores, labels)
    assert anomalib_value in scores  # anomalib's threshold is a validation score: that image sits on it
    assert torch.equal(scores >= midpoint, scores >= anomalib_value)
    lower = scores[scores < anomalib_value].max()
    torch.testing.assert_close(midpoint, (anomalib_value + lower) / 2)
    assert (scores - midpoint).abs().min() > 1e-3


@pytest.mark.parametrize("label", [0, 1])
def test_one_class_only_keeps_anomalibs_fallback(label: int) -> None:
    scores = torch.tensor([0.2, 0.4, 0.7])
    labels = torch.full((3,), label)
    assert _threshold(MidpointF1AdaptiveThreshold, scores, labels) == _threshold(F1AdaptiveThreshold, scores, labels)


def test_focusdist_uses_the_midpoint_thresholds() -> None:
    post_processor = FocusDist(pre_trained=False).post_processor
    assert isinstance(post_processor, FocusDistPostProcessor)
    assert isinstance(post_processor._image_threshold_metric, MidpointF1AdaptiveThreshold)
    assert isinstance(post_processor._pixel_threshold_metric, MidpointF1AdaptiveThreshold)


def test_threshold_at_the_lowest_score_stays_there() -> None:
    """F1 peaks with every image anomalous: no score lies below the threshold to meet halfway."""
    scores, labels = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([1, 0, 1])
    anomalib_value = _threshold(F1AdaptiveThreshold, scores, labels)
    assert anomalib_value == scores.min()
    assert _threshold(MidpointF1AdaptiveThreshold, scores, labels) == anomalib_value
