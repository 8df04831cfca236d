"""Synthetic defects on held-back training images, the data every decision of the gate (:mod:`.gate`) rests on.

Two families, so that no decision rests on one kind of defect: anomalib's Perlin-noise blobs, and thin curved lines
(1 to 4 px wide) along the zero level set of anomalib's Perlin noise inside a random disc, filled and blended as
anomalib fills its blobs. Both have fixed seeds, so that a decision is reproducible.

Both are drawn in pixel values (``[0, 1]``), for which anomalib made its generator: blended into ImageNet-normalised
images (about ``[-2.1, 2.6]``), a fill in ``[0, 1]`` would be a grey, low-contrast patch, not anomalib's defect.
"""

from __future__ import annotations

import torch
from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator, generate_perlin_noise

PERLIN_SEED = 0
THIN_SEED = 1
THIN_HALF_WIDTH = (0.6, 2.0)  # pixels: lines 1 to 4 px wide
THIN_RADIUS = (0.08, 0.23)  # of the shorter image side: 20 to 60 px at 256 px
THIN_MIN_PIXELS = 30
THIN_BLEND = (0.1, 0.6)  # share of the image kept under the line

PixelNormalization = tuple[torch.Tensor, torch.Tensor]  # per-channel mean and std: normalised = (pixels - mean) / std


def anomalous_copies(
    images: torch.Tensor, normalization: PixelNormalization | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each family's anomalous copy of every image (Perlin blobs, then thin lines), drawn in pixel values.

    Args:
        images (torch.Tensor): Pre-processed images, shape ``(B, 3, H, W)``.
        normalization (PixelNormalization | None): The per-channel mean and std ``(3,)`` the pre-processor normalised
            ``images`` with; ``None`` when they are pixel values already.

    Returns:
        list[tuple[torch.Tensor, torch.Tensor]]: Per family, the anomalous images ``(B, 3, H, W)`` in the frame of
        ``images`` and their masks ``(B, H, W)``; pixels outside a mask are the input's, bit for bit.

    Example:
        >>> mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
        >>> images = (torch.rand(2, 3, 64, 64) - mean.view(3, 1, 1)) / std.view(3, 1, 1)
        >>> [anomalous.shape for anomalous, _ in anomalous_copies(images, (mean, std))]
        [torch.Size([2, 3, 64, 64]), torch.Size([2, 3, 64, 64])]

    """
    if normalization is None:
        return [perlin_anomalies(images), thin_anomalies(images)]
    mean, std = (value.to(images).view(1, -1, 1, 1) for value in normalization)
    pixels = images * std + mean
    copies = []
    for anomalous, masks in (perlin_anomalies(pixels), thin_anomalies(pixels)):
        # only the defect's pixels go back through the normalisation: the rest keep their exact values
        copies.append((torch.where(masks[:, None], (anomalous - mean) / std, images), masks))
    return copies


def perlin_anomalies(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Add an anomalib Perlin-noise anomaly to every image.

    Args:
        images (torch.Tensor): Pre-processed images, shape ``(B, 3, H, W)``.

    Returns:
        tuple[torch.Tensor, torch.Tensor]: Anomalous images ``(B, 3, H, W)`` and their masks ``(B, H, W)``.

    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(PERLIN_SEED)
        anomalous, masks = PerlinAnomalyGenerator(probability=1.0)(images.cpu())
    return anomalous.to(images.device, images.dtype), masks[:, 0].to(images.device) > 0.5


def thin_anomalies(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw a thin curved line into every image: the scale of scratches and cracks, which Perlin blobs do not test.

    Args:
        images (torch.Tensor): Pre-processed images, shape ``(B, 3, H, W)``.

    Returns:
        tuple[torch.Tensor, torch.Tensor]: Anomalous images ``(B, 3, H, W)`` and their masks ``(B, H, W)``.

    Example:
        >>> anomalous, masks = thin_anomalies(torch.zeros(2, 3, 256, 256))
        >>> anomalous.shape, masks.shape, bool(masks.flatten(1).any(dim=1).all())
        (torch.Size([2, 3, 256, 256]), torch.Size([2, 256, 256]), True)

    """
    height, width = images.shape[-2:]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(THIN_SEED)
        generator = PerlinAnomalyGenerator(probability=1.0)
        anomalous, masks = [], []
        for image in images.cpu():
            mask = _thin_line_mask(height, width)
            noise = generate_perlin_noise(height, width, device=torch.device("cpu"))
            fill = generator.augmenters((noise * 0.5 + 0.25).expand(3, -1, -1)).to(image.dtype)
            kept = _uniform(*THIN_BLEND)
            line = mask.to(image.dtype)
            anomalous.append(image * (1 - line) + ((1 - kept) * fill + kept * image) * line)
            masks.append(mask)
    return torch.stack(anomalous).to(images.device), torch.stack(masks).to(images.device)


def _thin_line_mask(height: int, width: int) -> torch.Tensor:
    """A band of 1 to 4 px around the zero level set of Perlin noise, cut to a random disc, ``(H, W)`` bool."""
    mask = torch.zeros(height, width, dtype=torch.bool)
    rows, columns = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    for _ in range(20):  # a disc can miss the level set: draw again
        cells = 2 ** int(torch.randint(1, 4, (1,)))
        noise = generate_perlin_noise(height, width, scale=(cells, cells), device=torch.device("cpu"))
        gradient_rows, gradient_columns = torch.gradient(noise)
        gradient = (gradient_rows.square() + gradient_columns.square()).sqrt().clamp_min(1e-6)
        band = noise.abs() / gradient < _uniform(*THIN_HALF_WIDTH)  # distance to the zero level set, in pixels
        radius = _uniform(*THIN_RADIUS) * min(height, width)
        centre_row = _uniform(radius, max(height - radius, radius))
        centre_column = _uniform(radius, max(width - radius, radius))
        disc = (rows - centre_row).square() + (columns - centre_column).square() < radius**2
        mask = band & disc
        if mask.sum() >= min(THIN_MIN_PIXELS, height * width // 100):
            break
    return mask


def _uniform(low: float, high: float) -> float:
    """A number drawn uniformly from ``[low, high)`` with the global generator (seeded by the caller)."""
    return low + (high - low) * float(torch.rand(()))
