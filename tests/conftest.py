"""Shared fixtures: a tiny MVTec-format dataset and a small FocusDist, all offline and CPU-only."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from .helpers import CATEGORY, IMAGE_SIZE

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_dataset_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MVTec-format category (8 train, 4 good and 2 x 2 defective test images, 64 px)."""
    from anomalib_cfa_ncl.data import make_mvtec_dataset

    root = tmp_path_factory.mktemp("mvtec")
    make_mvtec_dataset(root, CATEGORY, n_train=8, n_test_good=4, n_test_per_defect=2, image_size=IMAGE_SIZE)
    return root
