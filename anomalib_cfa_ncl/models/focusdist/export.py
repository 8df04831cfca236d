"""Export support for FocusDist: input-size checks and an INT8 quantisation scope that keeps the scoring exact.

anomalib exports the whole module (pre-processor, model, post-processor) through ``torch.onnx.export`` and
OpenVINO. FocusDist's Gaussian statistics are fitted per location, so the model itself takes one input size;
the pre-processor's ``Resize`` makes any raw size acceptable. Without such a ``Resize`` only the training
size can be exported, and :func:`check_export_input_size` says so in one line before the exporter starts.

NNCF's post-training quantisation calibrates the value range of every quantised tensor on the calibration
images. Applied to the whole graph it quantises the alignment transforms, the Mahalanobis distances and the
input of the anomaly-map blur; calibrated on mostly normal images that range clips exactly the large
distances that mark an anomaly (the map of a tiny test model became constant). :func:`int8_ignored_scope`
therefore restricts quantisation to the convolutions of the feature network and keeps everything from the
scoring on in floating point.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import TYPE_CHECKING, Any

import torch

from .arguments import check_scoring_grid

if TYPE_CHECKING:
    from pathlib import Path

    import nncf
    import openvino as ov
    from anomalib.data import AnomalibDataModule
    from torch import nn

    from .torch_model import FocusDistModel

logger = logging.getLogger(__name__)

QUANTISED_TYPES = frozenset({"Convolution", "GroupConvolution"})
DYNAMIC_PROBE_SIZES = ((32, 32), (48, 40))  # two raw sizes: a size-independent pre-processor maps both alike
RECOMMENDED_CALIBRATION_IMAGES = 300  # anomalib's and NNCF's default calibration subset


def _model_input_size(pre_processor: nn.Module | None, raw_size: tuple[int, int]) -> tuple[int, int]:
    """Size at which the torch model sees a raw image of ``raw_size`` after the exported pre-processing."""
    if pre_processor is None:
        return raw_size
    with torch.no_grad():
        return tuple(pre_processor(torch.zeros(1, 3, *raw_size)).shape[-2:])


def fixed_input_size(pre_processor: nn.Module | None) -> tuple[int, int] | None:
    """The size at which the torch model sees every raw image (a pre-processor that resizes), else ``None``."""
    seen = {_model_input_size(pre_processor, size) for size in DYNAMIC_PROBE_SIZES}
    return seen.pop() if len(seen) == 1 else None


def check_input_grid(model: FocusDistModel, pre_processor: nn.Module | None) -> None:
    """Before any work: a one-line error when the pre-processor's size gives the model too small a scoring grid."""
    size = fixed_input_size(pre_processor)
    if size is not None:
        check_scoring_grid(size, model.map_stride)


def _training_size_hint(model: FocusDistModel) -> str:
    """The square input size the fitted statistics correspond to, when the grid is square."""
    side = math.isqrt(model.gaussian.mean.shape[0])
    if side * side != model.gaussian.mean.shape[0]:
        return "the training size"
    return f"({side * model.map_stride}, {side * model.map_stride})"


def check_export_input_size(
    model: FocusDistModel,
    pre_processor: nn.Module | None,
    input_size: tuple[int, int] | None,
) -> None:
    """Raise a one-line error, with the fix, when an export input size cannot reach the fitted scoring grid.

    Args:
        model (FocusDistModel): The fitted torch model.
        pre_processor (nn.Module | None): The module applied before the model in the exported graph.
        input_size (tuple[int, int] | None): The export's static ``(H, W)``, or ``None`` for a dynamic size.

    Raises:
        ValueError: If the input size (or, for a dynamic export, some input size) gives a scoring grid other
            than the fitted one.

    Example:
        >>> from anomalib_cfa_ncl import FocusDist
        >>> module = FocusDist(backbone="resnet18", pre_trained=False)
        >>> check_export_input_size(module.model, module.pre_processor, None)  # not fitted yet: nothing to check

    """
    if not model.gaussian.is_fitted:
        return
    locations = model.gaussian.mean.shape[0]
    hint = _training_size_hint(model)
    if input_size is None:
        size = fixed_input_size(pre_processor)
        if size is None:
            msg = (
                "A dynamic input size needs a Resize in FocusDist's pre-processor (its statistics are fitted on one "
                f"size): export with input_size={hint}, or train with a pre-processor that resizes."
            )
            raise ValueError(msg)
    else:
        size = _model_input_size(pre_processor, tuple(input_size))
    grid = model.grid_size(size)
    if grid[0] * grid[1] != locations:
        requested = "a dynamic input size" if input_size is None else f"input_size={tuple(input_size)}"
        msg = (
            f"With {requested} FocusDist sees {size[0]}x{size[1]} images, a {grid[0]}x{grid[1]} scoring grid, but "
            f"it was fitted on {locations} locations: export with input_size={hint} or keep the training Resize."
        )
        raise ValueError(msg)


def _single_channel_convolutions(ov_model: ov.Model) -> list[str]:
    """Names of convolutions with a one-channel input: the blur of the anomaly map (images have 3 channels)."""
    names = []
    for op in ov_model.get_ops():
        if op.get_type_name() in QUANTISED_TYPES:
            channels = op.input(0).get_partial_shape()[1]
            if channels.is_static and channels.get_length() == 1:
                names.append(op.get_friendly_name())
    return names


def int8_ignored_scope(ov_model: ov.Model) -> nncf.IgnoredScope:
    """NNCF scope that quantises only the feature network's convolutions.

    Everything but ``Convolution`` and ``GroupConvolution`` (the alignment transforms, the Mahalanobis scoring,
    the inverse warp, the normalisation) is ignored, and so is the single-channel convolution that blurs the
    anomaly map.

    Args:
        ov_model (ov.Model): The OpenVINO model converted from FocusDist's ONNX export.

    Returns:
        nncf.IgnoredScope: The scope to pass to ``nncf.quantize``.

    """
    import nncf

    other_types = sorted({op.get_type_name() for op in ov_model.get_ops()} - QUANTISED_TYPES)
    return nncf.IgnoredScope(names=_single_channel_convolutions(ov_model), types=other_types, validate=False)


def quantize_feature_network(ov_model: ov.Model, datamodule: AnomalibDataModule | None) -> ov.Model:
    """INT8 post-training quantisation of the feature network, calibrated like anomalib's ``INT8_PTQ``.

    The calibration images are the datamodule's validation images, as in anomalib; only the scope differs
    (:func:`int8_ignored_scope`).

    Args:
        ov_model (ov.Model): The OpenVINO model converted from FocusDist's ONNX export.
        datamodule (AnomalibDataModule | None): Supplies the calibration images (raw, the graph pre-processes).

    Returns:
        ov.Model: The quantised model.

    Raises:
        ValueError: If no datamodule is given.

    """
    import nncf

    if datamodule is None:
        msg = "INT8_PTQ calibrates on images: pass datamodule=... to export (CLI: --data ...)."
        raise ValueError(msg)
    datamodule.setup("fit")
    if ov_model.input(0).partial_shape[0].is_static:
        datamodule.train_batch_size = ov_model.input(0).shape[0]
    dataloader = datamodule.val_dataloader()
    if len(dataloader.dataset) < RECOMMENDED_CALIBRATION_IMAGES:
        logger.warning(
            "INT8 calibration on %d images; at least %d are recommended.",
            len(dataloader.dataset),
            RECOMMENDED_CALIBRATION_IMAGES,
        )
    dataset = nncf.Dataset(dataloader, lambda batch: batch["image"])
    return nncf.quantize(ov_model, dataset, ignored_scope=int8_ignored_scope(ov_model))


class ExportChecks:
    """Export methods of :class:`~.lightning_model.FocusDist` (mixed in before ``AnomalibModule``)."""

    model: FocusDistModel
    pre_processor: nn.Module | None

    def to_onnx(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        **kwargs: Any,
    ) -> Path:
        """Export to ONNX (also the first step of OpenVINO), first checking that ``input_size`` fits the statistics.

        The graph holds only the frame the alignment gate chose: where it chose the input frame, neither the image
        transformer nor the image warp is exported (with the resizes of an unaligned model, the development
        benchmark's brick exports in 16 s instead of 58 s and runs 21 % faster in OpenVINO).
        """
        check_export_input_size(self.model, self.pre_processor, input_size)
        gate = self.model.alignment_gate
        with gate.decision_fixed() if gate is not None else contextlib.nullcontext():
            return super().to_onnx(export_root, model_file_name, input_size, **kwargs)  # type: ignore[misc]

    @staticmethod
    def _post_training_quantization_ov(model: Any, datamodule: AnomalibDataModule | None = None) -> Any:
        """``INT8_PTQ`` on an OpenVINO model: only the feature network is quantised, the scoring stays in float."""
        return quantize_feature_network(model, datamodule)
