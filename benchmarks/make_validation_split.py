"""Write a validation benchmark made from training images only, for choosing defaults without test anomalies.

For every category of an MVTec-format root, the normal training images are split once (seeded): most stay
training images, the held-back rest become the validation test set twice, as they are (``test/good``) and with a
synthetic anomaly from anomalib's :class:`~anomalib.data.utils.generators.perlin.PerlinAnomalyGenerator`
(``test/perlin``, masks in ``ground_truth/perlin``). The Perlin-noise defects differ from the defects of the
development suite, and no test image of the source root is read, so ``quality.py --root OUT`` measures a choice
on training data alone.

Usage:
    python benchmarks/make_validation_split.py --root DATA --out DATA_VAL [--held-back 0.2] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator
from PIL import Image


def read_rgb(path: Path) -> torch.Tensor:
    """An image file as a float tensor ``(3, H, W)`` in ``[0, 1]``."""
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1).float() / 255


def write_png(path: Path, array: np.ndarray) -> None:
    """Write an ``(H, W, 3)`` or ``(H, W)`` uint8 array as PNG, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def split_category(source: Path, target: Path, held_back: float, seed: int) -> tuple[int, int]:
    """Write one category's validation copy; return the numbers of training and held-back images."""
    images = sorted(path for path in (source / "train" / "good").iterdir() if path.is_file())
    order = np.random.default_rng(seed).permutation(len(images))
    n_held = max(1, round(held_back * len(images)))
    held, kept = [images[i] for i in order[:n_held]], [images[i] for i in order[n_held:]]
    for path in kept:
        write_png(target / "train" / "good" / path.name, np.asarray(Image.open(path).convert("RGB")))
    torch.manual_seed(seed)
    generator = PerlinAnomalyGenerator(probability=1.0)
    for path in held:
        image = read_rgb(path)
        anomalous, mask = generator(image)
        write_png(target / "test" / "good" / path.name, (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        as_uint8 = (anomalous.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        write_png(target / "test" / "perlin" / path.name, as_uint8)
        mask_png = ((mask[0] > 0.5).numpy() * 255).astype(np.uint8)
        write_png(target / "ground_truth" / "perlin" / f"{path.stem}_mask.png", mask_png)
    return len(kept), len(held)


def main() -> None:
    """Parse arguments and write every category."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="MVTec-format root whose training images are split")
    parser.add_argument("--out", type=Path, required=True, help="new folder for the validation benchmark")
    parser.add_argument("--held-back", type=float, default=0.2, help="fraction of the training images held back")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.out.exists():
        parser.error(f"{args.out} exists: choose a new folder (nothing is overwritten).")
    for category in sorted(path for path in args.root.iterdir() if (path / "train" / "good").is_dir()):
        kept, held = split_category(category, args.out / category.name, args.held_back, args.seed)
        print(f"{category.name}: {kept} training images, {held} held back (normal and with a Perlin anomaly)")


if __name__ == "__main__":
    main()
