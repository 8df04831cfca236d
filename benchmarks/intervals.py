"""Bootstrap intervals for AUROC differences: how much of a difference between two models is noise.

The test images of each category are resampled with replacement (the same resample for both models, so the
difference is paired), the image and pixel AUROC of each model are recomputed on the resample, and the mean over
categories of ``model - reference`` is collected; the 2.5 and 97.5 percentiles give a 95 % interval. A
resample weights every image by how often it was drawn, so the AUROC of a resample follows from counts per pair of
images, taken once per model and category (:func:`pair_counts`): one ``(R, N) @ (N, N)`` product serves every
resample.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> labels = np.r_[np.zeros(50), np.ones(50)]
    >>> counts = pair_counts(labels + rng.normal(0, 1, 100), labels, np.arange(100), count=100)
    >>> round(float(aurocs_from_pair_counts(*counts, np.ones((1, 100)))[0]), 3)
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


def pair_counts(
    scores: np.ndarray, labels: np.ndarray, image_index: np.ndarray, count: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """How many positives of image ``i`` rank above negatives of image ``j``, for every pair of images.

    Scores are ranked by a stable sort, so tied scores keep the order of the samples (a positive counts a tied
    negative as below it when the negative comes first). The AUROC of any per-image weights follows from these
    counts: a resample that draws images ``i`` and ``j`` ``w_i`` and ``w_j`` times counts their pair ``w_i * w_j``
    times (:func:`aurocs_from_pair_counts`).

    Args:
        scores (np.ndarray): Scores, shape ``(N,)``.
        labels (np.ndarray): 1 (or ``True``) for anomalous, shape ``(N,)``.
        image_index (np.ndarray): The image of every score, in ``[0, count)``, shape ``(N,)``.
        count (int): Number of images.

    Returns:
        tuple[np.ndarray, np.ndarray, np.ndarray]: The pair counts ``(count, count)``, and the positives and negatives
        of every image ``(count,)``.

    """
    rank = np.empty(scores.size, dtype=np.int64)
    rank[np.argsort(scores, kind="stable")] = np.arange(scores.size)
    positive = labels.astype(bool)
    positive_rank, positive_image = rank[positive], image_index[positive]
    above = np.zeros((count, count))
    for image in range(count):
        negative_rank = np.sort(rank[~positive & (image_index == image)])
        below = np.searchsorted(negative_rank, positive_rank).astype(np.float64)
        above[:, image] = np.bincount(positive_image, weights=below, minlength=count)
    positives = np.bincount(positive_image, minlength=count).astype(np.float64)
    negatives = np.bincount(image_index[~positive], minlength=count).astype(np.float64)
    return above, positives, negatives


def aurocs_from_pair_counts(
    above: np.ndarray, positives: np.ndarray, negatives: np.ndarray, image_weights: np.ndarray
) -> np.ndarray:
    """The AUROC under each row of image weights ``(R, count)`` from :func:`pair_counts`; ``nan`` without a class."""
    weights = image_weights.astype(np.float64)
    ranked = ((weights @ above) * weights).sum(axis=1)
    pairs = (weights @ positives) * (weights @ negatives)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, ranked / pairs, np.nan)


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
        count = len(prediction.scores)
        if level == "image":
            counts = pair_counts(prediction.scores, prediction.labels, np.arange(count), count)
        else:
            pixels = prediction.maps[0].size
            image_of_pixel = np.arange(prediction.maps.size) // pixels
            counts = pair_counts(prediction.maps.reshape(-1), prediction.masks.reshape(-1), image_of_pixel, count)
        return aurocs_from_pair_counts(*counts, image_weights)

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
