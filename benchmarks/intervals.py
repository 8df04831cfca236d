"""Bootstrap intervals for AUROC differences: how much of a difference between two models is noise.

The test images of each category are resampled with replacement (the same resample for both models, so the
difference is paired), the image and pixel AUROC of each model are recomputed on the resample, and the mean over
categories of ``model - reference`` is collected; the 2.5 and 97.5 percentiles give a 95 % interval. A
resample weights every image by how often it was drawn, so the AUROC of a resample is a weighted AUROC of the
original scores: one sort per model and category serves every resample.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> labels = np.r_[np.zeros(50), np.ones(50)]
    >>> round(weighted_auroc(labels + rng.normal(0, 1, 100), labels, np.ones(100)), 3)
    0.741

"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from lightning.pytorch import Callback

RESAMPLES = 1000
SEED = 0
MAP_SIZE = 64  # maps and masks are kept at 64x64 for the pixel-level resamples


def weighted_auroc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> float:
    """AUROC where every sample counts ``weight`` times (ties between scores count as wrong order).

    Args:
        scores (np.ndarray): Scores, shape ``(N,)``.
        labels (np.ndarray): 1 for anomalous, 0 for normal, shape ``(N,)``.
        weights (np.ndarray): Non-negative weight of each sample, shape ``(N,)``.

    Returns:
        float: The AUROC, ``nan`` when a class has no weight.

    """
    order = np.argsort(scores, kind="stable")
    labels, weights = labels[order], weights[order]
    positive = weights * labels
    negative = weights * (1 - labels)
    total_positive, total_negative = positive.sum(), negative.sum()
    if total_positive == 0 or total_negative == 0:
        return float("nan")
    negatives_below = np.cumsum(negative) - negative
    return float((positive * negatives_below).sum() / (total_positive * total_negative))


@dataclass
class CategoryPredictions:
    """One model's test predictions on one category.

    Attributes:
        scores: Image scores, shape ``(N,)``.
        labels: Image labels, shape ``(N,)``.
        maps: Anomaly maps at a reduced size, shape ``(N, h, w)``.
        masks: Ground-truth masks at the same size, shape ``(N, h, w)``.

    """

    scores: np.ndarray
    labels: np.ndarray
    maps: np.ndarray
    masks: np.ndarray


class PairedBootstrap:
    """Resample the test images of every category and compare two models on the same resamples.

    Args:
        categories (list[str]): Category names, in a fixed order.
        sizes (dict[str, int]): Test images per category.
        resamples (int): Number of bootstrap resamples.
        seed (int): Seed of the resampling.

    """

    def __init__(self, categories: list[str], sizes: dict[str, int], resamples: int = RESAMPLES, seed: int = SEED):
        rng = np.random.default_rng(seed)
        self.categories = categories
        self.weights = {
            category: np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(resamples)])
            for category, n in ((c, sizes[c]) for c in categories)
        }

    @staticmethod
    def aurocs(prediction: CategoryPredictions, level: str, image_weights: np.ndarray) -> np.ndarray:
        """The AUROC under each row of image weights, shape ``(R,)``.

        Args:
            prediction (CategoryPredictions): One model's predictions on one category.
            level (str): ``"image"`` or ``"pixel"`` (every pixel weighted by its image's weight).
            image_weights (np.ndarray): Weight of every test image in each resample, shape ``(R, N)``.

        Returns:
            np.ndarray: AUROC per resample, shape ``(R,)``.

        """
        if level == "image":
            return np.array([weighted_auroc(prediction.scores, prediction.labels, w) for w in image_weights])
        pixels = prediction.maps[0].size
        scores, labels = prediction.maps.reshape(-1), prediction.masks.reshape(-1).astype(np.float64)
        order = np.argsort(scores, kind="stable")
        labels = labels[order]
        image_of_pixel = (np.arange(scores.size) // pixels)[order]
        results = []
        for w in image_weights:
            weights = w[image_of_pixel].astype(np.float64)
            positive, negative = weights * labels, weights * (1 - labels)
            below = np.cumsum(negative) - negative
            results.append((positive * below).sum() / (positive.sum() * negative.sum()))
        return np.array(results)

    def mean_difference(
        self,
        model: dict[str, CategoryPredictions],
        reference: dict[str, CategoryPredictions],
        level: str,
    ) -> tuple[float, float, float]:
        """Mean over categories of ``model - reference`` AUROC, with its 95 % bootstrap interval.

        Args:
            model (dict[str, CategoryPredictions]): Per category, the model's predictions.
            reference (dict[str, CategoryPredictions]): Per category, the reference model's predictions.
            level (str): ``"image"`` or ``"pixel"``.

        Returns:
            tuple[float, float, float]: The difference on the full test sets, and the 2.5 and 97.5 percentiles.

        """
        full, differences = [], []
        for category in self.categories:
            everything = np.ones((1, len(model[category].scores)), dtype=np.int64)
            for weights, collected in ((everything, full), (self.weights[category], differences)):
                collected.append(
                    self.aurocs(model[category], level, weights) - self.aurocs(reference[category], level, weights)
                )
        mean = np.mean(differences, axis=0)
        low, high = np.percentile(mean, [2.5, 97.5])
        return float(np.mean(full)), float(low), float(high)


class PredictionRecorder(Callback):
    """Keep the test predictions of a run (scores, labels, maps and masks at ``MAP_SIZE``) for the bootstrap."""

    def __init__(self) -> None:
        self.parts: dict[str, list[np.ndarray]] = {"scores": [], "labels": [], "maps": [], "masks": []}

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        """Collect one test batch."""
        del trainer, pl_module, batch, batch_idx, dataloader_idx

        def small(tensor: torch.Tensor, mode: str) -> np.ndarray:
            tensor = tensor.float().reshape(tensor.shape[0], 1, *tensor.shape[-2:])
            return F.interpolate(tensor, size=(MAP_SIZE, MAP_SIZE), mode=mode)[:, 0].cpu().numpy()

        self.parts["scores"].append(outputs.pred_score.float().cpu().numpy().reshape(-1))
        self.parts["labels"].append(outputs.gt_label.float().cpu().numpy().reshape(-1))
        self.parts["maps"].append(small(outputs.anomaly_map, "area").astype(np.float16))
        self.parts["masks"].append(small(outputs.gt_mask, "nearest") > 0.5)

    def save(self, path: Path) -> None:
        """Write the collected predictions to an ``.npz`` file."""
        np.savez_compressed(path, **{name: np.concatenate(parts) for name, parts in self.parts.items()})


def load_predictions(path: Path) -> CategoryPredictions:
    """Read predictions written by :meth:`PredictionRecorder.save`."""
    data = np.load(path)
    return CategoryPredictions(
        data["scores"].astype(np.float64), data["labels"], data["maps"].astype(np.float64), data["masks"]
    )
