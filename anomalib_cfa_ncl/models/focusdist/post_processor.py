"""FocusDist's post-processor: anomalib's, with the F1-adaptive thresholds placed between two scores.

anomalib's ``F1AdaptiveThreshold`` returns the validation score at which F1 peaks, so one validation image sits
exactly on the threshold and its label (``score >= threshold``) hangs on the last bit of its score: the exported
model, whose float32 scores differ from PyTorch's by rounding (about 1e-6), labelled such an image normal where
PyTorch labelled it anomalous. Halfway between that score and the next lower one labels every validation image
the same and leaves a margin on both sides.
"""

from __future__ import annotations

import torch
from anomalib.metrics import F1AdaptiveThreshold
from anomalib.post_processing import PostProcessor
from torchmetrics.utilities.data import dim_zero_cat


class MidpointF1AdaptiveThreshold(F1AdaptiveThreshold):
    """The F1-adaptive threshold, moved halfway down to the next lower validation score.

    Example:
        >>> from anomalib.data import ImageBatch
        >>> scores, labels = torch.tensor([0.1, 0.2, 0.8, 0.9]), torch.tensor([0, 0, 1, 1])
        >>> threshold = MidpointF1AdaptiveThreshold(fields=["pred_score", "gt_label"])
        >>> threshold.update(ImageBatch(image=torch.zeros(4, 3, 8, 8), pred_score=scores, gt_label=labels))
        >>> threshold.compute()  # anomalib's F1AdaptiveThreshold: tensor(0.8000)
        tensor(0.5000)

    """

    def compute(self) -> torch.Tensor:
        """The threshold that maximises F1, halfway to the next lower score (anomalib's value where it falls back)."""
        value = super().compute()
        if self.thresholds is not None or not (self._has_anomalous_samples() and self._has_normal_samples()):
            return value  # binned statistics, or one class only: anomalib's fallback stands
        scores = dim_zero_cat(self.preds)
        below = scores[scores < value]
        if below.numel() > 0:  # none below: the threshold is the lowest score, every image is anomalous
            value = (value + below.max()) / 2
        self.value = value
        return value


class FocusDistPostProcessor(PostProcessor):
    """anomalib's :class:`~anomalib.post_processing.PostProcessor` with :class:`MidpointF1AdaptiveThreshold`.

    Args:
        **kwargs: The arguments of anomalib's ``PostProcessor`` (sensitivities, switches).

    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self._image_threshold_metric = MidpointF1AdaptiveThreshold(fields=["pred_score", "gt_label"], strict=False)
        self._pixel_threshold_metric = MidpointF1AdaptiveThreshold(fields=["anomaly_map", "gt_mask"], strict=False)
