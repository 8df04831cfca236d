"""Checks and a lossless-by-design conversion for image files anomalib would read wrongly.

anomalib reads every image with ``PIL.Image.open(path).convert("RGB")``. That is right for 8-bit grayscale
(replicated to three channels), palette images and RGBA (alpha dropped), but a 16-bit grayscale PNG or TIFF
is clipped to 255, so almost every pixel turns white without any error. FocusDist refuses such datasets with
a one-line error, and this module converts them: one bit depth for the whole dataset (so intensities stay
comparable between images), written to a new folder (the originals are never touched).

Usage:
    python -m anomalib_cfa_ncl.data.convert SOURCE_ROOT TARGET_ROOT [--bits 12]
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

HIGH_BIT_DEPTH_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}
IMAGE_SUFFIXES = {".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg"}


def high_bit_depth_images(paths: Iterable[str | Path]) -> list[Path]:
    """Return the images anomalib would clip (16-bit or float grayscale); reads file headers only.

    Args:
        paths (Iterable[str | Path]): Image files.

    Returns:
        list[Path]: The files whose mode is 16-bit or 32-bit grayscale.
    """
    found = []
    for path in paths:
        with Image.open(path) as image:
            if image.mode in HIGH_BIT_DEPTH_MODES:
                found.append(Path(path))
    return found


def check_image_files(paths: Iterable[str | Path]) -> None:
    """Raise a one-line error if any image would be clipped by anomalib's reader.

    Args:
        paths (Iterable[str | Path]): Image files of a dataset.

    Raises:
        ValueError: If a 16-bit (or float) grayscale image is among them.
    """
    found = high_bit_depth_images(paths)
    if found:
        msg = (
            f"{len(found)} images are 16-bit grayscale (e.g. {str(found[0])!r}), which anomalib reads as 8-bit and "
            "clips to white: convert the dataset first with "
            "`python -m anomalib_cfa_ncl.data.convert SOURCE_ROOT TARGET_ROOT`."
        )
        raise ValueError(msg)


def _bit_depth(files: list[Path]) -> int:
    """The smallest bit depth (8 to 16) that holds the largest value of all high-bit-depth files."""
    peak = max((int(np.asarray(Image.open(path)).max()) for path in files), default=255)
    return min(max(int(peak).bit_length(), 8), 16)


def convert_dataset(source: str | Path, target: str | Path, bits: int | None = None) -> int:
    """Copy an image dataset, converting 16-bit grayscale images to 8-bit RGB with one shared scale.

    Args:
        source (str | Path): Dataset root (e.g. an MVTec-format folder).
        target (str | Path): New root; must not exist yet. Other files are copied unchanged.
        bits (int | None): Bit depth of the camera (e.g. 12); ``None`` takes the smallest depth that holds the
            dataset's largest value.

    Returns:
        int: Number of converted images.

    Raises:
        FileExistsError: If ``target`` exists (nothing is overwritten).
    """
    source, target = Path(source), Path(target)
    if target.exists():
        msg = f"Target {str(target)!r} exists: give a new folder (the conversion never overwrites files)."
        raise FileExistsError(msg)
    images = [path for path in source.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES]
    deep = set(high_bit_depth_images(images))
    depth = bits or _bit_depth(sorted(deep))
    for path in source.rglob("*"):
        destination = target / path.relative_to(source)
        if path.is_dir():
            destination.mkdir(parents=True, exist_ok=True)
            continue
        destination.parent.mkdir(parents=True, exist_ok=True)
        if path in deep:
            values = np.asarray(Image.open(path)).astype(np.float64)
            scaled = np.clip(np.round(values * 255.0 / (2**depth - 1)), 0, 255).astype(np.uint8)
            Image.fromarray(scaled).convert("RGB").save(destination)
        else:
            shutil.copy2(path, destination)
    return len(deep)


def main() -> None:
    """Command line: convert SOURCE_ROOT into TARGET_ROOT."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--bits", type=int, default=None, help="camera bit depth (default: from the data)")
    args = parser.parse_args()
    if not args.source.is_dir():
        parser.error(f"{args.source} is not a folder")
    count = convert_dataset(args.source, args.target, args.bits)
    print(f"converted {count} high-bit-depth images; dataset written to {args.target}")


if __name__ == "__main__":
    main()
