"""Helpers for the tests: tiny datamodule, model and engine (offline, CPU-only)."""

from __future__ import annotations

from pathlib import Path

IMAGE_SIZE = 64
CATEGORY = "coffee"


def tiny_datamodule(root: Path, **kwargs):
    from anomalib.data import MVTecAD

    return MVTecAD(root=root, category=CATEGORY, train_batch_size=4, eval_batch_size=4, num_workers=0, **kwargs)


def tiny_model(**kwargs):
    """A FocusDist on an untrained resnet18 at 64x64 input (no weights to download)."""
    from anomalib_cfa_ncl import FocusDist

    defaults = {"backbone": "resnet18", "pre_trained": False, "projection_dim": 32, "n_features": 64}
    defaults.update(kwargs)
    return FocusDist(pre_processor=FocusDist.configure_pre_processor((IMAGE_SIZE, IMAGE_SIZE)), **defaults)


def tiny_engine(root: Path, **kwargs):
    from anomalib.engine import Engine

    defaults = {
        "max_epochs": 1,
        "default_root_dir": root,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
    }
    defaults.update(kwargs)
    return Engine(**defaults)
