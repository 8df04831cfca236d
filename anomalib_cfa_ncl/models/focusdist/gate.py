"""The alignment gate: keep the image-level alignment only for categories whose images it brings together."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .alignment import identity_theta, low_pass_copy


class AlignmentGate(nn.Module):
    """Keep the image-level alignment only for categories it aligns: textures have no canonical pose.

    After training, one pass over the training images (without augmentation) measures how much the image
    transformer brings them together: ``gain = 1 - spread(aligned) / spread(input)``, the spread being the ICA
    loss, the squared deviation of the low-pass images from their mean. Objects whose pose varies come together,
    textures do not; below ``min_gain`` the transformer is replaced by the identity in evaluation, so it cannot
    add pose noise (and resampling blur) to images that were already as aligned as they can be.

    Args:
        min_gain (float): Smallest relative reduction of the spread for which the alignment is kept; ``0``
            always keeps it.

    Example:
        >>> gate = AlignmentGate(min_gain=0.2)
        >>> images = torch.rand(4, 3, 64, 64)
        >>> gate.update(images, images)  # an alignment that changes nothing
        >>> gate.finalize()
        >>> bool(gate.enabled), float(gate.gain)
        (False, 0.0)

    """

    def __init__(self, min_gain: float = 0.2) -> None:
        super().__init__()
        self.min_gain = min_gain
        self.register_buffer("enabled", torch.ones((), dtype=torch.bool))
        self.register_buffer("gain", torch.full((), float("nan")))
        self.enabled: torch.Tensor
        self.gain: torch.Tensor
        self.reset()

    def reset(self) -> None:
        """Forget the running sums (the decision stays until :meth:`finalize`)."""
        self.sums: dict[str, torch.Tensor] = {}

    def update(self, images: torch.Tensor, aligned: torch.Tensor) -> None:
        """Add a batch of training images and their aligned copies to the running sums.

        Args:
            images (torch.Tensor): Input images, shape ``(B, 3, H, W)``.
            aligned (torch.Tensor): The image transformer's output, shape ``(B, 3, H, W)``.

        """
        for name, batch in (("input", images), ("aligned", aligned)):
            low_pass = low_pass_copy(batch.detach()).to(torch.float64)
            for key, value in ((f"{name}_sum", low_pass.sum(0)), (f"{name}_squares", low_pass.pow(2).sum(0))):
                self.sums[key] = self.sums[key] + value if key in self.sums else value
        count = torch.tensor(float(images.shape[0]), dtype=torch.float64, device=images.device)
        self.sums["count"] = self.sums["count"] + count if "count" in self.sums else count

    def finalize(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Decide from the running sums whether the alignment is kept.

        Args:
            reduce (Callable | None): Sums a tensor over processes (distributed training); ``None`` in a single
                process.

        """
        if not self.sums:  # no image seen (the Gaussian's fit reports it): keep the current decision
            return
        sums = {key: reduce(value) if reduce is not None else value for key, value in sorted(self.sums.items())}
        count = sums["count"]

        def spread(name: str) -> torch.Tensor:
            return (sums[f"{name}_squares"] - sums[f"{name}_sum"].pow(2) / count).clamp_min(0).sum()

        gain = 1.0 - spread("aligned") / spread("input").clamp_min(1e-12)
        self.gain.fill_(float(gain))
        self.enabled.fill_(bool(gain >= self.min_gain or self.min_gain <= 0))
        self.reset()

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        """The transform when the alignment is kept, else the identity, shape ``(B, 2, 3)``."""
        return torch.where(self.enabled, theta, identity_theta(theta.shape[0], theta.device, theta.dtype))
