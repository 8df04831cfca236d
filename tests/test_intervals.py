"""The bootstrap intervals of ``benchmarks/intervals.py``: a resample's AUROC from pair counts equals scoring it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
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
