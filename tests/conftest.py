"""Shared fixtures: a tiny MVTec-format dataset and a small FocusDist, all offline and CPU-only."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from .helpers import CATEGORY, IMAGE_SIZE, export_ir, tiny_datamodule, tiny_engine, tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _same_random_numbers_in_every_order() -> None:
    """Seed every test: what it draws must not depend on which tests ran before it (or it may fail by chance)."""
    from lightning.pytorch import seed_everything

    seed_everything(0, verbose=False)


@pytest.fixture(scope="session")
def tiny_dataset_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MVTec-format category (8 train, 4 good and 2 x 2 defective test images, 64 px)."""
    from anomalib_cfa_ncl.data import make_mvtec_dataset

    root = tmp_path_factory.mktemp("mvtec")
    make_mvtec_dataset(root, CATEGORY, n_train=8, n_test_good=4, n_test_per_defect=2, image_size=IMAGE_SIZE)
    return root


@pytest.fixture(scope="session")
def tiny_project(tiny_dataset_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Fit the tiny FocusDist once for the session; return the project folder and the checkpoint the Engine wrote.

    The integration and export tests all start from this one trained model, as a user does. Seeded: the model, and
    so its export's quantisation error, must not depend on which tests ran before it.
    """
    from lightning.pytorch import seed_everything

    seed_everything(0, verbose=False)
    project = tmp_path_factory.mktemp("project")
    engine = tiny_engine(project)
    engine.fit(model=tiny_model(), datamodule=tiny_datamodule(tiny_dataset_root))
    return project, Path(engine.trainer.checkpoint_callback.best_model_path)


@pytest.fixture(scope="session")
def dynamic_ir(tiny_project: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model exported once with ``Engine.export`` to an OpenVINO IR of dynamic input size."""
    return export_ir(tiny_project[1], tmp_path_factory.mktemp("dynamic"))


@pytest.fixture(scope="session")
def images(tiny_dataset_root: Path) -> list[torch.Tensor]:
    """The raw test images of the tiny dataset, ``(3, 64, 64)`` in [0, 1]."""
    from anomalib.data.utils import read_image

    paths = sorted((tiny_dataset_root / CATEGORY / "test").rglob("*.png"))
    return [read_image(path, as_tensor=True) for path in paths]
