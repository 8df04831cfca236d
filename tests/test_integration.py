"""The sequence anomalib's own model integration test runs for every built-in model.

fit (the session's tiny model), test, train, validate and predict from the checkpoint, then export, on a tiny
generated MVTec-format dataset with ``max_epochs=1``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from anomalib.data.utils import read_image
from anomalib.deploy import ExportType

from anomalib_cfa_ncl import FocusDist

from .helpers import CATEGORY, tiny_datamodule, tiny_engine, tiny_model, with_obvious_defect


@pytest.fixture(scope="module")
def project(tiny_project: tuple[Path, Path]) -> tuple[Path, Path]:
    """The session's tiny model (``conftest.tiny_project``): its project folder and the checkpoint the Engine wrote."""
    project_path, checkpoint = tiny_project
    run = project_path / "FocusDist" / "MVTecAD" / CATEGORY / "v0"
    assert checkpoint == run / "weights" / "lightning" / "model.ckpt"
    return project_path, checkpoint


@pytest.mark.parametrize("stage", ["test", "validate", "predict", "train"])
def test_stage_from_checkpoint(stage: str, project: tuple[Path, Path], tiny_dataset_root: Path) -> None:
    project_path, checkpoint = project
    engine = tiny_engine(project_path)
    result = getattr(engine, stage)(
        model=tiny_model(), datamodule=tiny_datamodule(tiny_dataset_root), ckpt_path=str(checkpoint)
    )
    if stage == "test":
        assert {"image_AUROC", "pixel_AUROC"} <= set(result[0])
    if stage == "predict":
        assert sum(len(batch.pred_score) for batch in result) == 8


def test_an_obvious_defect_scores_above_every_normal_image(project: tuple[Path, Path], tiny_dataset_root: Path) -> None:
    _, checkpoint = project
    model = FocusDist.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    normal = [read_image(path, as_tensor=True) for path in sorted(tiny_dataset_root.glob(f"{CATEGORY}/*/good/*.png"))]
    images = model.pre_processor.transform(torch.stack([*normal, with_obvious_defect(normal[0])]))
    with torch.no_grad():  # raw scores: the post-processor's normalised ones saturate at 1
        scores = model.model(images).pred_score
    assert scores[-1] > scores[:-1].max()


def test_export(project: tuple[Path, Path], tmp_path: Path) -> None:
    """Torch export here; OpenVINO (which anomalib writes through ONNX) is the session's ``dynamic_ir``, checked
    against PyTorch in ``test_export.py``, and the ONNX file of ``anomalib export`` is checked in ``test_cli.py``."""
    project_path, checkpoint = project
    engine = tiny_engine(project_path)
    exported = engine.export(
        model=tiny_model(), export_type=ExportType.TORCH, ckpt_path=str(checkpoint), export_root=tmp_path
    )
    assert exported is not None
    assert Path(exported).is_file()
