"""Anomaly map of FocusDist: distance map back in the input's coordinates, upsampled and blurred."""

from __future__ import annotations

import torch
from anomalib.models.components.filters.blur import compute_kernel_size
from kornia.filters import GaussianBlur2d
from torch import nn

from .alignment import resize, warp
from .precision import at_least_float32, full_precision


class AnomalyMapGenerator(nn.Module):
    """Warp a distance map from the aligned frame back to the input image, upsample and blur it.

    Args:
        sigma (float): Standard deviation of the Gaussian blur, in output pixels.

    Example:
        >>> generator = AnomalyMapGenerator()
        >>> theta = torch.eye(2, 3).expand(2, 2, 3)
        >>> generator(torch.rand(2, 32, 32), theta, (256, 256)).shape
        torch.Size([2, 1, 256, 256])
        >>> generator(torch.rand(2, 32, 32), None, (256, 256)).shape  # nothing moved: a resize
        torch.Size([2, 1, 256, 256])

    """

    def __init__(self, sigma: float = 4.0) -> None:
        super().__init__()
        side = compute_kernel_size(sigma)  # anomalib's choice: 2 * int(4 sigma + 0.5) + 1
        # separable: two 1-D passes cost 2 * side multiplications per pixel instead of side**2 (26x faster at sigma 4,
        # where the 2-D kernel cost as much as the rest of the scoring); results agree to float rounding
        self.blur = GaussianBlur2d((side, side), (sigma, sigma), border_type="reflect", separable=True)

    def forward(self, distance: torch.Tensor, theta: torch.Tensor | None, image_size: tuple[int, int]) -> torch.Tensor:
        """Compute the anomaly map.

        Args:
            distance (torch.Tensor): Distances in the aligned frame, shape ``(B, h, w)``.
            theta (torch.Tensor | None): The total alignment, input frame to aligned frame, shape ``(B, 2, 3)``;
                ``None`` when nothing was moved (the map is only resized).
            image_size (tuple[int, int]): ``(H, W)`` of the input image.

        Returns:
            torch.Tensor: Anomaly map aligned with the input pixels, shape ``(B, 1, H, W)``.

        """
        with full_precision(distance.device.type):
            distance = at_least_float32(distance).unsqueeze(1)
            if theta is None:  # nothing was moved: the identity warp, without a sampling grid
                return self.blur(resize(distance, (image_size[0], image_size[1])))
            return self.blur(warp(distance, theta, size=image_size, padding_mode="border", inverse=True))
