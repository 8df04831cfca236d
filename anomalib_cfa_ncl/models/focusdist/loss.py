"""Losses of FocusDist: image-level coarse alignment (ICA) and dense non-contrastive learning (NCL) with its heads."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from .alignment import low_pass_copy


class NCLHead(nn.Module):
    """Projector ``g`` and predictor ``h`` of the dense non-contrastive loss (1x1 convolutions).

    Args:
        in_channels (int): Channels of the feature map.
        projection_dim (int): Width of the projection.

    Example:
        >>> head = NCLHead(64, 128)
        >>> prediction, target = head(torch.rand(2, 64, 8, 8))
        >>> prediction.shape
        torch.Size([2, 128, 8, 8])

    """

    def __init__(self, in_channels: int, projection_dim: int = 128) -> None:
        super().__init__()
        bottleneck = max(projection_dim // 4, 1)
        self.projector = nn.Sequential(
            nn.Conv2d(in_channels, projection_dim, 1, bias=False),
            nn.BatchNorm2d(projection_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(projection_dim, projection_dim, 1),
        )
        self.predictor = nn.Sequential(
            nn.Conv2d(projection_dim, bottleneck, 1, bias=False),
            nn.BatchNorm2d(bottleneck),
            nn.ReLU(inplace=True),
            nn.Conv2d(bottleneck, projection_dim, 1),
        )

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(h(g(f)), g(f))``, each of shape ``(B, projection_dim, H, W)``."""
        target = self.projector(features)
        return self.predictor(target), target


def ica_loss(aligned_images: torch.Tensor) -> torch.Tensor:
    """Image-level coarse alignment loss: squared distance of each aligned image to the batch mean.

    The paper's all-pairs loss ``sum_{A,B} ||T(A) - T(B)||^2`` equals ``2B sum_A ||T(A) - mean||^2``, so it is
    computed against the batch mean in O(B). Images are compared on a blurred, downsampled copy so the
    transformer aligns object outlines rather than chasing texture.

    Args:
        aligned_images (torch.Tensor): Images after the image-level transformer, shape ``(B, C, H, W)``.

    Returns:
        torch.Tensor: Scalar loss, the mean squared deviation per pixel and channel.

    """
    low_pass = low_pass_copy(aligned_images)
    return (low_pass - low_pass.mean(dim=0, keepdim=True)).pow(2).mean()


def ncl_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dense non-contrastive loss between corresponding locations of all pairs of images in a batch.

    For every location, the negative cosine between the prediction of image ``a`` and the stop-gradient
    target of image ``b``, averaged over all ordered pairs ``a != b`` (so the loss is symmetric). The sum over
    ``b`` is linear in the normalised targets, so all pairs cost O(B).

    Args:
        prediction (torch.Tensor): Predictor outputs ``h(g(f))``, shape ``(B, D, H, W)``.
        target (torch.Tensor): Projector outputs ``g(f)``, shape ``(B, D, H, W)``; gradients are stopped.

    Returns:
        torch.Tensor: Scalar loss in ``[-1, 1]``; zero (with a graph) for a batch of one image.

    """
    batch_size = prediction.shape[0]
    if batch_size < 2:
        return prediction.sum() * 0.0
    prediction = F.normalize(prediction, dim=1)
    target = F.normalize(target.detach(), dim=1)
    others = (target.sum(dim=0, keepdim=True) - target) / (batch_size - 1)
    return -(prediction * others).sum(dim=1).mean()


def at_most_grid(features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Average-pool maps finer than the scoring grid down to it.

    Locations are only scored on the grid, so aligning finer than it buys nothing, and the 1x1 heads on a
    stride-4 map would cost more than the backbone itself.
    """
    if features.shape[-2] <= grid[0] and features.shape[-1] <= grid[1]:
        return features
    return F.adaptive_avg_pool2d(features, grid)


class TrainingOutput(NamedTuple):
    """What the training forward returns for :class:`~.loss.FocusDistLoss`.

    Attributes:
        ncl_pairs: Per layer, ``(prediction, target)`` of shape ``(B, D, h_k, w_k)``; empty when NCL is off.
        aligned_images: Output of the image transformer ``(B, 3, H, W)``, or ``None`` when it is off.

    """

    ncl_pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    aligned_images: torch.Tensor | None


class FocusDistLoss(nn.Module):
    """Total training loss: NCL averaged over the selected layers plus the weighted ICA loss.

    Args:
        ica_weight (float): Weight of the image-level alignment loss.

    Example:
        >>> loss = FocusDistLoss()
        >>> pairs = {"layer2": (torch.randn(4, 8, 5, 5), torch.randn(4, 8, 5, 5))}
        >>> total, parts = loss(pairs, torch.rand(4, 3, 64, 64))

    """

    def __init__(self, ica_weight: float = 1.0) -> None:
        super().__init__()
        self.ica_weight = ica_weight

    def forward(
        self,
        ncl_pairs: dict[str, tuple[torch.Tensor, torch.Tensor]],
        aligned_images: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Compute the loss.

        Args:
            ncl_pairs (dict[str, tuple[torch.Tensor, torch.Tensor]]): Per layer, ``(prediction, target)``, each
                of shape ``(B, D, H, W)``; empty when NCL is off.
            aligned_images (torch.Tensor | None): Output of the image transformer ``(B, C, H, W)``, or ``None``
                when image alignment is off.

        Returns:
            tuple[torch.Tensor | None, dict[str, torch.Tensor]]: The total loss (``None`` when nothing is trained)
                and its detached parts for logging.

        """
        parts: dict[str, torch.Tensor] = {}
        terms: list[torch.Tensor] = []
        if ncl_pairs:
            parts["ncl_loss"] = torch.stack([ncl_loss(*pair) for pair in ncl_pairs.values()]).mean()
            terms.append(parts["ncl_loss"])
        if aligned_images is not None:
            parts["ica_loss"] = ica_loss(aligned_images)
            terms.append(self.ica_weight * parts["ica_loss"])
        total = torch.stack(terms).sum() if terms else None
        return total, {name: value.detach() for name, value in parts.items()}
