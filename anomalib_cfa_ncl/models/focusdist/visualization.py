"""The alignment view: each test or predicted image beside the image FocusDist's coarse alignment produced.

anomalib's visualiser writes the image, anomaly map and masks to ``<results>/images/``; this callback writes
``<results>/images/alignment/`` with the same relative paths, so the view of a doubtful prediction is easy to
find. Well-aligned outputs show the object in the same place and pose in every image.

Example:
    >>> from anomalib_cfa_ncl.models.focusdist.visualization import AlignmentVisualizer
    >>> engine = Engine(callbacks=[AlignmentVisualizer()])  # FocusDist adds one itself  # doctest: +SKIP

"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from anomalib.data import ImageBatch
from anomalib.utils.path import generate_output_filename
from anomalib.visualization.image.functional import add_text_to_image, create_image_grid, visualize_image
from kornia.enhance import denormalize
from lightning.pytorch import Callback, LightningModule, Trainer
from PIL import Image
from torchvision.transforms import v2

__all__ = ["AlignmentVisualizer", "alignment_view"]


def _normalization(pl_module: LightningModule) -> v2.Normalize | None:
    """The ``Normalize`` step of the model's pre-processor, if any."""
    transform = getattr(getattr(pl_module, "pre_processor", None), "transform", None)
    steps = transform.transforms if isinstance(transform, v2.Compose) else [transform]
    return next((step for step in steps if isinstance(step, v2.Normalize)), None)


def _to_display(images: torch.Tensor, normalize: v2.Normalize | None) -> torch.Tensor:
    """Undo the pre-processor's normalisation: ``(B, 3, H, W)`` images in ``[0, 1]``."""
    if normalize is not None:
        mean = torch.as_tensor(normalize.mean, dtype=images.dtype, device=images.device)
        std = torch.as_tensor(normalize.std, dtype=images.dtype, device=images.device)
        images = denormalize(images, mean, std)
    return images.clamp(0, 1)


def alignment_view(image: torch.Tensor, aligned: torch.Tensor) -> Image.Image:
    """Put an image (left) beside its coarse alignment (right), captioned like anomalib's visualiser.

    Args:
        image (torch.Tensor): Input image ``(3, H, W)`` in ``[0, 1]``.
        aligned (torch.Tensor): Aligned image ``(3, H, W)`` in ``[0, 1]``.

    Returns:
        Image.Image: The two images side by side.

    """
    panels = [
        add_text_to_image(visualize_image(tensor.cpu()), text)
        for tensor, text in ((image, "Input"), (aligned, "Aligned"))
    ]
    return create_image_grid(panels, nrow=2)


class AlignmentVisualizer(Callback):
    """Write the alignment view of every test and predicted image.

    Nothing is written when the model has no image-level alignment (``image_alignment=False``) or no
    visualiser (``visualizer=False``).

    Args:
        output_dir (str | Path | None): Folder of the views. Defaults to ``<default_root_dir>/images/alignment``,
            beside the images of anomalib's visualiser.

    """

    def __init__(self, output_dir: str | Path | None = None) -> None:
        super().__init__()
        self.output_dir = Path(output_dir) if output_dir is not None else None

    @staticmethod
    def _enabled(pl_module: LightningModule) -> bool:
        model = getattr(pl_module, "model", None)
        return bool(getattr(pl_module, "visualizer", None)) and getattr(model, "image_transformer", None) is not None

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: ImageBatch,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Align the batch again and save one view per image."""
        del outputs, batch_idx, dataloader_idx
        if not self._enabled(pl_module) or batch.image_path is None:
            return
        output_dir = self.output_dir or Path(trainer.default_root_dir) / "images" / "alignment"
        with torch.no_grad():
            aligned, _ = pl_module.model.align_images(batch.image)
        normalize = _normalization(pl_module)
        datamodule = getattr(trainer, "datamodule", None)
        for path, image, warped in zip(
            batch.image_path, _to_display(batch.image, normalize), _to_display(aligned, normalize), strict=True
        ):
            filename = generate_output_filename(
                input_path=path,
                output_path=output_dir,
                dataset_name=getattr(datamodule, "name", None),
                category=getattr(datamodule, "category", None),
            )
            alignment_view(image, warped).save(filename)

    # Predicted images get their views too (the hook has the same signature).
    on_predict_batch_end = on_test_batch_end
