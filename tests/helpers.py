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


def export_ir(checkpoint: Path, root: Path, **kwargs) -> Path:
    """Export an OpenVINO IR from a checkpoint with ``Engine.export``, as a user would."""
    from anomalib.deploy import ExportType

    return tiny_engine(root).export(
        model=tiny_model(),
        export_type=ExportType.OPENVINO,
        ckpt_path=str(checkpoint),
        export_root=root,
        onnx_kwargs={"opset_version": 18},
        **kwargs,
    )


def with_obvious_defect(image):
    """A copy of an RGB image ``(3, H, W)`` in [0, 1] with a saturated magenta square over a third of its side.

    No model that works can miss it: every test that scores such images asserts they score above every normal one.
    """
    side = image.shape[-1] // 3
    top, left = image.shape[-2] // 3, image.shape[-1] // 3
    copy = image.clone()
    copy[0, top : top + side, left : left + side] = 1.0
    copy[1, top : top + side, left : left + side] = 0.0
    copy[2, top : top + side, left : left + side] = 1.0
    return copy


def make_defects_obvious(category_root: Path) -> None:
    """Paint the obvious defect of :func:`with_obvious_defect` into every defective test image and its mask."""
    import numpy as np
    import torch
    from PIL import Image

    for path in sorted((category_root / "test").glob("*/*.png")):
        if path.parent.name == "good":
            continue
        image = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1) / 255.0
        painted = with_obvious_defect(image)
        Image.fromarray((painted.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)
        mask_path = category_root / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
        mask = np.asarray(Image.open(mask_path)).copy()
        mask[(painted != image).any(dim=0).numpy()] = 255
        Image.fromarray(mask).save(mask_path)
