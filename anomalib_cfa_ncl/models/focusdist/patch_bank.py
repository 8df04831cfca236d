"""A bounded bank of training patches: each location's distance to its nearest one, where the gate chooses it.

The per-location Gaussian assumes one mode per location. A texture's patches are many modes at every location
(tissue: nuclei, stroma, background; grass: blades at every angle), which a nearest-neighbour distance to training
patches models without a shape, as Patchcore does. The bank is position-free and bounded: a uniform sample of
``size`` of all training patches (the ones with the smallest of a random key each, so it streams over the batches
and does not grow with the training set). Greedy k-center selection (Patchcore's coreset) of 2,048 patches out of a
sample of 32,768 scored held-back images worse than a uniform sample of 8,192 on every texture tried (gravel 1.66
against 1.84 image + pixel AUROC): it keeps the outliers and thins the dense modes that normal patches fall in.
Like the Gaussian, its distances are calibrated per location by held-back normal images (without
that the border, where zero padding changes the features, decided every image score; see :mod:`.gaussian`). The
gate (:mod:`.gate`) keeps the bank only where it scores held-back images with synthetic anomalies better than the
chosen Gaussian; otherwise the bank stays empty and costs nothing.
"""

from __future__ import annotations

import torch
from anomalib.models.components.base import DynamicBufferMixin

from .gaussian import check_calibration_scale
from .precision import at_least_float32, full_precision

SAMPLE_SEED = 0
# Distances are taken to this many bank patches at a time: a batch of 32 images at 1024 locations holds 32 x 1024 x
# 1024 float32 (134 MB) at once instead of 8x that against the whole bank (a fixed Python loop: it unrolls in exports).
CHUNK = 1024


class PatchBank(DynamicBufferMixin):
    """Nearest-neighbour distances to a uniform sample of at most ``size`` training patches.

    Args:
        size (int): Patches kept in the bank; ``0`` never builds one.

    Example:
        >>> bank = PatchBank(size=4)
        >>> bank.update(torch.randn(3, 8, 5, 5))
        >>> bank.finalize()
        >>> bank.bank.shape, bank.distance(torch.randn(2, 8, 5, 5)).shape
        (torch.Size([4, 8]), torch.Size([2, 5, 5]))

    """

    def __init__(self, size: int = 0) -> None:
        super().__init__()
        if size < 0:
            msg = f"patch_bank must be a number of patches (0 turns the bank off), got {size}."
            raise ValueError(msg)
        self.size = size
        self.register_buffer("bank", torch.empty(0))
        self.register_buffer("location_scale", torch.empty(0))
        self.bank: torch.Tensor
        self.location_scale: torch.Tensor
        self.reset()

    @property
    def is_candidate(self) -> bool:
        """Whether there is a bank to choose (``size > 0``)."""
        return self.size > 0

    @property
    def is_fitted(self) -> bool:
        """Whether the bank holds patches (it was chosen and built, or loaded): evaluation then scores with it."""
        return self.bank.numel() > 0

    def fresh(self) -> PatchBank:
        """An empty bank of the same size, on the same device."""
        return PatchBank(self.size).to(self.bank.device)

    def reset(self) -> None:
        """Forget the sampled patches (a built bank stays until :meth:`finalize` or :meth:`clear`)."""
        self.pool: torch.Tensor | None = None
        self.pool_keys: torch.Tensor | None = None
        self.locations = 0
        self.generator = torch.Generator().manual_seed(SAMPLE_SEED)

    def clear(self) -> None:
        """Empty the bank: evaluation scores with the Gaussian."""
        self.reset()
        self.bank = self.bank.new_empty(0)
        self.location_scale = self.location_scale.new_empty(0)

    def update(self, embedding: torch.Tensor) -> None:
        """Add a batch's patches to the uniform sample.

        Args:
            embedding (torch.Tensor): Features, shape ``(B, D, h, w)``.

        """
        patches = embedding.detach().permute(0, 2, 3, 1).reshape(-1, embedding.shape[1]).float()
        keys = torch.rand(patches.shape[0], generator=self.generator).to(patches.device)
        if self.pool is not None and self.pool_keys is not None:
            patches, keys = torch.cat([self.pool, patches]), torch.cat([self.pool_keys, keys])
        if keys.numel() > self.size:  # keep the smallest keys: a uniform sample of every patch seen so far
            kept = keys.topk(self.size, largest=False).indices
            patches, keys = patches[kept], keys[kept]
        self.pool, self.pool_keys = patches, keys
        self.locations = embedding.shape[-2] * embedding.shape[-1]

    def finalize(self) -> None:
        """Make the sampled patches the bank.

        Raises:
            ValueError: If no patch was seen.

        """
        if self.pool is None:
            msg = "FocusDist saw no training image: give a training set with at least one normal image."
            raise ValueError(msg)
        self.bank = self.pool
        self.location_scale = torch.ones(self.locations, device=self.bank.device)
        self.reset()

    def calibrate(self, location_scale: torch.Tensor) -> None:
        """Divide every location's distance by its scale from now on (see :func:`.gaussian.calibration_scale`)."""
        check_calibration_scale(location_scale, self.location_scale, self.is_fitted, "build the bank first")
        self.location_scale = location_scale.to(self.location_scale)

    def distance(self, embedding: torch.Tensor) -> torch.Tensor:
        """Euclidean distance of every location to its nearest patch in the bank, divided by its calibration scale.

        Args:
            embedding (torch.Tensor): Features, shape ``(B, D, h, w)``, ``h * w`` the fitted number of locations.

        Returns:
            torch.Tensor: Distances, shape ``(B, h, w)``.

        """
        batch, dim, height, width = embedding.shape
        with full_precision(embedding.device.type):
            patches = at_least_float32(embedding).reshape(batch, dim, -1).transpose(1, 2)  # (B, L, D)
            norms = patches.square().sum(dim=2, keepdim=True)
            nearest: torch.Tensor | None = None
            for chunk in self.bank.to(patches.dtype).split(CHUNK):
                # |x - b|^2 = |x|^2 - 2 x.b + |b|^2: a matrix product instead of a (B, L, M, D) difference
                squared = (norms - 2 * patches @ chunk.T + chunk.square().sum(dim=1)).amin(dim=2)
                nearest = squared if nearest is None else torch.minimum(nearest, squared)
            assert nearest is not None  # a fitted bank has at least one patch
            distance = nearest.clamp_min(0).sqrt() / self.location_scale.to(patches.dtype)
        return distance.reshape(batch, height, width)
