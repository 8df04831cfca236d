"""Dataset checks (issue 10): unreadable files, masks, rotation tags and a test set without anomalies."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
from PIL import Image

from .helpers import CATEGORY, tiny_datamodule, tiny_engine, tiny_model
from .test_cli import TINY_MODEL, assert_one_line_error, mvtec_args, run_anomalib


def copy_dataset(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target / CATEGORY


def test_unreadable_images_are_all_named_before_training(tiny_dataset_root: Path, tmp_path: Path) -> None:
    """A truncated PNG in train/good and a zero-byte PNG in test: one line naming both, and no results folder."""
    category = copy_dataset(tiny_dataset_root, tmp_path / "data")
    truncated = sorted((category / "train" / "good").glob("*.png"))[0]
    truncated.write_bytes(truncated.read_bytes()[:200])
    empty = sorted((category / "test" / "good").glob("*.png"))[0]
    empty.write_bytes(b"")
    result = run_anomalib("train", *TINY_MODEL, *mvtec_args(tmp_path / "data"), cwd=tmp_path)
    assert_one_line_error(result, "2 image file(s) cannot be read", str(truncated), str(empty))
    assert not (tmp_path / "results" / "FocusDist" / "MVTec" / CATEGORY / "v0").exists()
    assert len(list(category.rglob("*.png"))) == len(list((tiny_dataset_root / CATEGORY).rglob("*.png")))


def test_defect_images_without_masks_are_named(tiny_dataset_root: Path, tmp_path: Path) -> None:
    from anomalib_cfa_ncl.data import MVTec

    category = copy_dataset(tiny_dataset_root, tmp_path / "data")
    masks = sorted((category / "ground_truth").rglob("*_mask.png"))
    for mask in masks[:2]:
        mask.unlink()
    names = [f"test/{mask.parent.name}/{mask.name.removesuffix('_mask.png')}.png" for mask in masks[:2]]
    with pytest.raises(ValueError, match="2 defect image") as error:
        MVTec(root=tmp_path / "data", category=CATEGORY).prepare_data()
    message = str(error.value)
    assert "\n" not in message and all(name in message for name in names)


def test_masks_of_another_size_are_named(tiny_dataset_root: Path, tmp_path: Path, caplog) -> None:
    from anomalib_cfa_ncl.data.checks import check_dataset_images

    category = copy_dataset(tiny_dataset_root, tmp_path / "data")
    mask = sorted((category / "ground_truth").rglob("*_mask.png"))[0]
    Image.open(mask).resize((32, 48)).save(mask)
    datamodule = tiny_datamodule(tmp_path / "data")
    datamodule.setup()
    with caplog.at_level(logging.WARNING):
        check_dataset_images(datamodule)
    (line,) = [record.getMessage() for record in caplog.records if "differ in size" in record.getMessage()]
    assert line.startswith("1 mask(s) differ in size from their image") and f"{mask} 32x48 for 64x64" in line


def test_exif_rotation_tags_are_reported_once(tiny_dataset_root: Path, tmp_path: Path, caplog) -> None:
    from anomalib_cfa_ncl.data.checks import check_dataset_images

    category = copy_dataset(tiny_dataset_root, tmp_path / "data")
    rotated = sorted((category / "train" / "good").glob("*.png"))[:3]
    for path in rotated:
        image = Image.open(path)
        exif = image.getexif()
        exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
        image.save(path, exif=exif)
    datamodule = tiny_datamodule(tmp_path / "data")
    datamodule.setup()
    with caplog.at_level(logging.WARNING):
        check_dataset_images(datamodule)
        check_dataset_images(datamodule)  # fit, then test: one warning
    lines = [record.getMessage() for record in caplog.records if "EXIF" in record.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("3 image(s) carry an EXIF rotation tag (e.g. ")


def test_test_set_without_anomalies_says_auroc_is_undefined(tiny_dataset_root: Path, tmp_path: Path, caplog) -> None:
    category = copy_dataset(tiny_dataset_root, tmp_path / "data")
    for folder in (category / "test").iterdir():
        if folder.name != "good":
            shutil.rmtree(folder)
    shutil.rmtree(category / "ground_truth")
    model, datamodule, engine = tiny_model(), tiny_datamodule(tmp_path / "data"), tiny_engine(tmp_path)
    with caplog.at_level(logging.WARNING):
        engine.fit(model, datamodule=datamodule)
        engine.test(model, datamodule=datamodule)
    lines = [record.getMessage() for record in caplog.records if "no anomalous image" in record.getMessage()]
    assert lines == [
        "The test set has no anomalous image (4 normal ones): image and pixel AUROC are undefined and are reported "
        "as 0; add defect images to test/<defect>/ to measure them."
    ]
