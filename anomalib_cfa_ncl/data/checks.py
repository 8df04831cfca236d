"""Dataset checks of FocusDist runs: image files anomalib would misread, and an empty training set.

anomalib_cfa_ncl adds :class:`DatasetChecks` to every FocusDist run (``FocusDist.run_callbacks``), so a dataset
FocusDist cannot learn from stops with a one-line error that says the fix before any training starts.

Example:
    >>> from anomalib_cfa_ncl.data.checks import DatasetChecks
    >>> engine = Engine(callbacks=[DatasetChecks()])  # for any model; FocusDist adds one itself  # doctest: +SKIP

"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer

from .convert import check_image_files

__all__ = ["DatasetChecks", "check_dataset_images", "check_training_set"]


def check_dataset_images(datamodule: object) -> None:
    """Refuse image files anomalib would misread, in every dataset of the datamodule (file headers only: cheap)."""
    for name in ("train_data", "val_data", "test_data"):
        samples = getattr(getattr(datamodule, name, None), "samples", None)
        if samples is not None and "image_path" in samples:
            check_image_files(samples["image_path"])


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


class DatasetChecks(Callback):
    """Check the datamodule's image files on every run, and that there are training images before fitting."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Run the checks once the datamodule has set up its datasets."""
        del pl_module
        datamodule = getattr(trainer, "datamodule", None)
        check_dataset_images(datamodule)
        if stage == "fit":
            check_training_set(datamodule)
