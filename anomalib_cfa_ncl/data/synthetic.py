"""A small MVTec-format dataset built on the fly from photos shipped with scikit-image (no download).

It serves the README's demo, the notebook and the tests: normal images are one object photographed under a
random pose, light and sensor noise (like a part on a conveyor), and defective ones carry a stain or a
scratch whose mask is exact.

Layout: ``root/<category>/{train/good, test/good, test/<defect>, ground_truth/<defect>/<name>_mask.png}``,
readable by anomalib's ``MVTecAD`` datamodule (``root=root, category=category``).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from skimage import data as skimage_data

PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "coffee": skimage_data.coffee,
    "astronaut": skimage_data.astronaut,
    "chelsea": skimage_data.chelsea,
}


def _square(photo: np.ndarray, size: int) -> np.ndarray:
    height, width = photo.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return cv2.resize(photo[top : top + side, left : left + side], (size, size), interpolation=cv2.INTER_AREA)


def _posed(base: np.ndarray, rng: np.random.Generator, max_angle: float, max_shift: float) -> np.ndarray:
    """Photograph the object under a random rotation, shift and scale, with a random gain and sensor noise."""
    size = base.shape[0]
    matrix = cv2.getRotationMatrix2D((size / 2, size / 2), rng.uniform(-max_angle, max_angle), rng.uniform(0.95, 1.05))
    matrix[:, 2] += rng.uniform(-max_shift, max_shift, 2) * size
    image = cv2.warpAffine(base, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    image = image.astype(np.float32) * rng.uniform(0.95, 1.05) + rng.normal(0, 2.0, image.shape)
    return image.clip(0, 255).astype(np.uint8)


def _stain(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    mask = np.zeros((size, size), np.uint8)
    center = (int(rng.integers(size // 4, 3 * size // 4)), int(rng.integers(size // 4, 3 * size // 4)))
    axes = (int(rng.integers(size // 20, size // 10) + 1), int(rng.integers(size // 20, size // 10) + 1))
    cv2.ellipse(mask, center, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    alpha = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 1.0)[..., None]
    tint = rng.uniform(0.3, 0.6) if rng.random() < 0.5 else rng.uniform(1.5, 1.9)
    stained = image.astype(np.float32) * (1 - alpha) + image.astype(np.float32) * tint * alpha
    return stained.clip(0, 255).astype(np.uint8), mask


def _scratch(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    mask = np.zeros((size, size), np.uint8)
    start = rng.integers(size // 5, 4 * size // 5, 2)
    end = np.clip(start + rng.integers(-size // 3, size // 3, 2), 0, size - 1)
    cv2.line(mask, (int(start[0]), int(start[1])), (int(end[0]), int(end[1])), 1, max(size // 64, 2))
    value = 240.0 if image.mean() < 128 else 15.0
    alpha = mask.astype(np.float32)[..., None] * 0.9
    scratched = image.astype(np.float32) * (1 - alpha) + value * alpha
    return scratched.clip(0, 255).astype(np.uint8), mask


DEFECTS = {"stain": _stain, "scratch": _scratch}


def _write(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image)


def make_mvtec_dataset(
    root: str | Path,
    category: str = "coffee",
    n_train: int = 60,
    n_test_good: int = 12,
    n_test_per_defect: int = 8,
    image_size: int = 224,
    max_angle: float = 12.0,
    max_shift: float = 0.05,
    seed: int = 0,
) -> Path:
    """Write a small MVTec-format category.

    Args:
        root (str | Path): Dataset root; the category folder is created below it.
        category (str): One of ``"coffee"``, ``"astronaut"`` and ``"chelsea"`` (the photo used).
        n_train (int): Normal training images.
        n_test_good (int): Normal test images.
        n_test_per_defect (int): Test images per defect type (stain, scratch).
        image_size (int): Side of the square images.
        max_angle (float): Largest random rotation of the object, in degrees.
        max_shift (float): Largest random shift, as a fraction of the side.
        seed (int): Random seed; the same seed writes the same files.

    Returns:
        Path: The category folder.

    Example:
        >>> folder = make_mvtec_dataset("datasets/demo", n_train=8)  # doctest: +SKIP

    """
    if category not in PHOTOS:
        msg = f"Unknown synthetic category {category!r}: choose one of {sorted(PHOTOS)}."
        raise ValueError(msg)
    rng = np.random.default_rng(seed)
    base = _square(PHOTOS[category]()[..., :3], image_size)
    folder = Path(root) / category
    for index in range(n_train):
        _write(folder / "train/good" / f"{index:03d}.png", _posed(base, rng, max_angle, max_shift))
    for index in range(n_test_good):
        _write(folder / "test/good" / f"{index:03d}.png", _posed(base, rng, max_angle, max_shift))
    for name, defect in DEFECTS.items():
        for index in range(n_test_per_defect):
            image, mask = defect(_posed(base, rng, max_angle, max_shift), rng)
            _write(folder / "test" / name / f"{index:03d}.png", image)
            _write(folder / "ground_truth" / name / f"{index:03d}_mask.png", mask * 255)
    return folder


def make_btad_dataset(root: str | Path, category: str = "01", photo: str = "coffee", **kwargs: Any) -> Path:
    """Write a small category in BTAD layout (anomalib's ``BTech``), with the images of :func:`make_mvtec_dataset`.

    Layout: ``root/<category>/{train/ok, test/ok, test/ko, ground_truth/ko/<name>.png}``.

    Args:
        root (str | Path): Dataset root; the category folder is created below it.
        category (str): Name of the category folder, e.g. ``"01"``.
        photo (str): The photo used, one of ``"coffee"``, ``"astronaut"`` and ``"chelsea"``.
        **kwargs: Sizes and poses, as for :func:`make_mvtec_dataset`.

    Returns:
        Path: The category folder.

    Example:
        >>> folder = make_btad_dataset("datasets/BTech", n_train=8)  # doctest: +SKIP

    """
    folder = Path(root) / category
    with tempfile.TemporaryDirectory() as scratch:
        mvtec = make_mvtec_dataset(scratch, photo, **kwargs)
        for image in sorted(mvtec.glob("*/*/*.png")):
            split, label = image.parent.parent.name, image.parent.name
            if split == "ground_truth":
                target = folder / split / "ko" / f"{label}_{image.name.removesuffix('_mask.png')}.png"
            elif label == "good":
                target = folder / split / "ok" / image.name
            else:
                target = folder / split / "ko" / f"{label}_{image.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(image, target)
    return folder
