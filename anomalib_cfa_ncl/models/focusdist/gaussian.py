"""Streaming per-location Gaussian for FocusDist's scoring.

Running sums in float64 per location make the fit memory independent of the number of training images and
let several processes fit one Gaussian by summing their sums. The precision matrices are stored in float16,
each location scaled by its largest entry so the range never overflows; this halves the statistics
(1024 locations x 176^2 x 2 bytes = 63 MB at 256x256 input) at a measured, negligible cost in accuracy.

Each location's distance can be divided by a calibration scale, the mean distance of normal images that the fit did
not see (:meth:`StreamingGaussian.calibrate`). A normal image's distance to a Gaussian fitted without it grows as the
Gaussian's samples shrink relative to the feature dimension, and at the border they shrink: the statistics
neighbourhood is cut off there, and the backbone's zero padding gives border features a distribution of their own.
Uncalibrated, the corner of normal images scored about 1.45x the interior (grass, 176 features), so the image score, a
maximum over the map, was mostly the border's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from anomalib.models.components.base import DynamicBufferMixin

from .precision import at_least_float32, full_precision

STORAGE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
SUBSET_SEED = 0
# A region every normal image shares exactly (a constant background) has distances near 0: bounding its calibration
# scale keeps float noise there from being magnified into anomalies. Measured scales lay within 0.82 to 1.92.
SCALE_BOUNDS = (0.25, 4.0)
# On a CPU, eager distances convert the float16 precision matrices to float32 this many locations at a time (1 MB at
# 176 features): converting all 1024 at once wrote 2 x 127 MB on every call and took 118 of the 140 ms that one
# image's distances took (one thread); in chunks that fit the cache the whole call takes about 20 ms, same values.
CPU_LOCATION_CHUNK = 8


def channel_subset(total: int, n_features: int | None) -> torch.Tensor:
    """The fixed random (seeded) subset of ``n_features`` of ``total`` channels the Gaussian keeps, sorted."""
    if n_features is not None and not n_features > 0:
        msg = f"n_features must be a positive number of channels (or None for all {total}), got {n_features}."
        raise ValueError(msg)
    keep = total if n_features is None else min(n_features, total)
    return torch.randperm(total, generator=torch.Generator().manual_seed(SUBSET_SEED))[:keep].sort().values


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run batched LAPACK calls on one thread.

    On 2 cores, MKL's batched Cholesky on 1024 small matrices took 6 s with two threads and 0.3 s with one,
    and its batched LU (``torch.linalg.inv``) failed outright ("Parameter 6 was incorrect on entry to DLASWP").
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class StreamingGaussian(DynamicBufferMixin):
    """Per-location mean and inverse covariance fitted from running float64 sums.

    Args:
        regularization (float): Ridge added to every covariance, relative to the mean feature variance over
            all locations, so the covariance stays invertible with few or near-constant images.
        storage_dtype (str): ``"float16"`` or ``"float32"``, the dtype of the stored precision matrices.
        neighbourhood (int): Side of the square of neighbouring locations whose samples every location's
            Gaussian is fitted on (``1``: its own only). Pooling the sums of a few neighbours multiplies the
            samples per covariance without storing anything more.
        shrinkage (float): Weight in ``[0, 1]`` of the mean covariance over all locations in every location's
            covariance (``0``: each location's own). Where positions are exchangeable (textures), sharing the
            shape of the covariance gives every location the samples of all of them.

    Example:
        >>> gaussian = StreamingGaussian()
        >>> gaussian.update(torch.randn(8, 4, 3, 3))
        >>> gaussian.finalize()
        >>> gaussian.mahalanobis(torch.randn(2, 4, 3, 3)).shape
        torch.Size([2, 3, 3])

    """

    def __init__(
        self,
        regularization: float = 0.01,
        storage_dtype: str = "float16",
        neighbourhood: int = 1,
        shrinkage: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= shrinkage <= 1.0:
            msg = f"covariance_shrinkage must lie in [0, 1] (0 keeps each location's own covariance), got {shrinkage}."
            raise ValueError(msg)
        self.shrinkage = shrinkage
        if neighbourhood < 1 or neighbourhood % 2 == 0:
            msg = f"statistics_neighbourhood must be an odd number of locations (1, 3, 5, ...), got {neighbourhood}."
            raise ValueError(msg)
        self.neighbourhood = neighbourhood
        if storage_dtype not in STORAGE_DTYPES:
            msg = f"statistics_dtype must be one of {sorted(STORAGE_DTYPES)}, got {storage_dtype!r}."
            raise ValueError(msg)
        self.regularization = regularization
        self.storage_dtype = STORAGE_DTYPES[storage_dtype]
        self.register_buffer("mean", torch.empty(0))
        self.register_buffer("precision", torch.empty(0, dtype=self.storage_dtype))
        self.register_buffer("precision_scale", torch.empty(0))
        self.register_buffer("location_scale", torch.empty(0))
        self.mean: torch.Tensor
        self.precision: torch.Tensor
        self.precision_scale: torch.Tensor
        self.location_scale: torch.Tensor
        self.reset()

    def fresh(self, shrinkage: float | None = None) -> StreamingGaussian:
        """An unfitted Gaussian with the same settings (``shrinkage`` if given), on the same device."""
        dtype_name = next(name for name, dtype in STORAGE_DTYPES.items() if dtype == self.storage_dtype)
        shrinkage = self.shrinkage if shrinkage is None else shrinkage
        return StreamingGaussian(self.regularization, dtype_name, self.neighbourhood, shrinkage).to(self.mean.device)

    @property
    def is_fitted(self) -> bool:
        """Whether statistics have been fitted (or loaded)."""
        return self.mean.numel() > 0

    def reset(self) -> None:
        """Forget the running sums (the fitted statistics stay until :meth:`finalize`)."""
        self.count = torch.zeros((), dtype=torch.float64)
        self.running_sum: torch.Tensor | None = None
        self.running_outer: torch.Tensor | None = None
        self.grid: tuple[int, int] | None = None

    def update(self, embedding: torch.Tensor) -> None:
        """Add a batch of embeddings to the running sums.

        Args:
            embedding (torch.Tensor): Features, shape ``(B, D, H, W)``.

        """
        batch, dim = embedding.shape[:2]
        x = embedding.detach().reshape(batch, dim, -1).permute(2, 0, 1).to(torch.float64)  # (L, B, D)
        if self.running_sum is None:
            self.count = self.count.to(x.device)
            self.running_sum = torch.zeros(x.shape[0], dim, dtype=torch.float64, device=x.device)
            self.running_outer = torch.zeros(x.shape[0], dim, dim, dtype=torch.float64, device=x.device)
        self.grid = tuple(embedding.shape[-2:])
        self.count += batch
        self.running_sum += x.sum(dim=1)
        self.running_outer += x.transpose(1, 2) @ x

    def finalize(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Turn the running sums into mean and precision buffers.

        Args:
            reduce (Callable | None): Sums a tensor over processes (distributed training); ``None`` in a single
                process. Every process must call it, also one that saw no image.

        Raises:
            ValueError: If no image was seen at all.

        """
        self._set_statistics(*self._mean_and_covariance(reduce))

    def finalize_variants(
        self, shrinkages: list[float], reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> list[StreamingGaussian]:
        """Fitted Gaussians from these running sums, one per covariance shrinkage (the sums are consumed).

        Args:
            shrinkages (list[float]): The shrinkage of each variant.
            reduce (Callable | None): As for :meth:`finalize`.

        Returns:
            list[StreamingGaussian]: One fitted Gaussian per shrinkage, in order.

        """
        mean, covariance = self._mean_and_covariance(reduce)
        variants = [self.fresh(shrinkage) for shrinkage in shrinkages]
        for index, variant in enumerate(variants):  # the last one takes the covariance itself, the others a copy
            variant._set_statistics(mean, covariance if index == len(variants) - 1 else covariance.clone())
        return variants

    def _mean_and_covariance(
        self, reduce: Callable[[torch.Tensor], torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``(L, D)`` and covariance ``(L, D, D)`` per location (float64) from the running sums, which it frees."""
        if reduce is not None:
            self.count = reduce(self.count)
            self.running_sum = reduce(self.running_sum)
            self.running_outer = reduce(self.running_outer)
        count = float(self.count)
        if count == 0 or self.running_sum is None:
            msg = "FocusDist saw no training image: give a training set with at least one normal image."
            raise ValueError(msg)
        # Neighbourhood averages of the sums: the mean is unchanged by averaging, the sample count is multiplied.
        # The (L, D, D) tensors are 254 MB each at 256x256: work in place and free each one as soon as possible.
        samples = count * self._neighbours(self.running_sum)
        mean = self._pooled(self.running_sum) / count
        covariance = self._pooled(self.running_outer)
        self.reset()
        covariance.baddbmm_(mean.unsqueeze(2), mean.unsqueeze(1), alpha=-count)  # scatter around the mean
        covariance.mul_((samples / count / (samples - 1.0).clamp_min(1.0))[:, None, None])
        return mean, covariance

    def _set_statistics(self, mean: torch.Tensor, covariance: torch.Tensor) -> None:
        """Shrink, regularise and invert the covariance (in place) into the stored mean and precision."""
        if self.shrinkage > 0:
            shared = covariance.mean(dim=0)
            covariance.mul_(1.0 - self.shrinkage).add_(shared, alpha=self.shrinkage)
            del shared
        diagonal = torch.diagonal(covariance, dim1=1, dim2=2)
        ridge = self.regularization * diagonal.clamp_min(0).mean() + 1e-6
        diagonal.add_(ridge)
        with single_threaded():  # Cholesky reads the lower triangle only: no symmetrising copy needed
            factor = torch.linalg.cholesky(covariance)
            del covariance, diagonal
            precision = torch.cholesky_inverse(factor)
            del factor
        scale = precision.abs().amax(dim=(1, 2))
        self.mean = mean.float()
        self.precision = precision.div_(scale[:, None, None]).to(self.storage_dtype)
        del precision
        self.precision_scale = scale.float()
        self.location_scale = torch.ones_like(self.precision_scale)  # uncalibrated until :meth:`calibrate`

    def calibrate(self, location_scale: torch.Tensor) -> None:
        """Divide every location's distance by its scale from now on.

        Args:
            location_scale (torch.Tensor): Positive scale per location, shape ``(L,)`` (see :func:`calibration_scale`).

        Raises:
            ValueError: If the Gaussian is not fitted, or the scale has another number of locations or is not positive.

        """
        check_calibration_scale(location_scale, self.location_scale, self.is_fitted, "fit the Gaussian first")
        self.location_scale = location_scale.to(self.location_scale)

    def _pooled(self, sums: torch.Tensor, count_include_pad: bool = False) -> torch.Tensor:
        """Average per-location sums ``(L, ...)`` over each location's neighbourhood on the grid."""
        if self.neighbourhood == 1 or self.grid is None:
            return sums
        height, width = self.grid
        flat = sums.reshape(height, width, -1).permute(2, 0, 1).unsqueeze(0)  # (1, K, h, w)
        pooled = torch.nn.functional.avg_pool2d(
            flat, self.neighbourhood, stride=1, padding=self.neighbourhood // 2, count_include_pad=count_include_pad
        )
        return pooled.squeeze(0).permute(1, 2, 0).reshape(sums.shape)

    def _neighbours(self, like: torch.Tensor) -> torch.Tensor:
        """Number of locations in each location's neighbourhood (fewer at the borders), shape ``(L,)``."""
        ones = torch.ones(like.shape[0], 1, dtype=like.dtype, device=like.device)
        return self._pooled(ones, count_include_pad=True)[:, 0] * self.neighbourhood**2

    def mahalanobis(self, embedding: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance of every location to its Gaussian.

        Args:
            embedding (torch.Tensor): Features, shape ``(B, D, H, W)``, with ``H * W`` equal to the fitted
                number of locations.

        Returns:
            torch.Tensor: Distances, shape ``(B, H, W)``.

        """
        batch, dim, height, width = embedding.shape
        with full_precision(embedding.device.type):  # half precision keeps 3 significant digits or fewer
            embedding = at_least_float32(embedding)
            delta = embedding.reshape(batch, dim, -1).permute(2, 0, 1) - self.mean.unsqueeze(1)  # (L, B, D)
            if embedding.device.type == "cpu" and not torch.compiler.is_exporting():
                chunks = zip(
                    delta.split(CPU_LOCATION_CHUNK),
                    self.precision.split(CPU_LOCATION_CHUNK),
                    self.precision_scale.split(CPU_LOCATION_CHUNK),
                    strict=True,
                )
                squared = torch.cat([squared_distance(*chunk) for chunk in chunks])
            else:  # one product: an exported graph folds the conversion into a float32 constant
                squared = squared_distance(delta, self.precision, self.precision_scale)
            distance = squared.clamp_min(0).sqrt() / self.location_scale.to(delta.dtype)[:, None]
        return distance.transpose(0, 1).reshape(batch, height, width)


def squared_distance(delta: torch.Tensor, precision: torch.Tensor, precision_scale: torch.Tensor) -> torch.Tensor:
    """Squared Mahalanobis distances from differences to the mean and stored (scaled) precision matrices.

    Args:
        delta (torch.Tensor): Feature minus mean, shape ``(L, B, D)``, float32 or wider.
        precision (torch.Tensor): Precision matrices divided by ``precision_scale``, shape ``(L, D, D)``, any dtype.
        precision_scale (torch.Tensor): Each location's scale, shape ``(L,)``.

    Returns:
        torch.Tensor: Squared distances, shape ``(L, B)`` (slightly negative where rounding cancels).

    """
    precision = precision.to(delta.dtype) * precision_scale[:, None, None].to(delta.dtype)
    return ((delta @ precision) * delta).sum(dim=2)


def check_calibration_scale(location_scale: torch.Tensor, current: torch.Tensor, fitted: bool, remedy: str) -> None:
    """Refuse a calibration scale that is not one positive number per fitted location (Gaussian or patch bank).

    Args:
        location_scale (torch.Tensor): The scale offered, ``(L,)``.
        current (torch.Tensor): The scorer's current scale, whose shape is that of its fitted locations.
        fitted (bool): Whether the scorer is fitted.
        remedy (str): What to do first, e.g. "fit the Gaussian first".

    Raises:
        ValueError: If the scorer is not fitted, or the scale has another number of locations or is not positive.

    """
    if not fitted or location_scale.shape != current.shape:
        msg = (
            f"calibrate needs one scale per fitted location, shape {tuple(current.shape)}, got "
            f"{tuple(location_scale.shape)}: {remedy}, on images of the same size."
        )
        raise ValueError(msg)
    if not bool((location_scale > 0).all()):
        msg = "Every location's calibration scale must be positive (a mean distance of normal images)."
        raise ValueError(msg)


def calibration_scale(distance_sum: torch.Tensor, count: float) -> torch.Tensor:
    """Calibration scale per location from the summed distances of normal images the Gaussian was not fitted on.

    Args:
        distance_sum (torch.Tensor): Sum over ``count`` images of their distance maps, shape ``(h, w)``.
        count (float): The number of images summed.

    Returns:
        torch.Tensor: Each location's mean distance relative to the mean over all locations, within
        ``SCALE_BOUNDS``, shape ``(h * w,)``; all ones when ``count`` is 0 or every distance is 0.

    Example:
        >>> calibration_scale(torch.tensor([[2.0, 6.0]]), count=2)
        tensor([0.5000, 1.5000])

    """
    mean = distance_sum.flatten().float() / max(count, 1.0)
    if count <= 0 or not bool(mean.mean() > 0):
        return torch.ones_like(mean)
    return (mean / mean.mean()).clamp(*SCALE_BOUNDS)
