"""Bootstrap intervals for AUROC differences: how much of a difference between two models is noise.

The test images of each category are resampled with replacement (the same resample for both models, so the
difference is paired), the image and pixel AUROC of each model are recomputed on the resample, and the mean over
categories of ``model - reference`` is collected; the 2.5 and 97.5 percentiles give a 95 % interval. A
resample weights every image by how often it was drawn, so the AUROC of a resample follows from counts per pair of
images, taken once per model and category (:func:`stable_rank_aurocs`): one product of the weights with the counts
serves every resample.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> labels = np.r_[np.zeros(50), np.ones(50)]
    >>> aurocs = stable_rank_aurocs(labels + rng.normal(0, 1, 100), labels, np.arange(100), np.ones((1, 100)))
    >>> round(float(aurocs[0]), 3)
    0.741

"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from lightning.pytorch import Callback
from torchmetrics.functional.classification import binary_auroc

from anomalib_cfa_ncl.models.focusdist.gate import bootstrap_aurocs

RESAMPLES = 1000
SEED = 0
MAP_SIZE = 64  # maps and masks are kept at 64x64 for the pixel-level resamples


def raw_score_auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """AUROC of raw, non-negative scores (distances): scaled into [0, 1] by their maximum, an order-keeping map.

    torchmetrics passes scores outside [0, 1] through a sigmoid, which rounds every distance above about 17 to 1.0
    in float32 (the model's raw image scores are mostly above it), so raw distances would read as ties.
    """
    scores = scores.double()
    return float(binary_auroc(scores / scores.max().clamp_min(1e-12), labels.int()))


def stable_rank_aurocs(
    scores: np.ndarray, labels: np.ndarray, image_index: np.ndarray, image_weights: np.ndarray
) -> np.ndarray:
    """The AUROC under each row of image weights, with tied scores ranked in the order of the samples.

    A stable sort ranks the scores, so a positive counts a tied negative as below it when the negative comes first
    (the maps are stored in float16, so ties occur). The AUROCs of all rows follow from one count per pair of images
    (:func:`anomalib_cfa_ncl.models.focusdist.gate.bootstrap_aurocs`, on the ranks, which have no ties): a resample
    that draws images ``i`` and ``j`` ``w_i`` and ``w_j`` times counts their pair ``w_i * w_j`` times.

    Args:
        scores (np.ndarray): Scores, shape ``(N,)``.
        labels (np.ndarray): 1 (or ``True``) for anomalous, shape ``(N,)``.
        image_index (np.ndarray): The image of every score, a column of ``image_weights``, shape ``(N,)``.
        image_weights (np.ndarray): Weight of every image in each row, shape ``(R, I)``.

    Returns:
        np.ndarray: AUROC per row, shape ``(R,)``; ``nan`` where a row weighs only one class.

    """
    rank = np.empty(scores.size, dtype=np.int64)
    rank[np.argsort(scores, kind="stable")] = np.arange(scores.size)
    aurocs = bootstrap_aurocs(
        torch.from_numpy(rank),
        torch.from_numpy(labels.astype(bool)),
        torch.from_numpy(np.asarray(image_index, dtype=np.int64)),
        torch.from_numpy(image_weights.astype(np.float64)),
        undefined=float("nan"),
    )
    return aurocs.numpy()


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
            images = np.arange(len(prediction.scores))
            return stable_rank_aurocs(prediction.scores, prediction.labels, images, image_weights)
        image_of_pixel = np.arange(prediction.maps.size) // prediction.maps[0].size
        scores, labels = prediction.maps.reshape(-1), prediction.masks.reshape(-1)
        return stable_rank_aurocs(scores, labels, image_of_pixel, image_weights)

    def mean_difference(
        self,
        model: dict[str, CategoryPredictions] | list[dict[str, CategoryPredictions]],
        reference: dict[str, CategoryPredictions] | list[dict[str, CategoryPredictions]],
        level: str,
    ) -> tuple[float, float, float]:
        """Mean over categories of ``model - reference`` AUROC, with its 95 % bootstrap interval.

        Either side may be several runs of one model (seeds): their AUROCs are averaged on every resample, so the
        interval holds the test images' noise and the difference is between the models' means over runs.

        Args:
            model (dict[str, CategoryPredictions] | list[dict[str, CategoryPredictions]]): Per category, the
                model's predictions, or a list of them, one per run.
            reference (dict[str, CategoryPredictions] | list[dict[str, CategoryPredictions]]): Likewise for the
                reference model.
            level (str): ``"image"`` or ``"pixel"``.

        Returns:
            tuple[float, float, float]: The difference on the full test sets, and the 2.5 and 97.5 percentiles.

        """
        models = model if isinstance(model, list) else [model]
        references = reference if isinstance(reference, list) else [reference]

        def mean_auroc(runs: list[dict[str, CategoryPredictions]], category: str, weights: np.ndarray) -> np.ndarray:
            return np.mean([self.aurocs(run[category], level, weights) for run in runs], axis=0)

        full, differences = [], []
        for category in self.categories:
            everything = np.ones((1, len(models[0][category].scores)), dtype=np.int64)
            for weights, collected in ((everything, full), (self.weights[category], differences)):
                collected.append(mean_auroc(models, category, weights) - mean_auroc(references, category, weights))
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
