"""Dataset checks of FocusDist runs: image files anomalib would misread or cannot read, masks, an empty training set.

anomalib_cfa_ncl adds :class:`DatasetChecks` to every FocusDist run (``FocusDist.run_callbacks``), so a dataset
FocusDist cannot learn from stops with a one-line error that says the fix before any training starts, and a
dataset that works but deserves a word (rotation tags, resized masks, no anomalous test image) gets one warning.

Example:
    >>> from anomalib_cfa_ncl.data.checks import DatasetChecks
    >>> engine = Engine(callbacks=[DatasetChecks()])  # for any model; FocusDist adds one itself  # doctest: +SKIP

"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from PIL import Image

from .convert import check_image_files

__all__ = ["DatasetChecks", "check_dataset_images", "check_missing_masks", "check_training_set"]

logger = logging.getLogger(__name__)

EXIF_ORIENTATION = 0x0112  # values other than 1 ask a viewer to rotate or mirror; anomalib's reader ignores them
SPLITS = ("train_data", "val_data", "test_data")
_decoded: dict[tuple[str, int, int], int | None] = {}  # (path, size, mtime) decoded in this process: orientation
RUN_BY_PRODUCTS = {"config.yaml"}  # written into a run's folder before the checks (anomalib CLI's config)
_warned: set[str] = set()


def warn_once(message: str) -> None:
    """Log a warning the first time this process sees it (a run sets the datamodule up once per stage)."""
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def _samples(datamodule: object, column: str) -> Iterator[Any]:
    """Per dataset of the datamodule that has ``column``, its samples; for ``mask_path`` only the anomalous ones.

    anomalib reads masks of anomalous images only (a normal image gets an empty mask), and some datasets (BTech)
    list a mask path for normal images that does not exist.
    """
    for name in SPLITS:
        samples = getattr(getattr(datamodule, name, None), "samples", None)
        if samples is None or column not in samples:
            continue
        if column == "mask_path" and "label_index" in samples:
            samples = samples[samples["label_index"] == 1]
        yield samples


def _files(datamodule: object, column: str) -> list[str]:
    """The files of ``column`` (``image_path`` or ``mask_path``) in every dataset of the datamodule, each once."""
    found: dict[str, None] = {}
    for samples in _samples(datamodule, column):
        found.update(dict.fromkeys(str(path) for path in samples[column] if isinstance(path, str) and path))
    return list(found)


def _decode(path: str) -> int | None:
    """Decode an image file in full (as training will); return its EXIF orientation. Raises if it is unreadable."""
    stat = Path(path).stat()
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key not in _decoded:
        with Image.open(path) as image:
            image.load()
            _decoded[key] = image.getexif().get(EXIF_ORIENTATION)
    return _decoded[key]


def check_readable_images(paths: Iterable[str]) -> None:
    """Refuse truncated, empty or non-image files, naming every one; warn once about EXIF rotation tags.

    Args:
        paths (Iterable[str]): Image and mask files.

    Raises:
        ValueError: If a file cannot be decoded.

    """
    unreadable, rotated = [], []
    for path in paths:
        try:
            orientation = _decode(path)
        except Exception:  # PIL raises OSError, SyntaxError, ValueError... for broken files
            unreadable.append(path)
            continue
        if orientation not in (None, 1):
            rotated.append(path)
    if unreadable:
        msg = (
            f"{len(unreadable)} image file(s) cannot be read (truncated, empty or not an image): "
            f"{', '.join(unreadable)}. Replace or remove them, then run again."
        )
        raise ValueError(msg)
    if rotated:
        warn_once(
            f"{len(rotated)} image(s) carry an EXIF rotation tag (e.g. {rotated[0]}), which anomalib ignores: "
            "they are used as stored, not as a photo viewer shows them; rotate the files themselves if that matters."
        )


def check_mask_sizes(datamodule: object) -> None:
    """Warn once, naming them, about masks whose size differs from their image's (anomalib stretches them)."""
    pairs: dict[tuple[str, str], None] = {}
    for samples in _samples(datamodule, "mask_path"):
        pairs.update(dict.fromkeys(zip(samples["image_path"], samples["mask_path"], strict=True)))
    differ = []
    for image_path, mask_path in pairs:
        if isinstance(mask_path, str) and mask_path:
            with Image.open(image_path) as image, Image.open(mask_path) as mask:
                if image.size != mask.size:
                    differ.append(f"{mask_path} {mask.size[0]}x{mask.size[1]} for {image.size[0]}x{image.size[1]}")
    if differ:
        warn_once(
            f"{len(differ)} mask(s) differ in size from their image and are stretched to it: {'; '.join(differ)}."
        )


def check_dataset_images(datamodule: object) -> None:
    """Refuse image files anomalib would misread or cannot read, in every dataset of the datamodule."""
    images, masks = _files(datamodule, "image_path"), _files(datamodule, "mask_path")
    check_readable_images([*images, *masks])
    check_image_files(images)
    check_mask_sizes(datamodule)


def check_missing_masks(category_root: str | Path) -> None:
    """Refuse defect images of an MVTec-layout folder without ``ground_truth/<defect>/<name>_mask.png``.

    Raises:
        ValueError: Naming every defect image without its mask.

    """
    root = Path(category_root)
    missing = [
        str(image.relative_to(root))
        for image in sorted((root / "test").glob("*/*"))
        if image.parent.name != "good"
        and image.is_file()
        and not (root / "ground_truth" / image.parent.name / f"{image.stem}_mask.png").is_file()
    ]
    if missing:
        msg = (
            f"{len(missing)} defect image(s) in {root} have no mask ground_truth/<defect>/<name>_mask.png: "
            f"{', '.join(missing)}. Add their masks or move the images out of test/."
        )
        raise ValueError(msg)


def check_test_labels(datamodule: object) -> None:
    """Warn once when the test set has no anomalous image: image AUROC is then undefined (torchmetrics gives 0)."""
    samples = getattr(getattr(datamodule, "test_data", None), "samples", None)
    if samples is not None and "label_index" in samples and len(samples) and not (samples["label_index"] == 1).any():
        warn_once(
            f"The test set has no anomalous image ({len(samples)} normal ones): image and pixel AUROC are undefined "
            "and are reported as 0; add defect images to test/<defect>/ to measure them."
        )


def check_training_set(datamodule: object) -> None:
    """Refuse an empty training set before the sampler fails with an obscure message."""
    train_data = getattr(datamodule, "train_data", None)
    if train_data is not None and len(train_data) == 0:
        root = getattr(datamodule, "root", None)
        category = getattr(datamodule, "category", None)
        where = f" in {Path(root) / category / 'train' / 'good'}" if root and category else ""
        msg = (
            f"The training set is empty: no normal image was found{where}. FocusDist learns from defect-free "
            "images only; put at least one (ideally 50 or more) there, or point --data.root/--data.category "
            "at the right folder."
        )
        raise ValueError(msg)


def remove_empty_run_folder(trainer: Trainer) -> None:
    """Remove the run's results folder when it holds no result yet (and its ``latest`` link): nothing to keep."""
    root = Path(trainer.default_root_dir)
    if not root.is_dir() or any(path.is_file() and path.name not in RUN_BY_PRODUCTS for path in root.rglob("*")):
        return
    latest = root.parent / "latest"
    if latest.is_symlink() and latest.resolve() == root.resolve():
        latest.unlink()
    shutil.rmtree(root)


class DatasetChecks(Callback):
    """Check the datamodule's files on every run, and that there are training images before fitting."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Run the checks once the datamodule has set up its datasets; leave no empty results folder behind."""
        del pl_module
        datamodule = getattr(trainer, "datamodule", None)
        try:
            check_dataset_images(datamodule)
            if stage == "fit":
                check_training_set(datamodule)
        except ValueError:
            remove_empty_run_folder(trainer)
            raise
        if stage in {"fit", "test"}:
            check_test_labels(datamodule)
