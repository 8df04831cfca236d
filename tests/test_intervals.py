"""The bootstrap intervals of ``benchmarks/intervals.py``: a resample's AUROC from pair counts equals scoring it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

INTERVALS = Path(__file__).resolve().parents[1] / "benchmarks" / "intervals.py"


def _intervals():
    spec = importlib.util.spec_from_file_location("intervals", INTERVALS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pixel_aurocs_of_resamples_equal_scoring_the_drawn_images() -> None:
    intervals = _intervals()
    rng = np.random.default_rng(0)
    count, side = 12, 4
    masks = rng.random((count, side, side)) < 0.2
    maps = rng.random((count, side, side)) + 0.5 * masks  # continuous: no ties
    prediction = intervals.CategoryPredictions(maps.max(axis=(1, 2)), masks.any(axis=(1, 2)), maps, masks)
    draws = rng.integers(0, count, (5, count))
    weights = np.stack([np.bincount(row, minlength=count) for row in draws])
    for level, aurocs in (
        ("pixel", intervals.PairedBootstrap.aurocs(prediction, "pixel", weights)),
        ("image", intervals.PairedBootstrap.aurocs(prediction, "image", weights)),
    ):
        for row, auroc in zip(draws, aurocs, strict=True):
            if level == "pixel":
                scores, labels = maps[row].reshape(-1), masks[row].reshape(-1)
            else:
                scores, labels = prediction.scores[row], prediction.labels[row]
            if labels.all() or not labels.any():
                assert np.isnan(auroc)
                continue
            expected = binary_auroc(torch.from_numpy(scores / scores.max()), torch.from_numpy(labels).long())
            assert abs(auroc - float(expected)) < 1e-6


def test_tied_scores_rank_in_the_order_of_the_samples() -> None:
    intervals = _intervals()
    scores = np.array([0.5, 0.5, 0.5, 0.5])
    labels = np.array([0, 1, 1, 1])  # the negative comes first: every tied positive ranks above it
    aurocs = intervals.stable_rank_aurocs(scores, labels, np.arange(4), np.ones((1, 4)))
    assert float(aurocs[0]) == 1.0  # ties as half: 0.5


def test_several_runs_are_compared_by_their_mean_auroc() -> None:
    """Seeds of one model: the difference is between the runs' mean AUROCs, on the same resamples."""
    intervals = _intervals()
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(30), np.ones(30)]
    masks = np.zeros((60, 4, 4), dtype=bool)
    masks[30:, 1:3, 1:3] = True

    def run(noise: float) -> dict:
        maps = masks + rng.normal(0, noise, masks.shape)
        return {"c": intervals.CategoryPredictions(labels + rng.normal(0, noise, 60), labels, maps, masks)}

    model, weak, strong = run(0.5), run(2.0), run(0.3)
    bootstrap = intervals.PairedBootstrap(["c"], {"c": 60}, resamples=50)
    for level in ("image", "pixel"):
        to_weak = bootstrap.mean_difference(model, weak, level)
        to_strong = bootstrap.mean_difference(model, strong, level)
        to_both = bootstrap.mean_difference(model, [weak, strong], level)
        assert abs(to_both[0] - (to_weak[0] + to_strong[0]) / 2) < 1e-12  # full test set: the mean of the two
        assert to_strong[0] < to_both[0] < to_weak[0]
        assert (
            bootstrap.mean_difference([model, model], [weak, weak], level) == to_weak
        )  # a repeated run changes nothing


def test_raw_score_auroc_ranks_distances_that_a_sigmoid_would_tie() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    distances = torch.tensor([20.0, 21.0, 22.0, 23.0, 24.0, 21.5])  # all above 17: sigmoid(x) is 1.0 in float32
    assert float(binary_auroc(distances, labels)) == 0.5  # what the per-epoch curve read before
    assert _intervals().raw_score_auroc(distances, labels) == float(binary_auroc(distances / 30, labels))
    assert _intervals().raw_score_auroc(distances, labels) == pytest.approx(8 / 9, abs=1e-6)  # 8 of 9 pairs
