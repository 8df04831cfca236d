"""Backbone creation for FocusDist: any timm model through ``features_only``, with offline weights.

Air-gapped inspection machines cannot reach the Hugging Face hub, so a local weights file can replace the
download; weights are checked against the architecture before use so a wrong file fails loudly instead of
leaving layers randomly initialised.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path

import timm
import torch
from anomalib.data import InferenceBatch
from timm.models._features import FeatureGetterNet
from torch import nn

from .arguments import check_scoring_grid

logger = logging.getLogger(__name__)

INPUT_LIMIT = 1e3  # normalised images lie within about +-3; clamping far outside keeps every score finite
HUB_PROBE_TIMEOUT = 3.0  # seconds; the hub client itself retries a dead connection for about 47 s
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm looks for in a hub repository


def _unknown_backbone_message(backbone: str) -> str:
    close = difflib.get_close_matches(backbone, timm.list_models(), n=3)
    hint = f" Did you mean {', '.join(repr(name) for name in close)}?" if close else ""
    return f"Unknown backbone {backbone!r}: use a timm model name such as 'resnet18' (see timm.list_models()).{hint}"


def layer_indices(backbone: str, layers: list[str]) -> list[int]:
    """Map layer names to timm ``out_indices``, with an error listing the valid names.

    Args:
        backbone (str): timm model name.
        layers (list[str]): Names of the feature layers, as in ``model.feature_info`` (e.g. ``"layer2"``).

    Returns:
        list[int]: Feature indices in the order of ``layers``.

    Raises:
        ValueError: If the backbone is unknown, a layer name is not one of its feature layers, or no layer
            is given.

    """
    if not timm.is_model(backbone):
        raise ValueError(_unknown_backbone_message(backbone))
    if not layers:
        msg = "FocusDist needs at least one feature layer: pass layers=[...] (e.g. ['layer1', 'layer2', 'layer3'])."
        raise ValueError(msg)
    probe = timm.create_model(backbone, pretrained=False, features_only=True)
    if isinstance(probe, FeatureGetterNet):
        msg = (
            f"Backbone {backbone!r} gives token features (a vision transformer): FocusDist needs a backbone with "
            "feature maps, e.g. a CNN such as 'resnet18', 'wide_resnet50_2' or 'efficientnet_b0'."
        )
        raise ValueError(msg)
    names = [info["module"] for info in probe.feature_info.info]
    unknown = [layer for layer in layers if layer not in names]
    if unknown:
        msg = f"Backbone {backbone!r} has no feature layer {unknown[0]!r}: choose layers from {names}."
        raise ValueError(msg)
    indices = [names.index(layer) for layer in layers]
    if indices != sorted(set(indices)):
        msg = f"List the layers of {backbone!r} once each, shallow to deep, in the order of {names}; got {layers}."
        raise ValueError(msg)
    return indices


def read_backbone_weights(path: str | Path, backbone: str, indices: list[int]) -> dict[str, torch.Tensor]:
    """Read a local weights file with timm's reader and check that it fits the architecture.

    timm reads ``.safetensors`` and ``.pth``/``.pt`` files (also inside a ``state_dict``/``model`` entry); it loads
    a ``features_only`` model without strict key checks, so a missing key, a shape mismatch or a key the
    architecture does not have (e.g. the extra blocks of a deeper variant) is refused here, before loading.

    Args:
        path (str | Path): The weights file, in timm key names.
        backbone (str): The timm model name.
        indices (list[int]): The feature indices that will be built.

    Returns:
        dict[str, torch.Tensor]: The state dict, for ``pretrained_cfg_overlay={"state_dict": ...}``.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the file cannot be read or does not fit the architecture.

    """
    path = Path(path)
    if not path.is_file():
        msg = f"backbone_weights file {str(path)!r} does not exist: give the path of a .safetensors or .pth file."
        raise FileNotFoundError(msg)
    try:
        state = timm.models.load_state_dict(str(path))
    except Exception as error:
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'unreadable'}"
        msg = f"Could not read backbone_weights {str(path)!r} ({reason}): give a .safetensors or .pth state dict."
        raise ValueError(msg) from error
    expected = timm.create_model(backbone, features_only=True, out_indices=indices).state_dict()
    missing = [key for key in expected if key not in state]
    mismatched = [key for key in expected if key in state and state[key].shape != expected[key].shape]
    full_model_keys = set(timm.create_model(backbone).state_dict())
    foreign = [key for key in state if key not in full_model_keys and key not in expected]
    if missing or mismatched or foreign:
        example = (missing or foreign or [f"{mismatched[0]} {tuple(state[mismatched[0]].shape)}"])[0]
        msg = (
            f"backbone_weights {str(path)!r} do not fit backbone {backbone!r}: {len(missing)} tensors missing, "
            f"{len(mismatched)} of another shape and {len(foreign)} unknown (e.g. {example}). "
            f"Give the weights of {backbone!r} in timm key names."
        )
        raise ValueError(msg)
    return state


def _unreachable_hub_message(backbone: str, error: Exception) -> str:
    reason = str(error).splitlines()[0] if str(error) else "no answer"
    return (
        f"Could not fetch ImageNet weights for {backbone!r} ({type(error).__name__}: {reason}). Without internet, "
        "pass backbone_weights=<path to a .safetensors or .pth file of this backbone>, or pre_trained=False."
    )


def check_hub_reachable(backbone: str) -> None:
    """Fail within seconds when ImageNet weights must come from an unreachable hub (not after a minute of retries).

    Weights already in the local hub cache, and the hub's offline mode (which fails at once), need no probe.

    Raises:
        RuntimeError: If the weights are not cached and the hub does not answer within ``HUB_PROBE_TIMEOUT``.

    """
    from huggingface_hub import constants, get_session, try_to_load_from_cache

    repo = getattr(timm.models.get_pretrained_cfg(backbone), "hf_hub_id", None)
    if not repo or constants.HF_HUB_OFFLINE:
        return
    if any(isinstance(try_to_load_from_cache(repo, name), str) for name in HUB_WEIGHT_FILES):
        return
    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT)
    except Exception as error:
        raise RuntimeError(_unreachable_hub_message(backbone, error)) from error


def create_feature_extractor(
    backbone: str,
    layers: list[str],
    pre_trained: bool = True,
    backbone_weights: str | None = None,
) -> nn.Module:
    """Create a timm ``features_only`` model returning the given layers.

    Args:
        backbone (str): timm model name.
        layers (list[str]): Feature layer names, shallow to deep.
        pre_trained (bool): Start from ImageNet weights (downloaded unless ``backbone_weights`` is given).
        backbone_weights (str | None): Local weights file; when given it is always loaded, whatever
            ``pre_trained`` says (a file named on purpose is never ignored).

    Returns:
        nn.Module: The feature model; ``model.feature_info`` describes the selected layers.

    Raises:
        RuntimeError: If the weights must be downloaded and the hub cannot be reached.

    """
    indices = layer_indices(backbone, layers)
    local = backbone_weights is not None
    overlay = {"state_dict": read_backbone_weights(backbone_weights, backbone, indices)} if local else None
    if pre_trained and not local:
        check_hub_reachable(backbone)
    try:
        return timm.create_model(
            backbone, pretrained=pre_trained or local, pretrained_cfg_overlay=overlay, features_only=True,
            out_indices=indices,
        )  # fmt: skip
    except Exception as error:
        if not pre_trained or local:
            raise
        raise RuntimeError(_unreachable_hub_message(backbone, error)) from error


def feature_module(model: nn.Module, layer: str) -> nn.Module:
    """Return the submodule whose output is the feature ``layer`` (timm flattens ``a.b`` to ``a_b`` in some nets)."""
    modules = dict(model.named_modules())
    return modules.get(layer) or modules[layer.replace(".", "_")]


def checked_images(images: torch.Tensor, min_size: int, map_stride: int | None = None) -> torch.Tensor:
    """Raise a one-line error, with the fix, for a batch the backbone cannot take; clamp far-out values.

    Args:
        images (torch.Tensor): Input images, expected shape ``(B, 3, H, W)`` with ``H, W >= min_size``.
        min_size (int): The backbone's largest stride.
        map_stride (int | None): Stride of the scoring grid, to check that the grid is large enough.

    Returns:
        torch.Tensor: The images, clamped to ``+-INPUT_LIMIT``.

    """
    if images.ndim != 4 or images.shape[1] != 3:
        msg = (
            f"FocusDist expects RGB image batches of shape (B, 3, H, W), got {tuple(images.shape)}: convert "
            "grayscale or RGBA images to RGB first (anomalib's datasets read images as RGB)."
        )
        raise ValueError(msg)
    if min(images.shape[-2:]) < min_size:
        msg = (
            f"Input {tuple(images.shape[-2:])} is smaller than the backbone's stride {min_size}: "
            f"resize images to at least {min_size}x{min_size} (the default pre-processor resizes to 256)."
        )
        raise ValueError(msg)
    if map_stride is not None:
        check_scoring_grid(images.shape[-2:], map_stride)
    if not torch.compiler.is_exporting() and not torch.isfinite(images).all():
        msg = (
            "The image batch contains NaN or Inf values: check the image files and the pre-processing "
            "(e.g. a Normalize with a zero std)."
        )
        raise ValueError(msg)
    return images.clamp(-INPUT_LIMIT, INPUT_LIMIT)


class NonFiniteImages:
    """In evaluation, an image with NaN or infinite pixels scores as fully anomalous, alone; training refuses it.

    The images of a batch are scored independently, so one broken image (a camera fault, a corrupt file) must
    neither pass as normal nor change its neighbours' scores. A forward pre-hook remembers the broken images; a
    forward hook then sets those images' score and every map pixel to ``+inf``, which anomalib's post-processor turns
    into score 1.0, label anomalous and a full mask. Both hooks are traced into the exported graph. In PyTorch the
    broken images are zeroed first (the input checks then pass); an exported graph has no input checks and lets
    them through as they are: no evaluation step mixes the images of a batch, so their NaNs stay in their own rows
    until their outputs are replaced. The graph saves a Select over every input pixel: it took 1.0 ms per 256x256
    image in OpenVINO, of which the input clamp it had absorbed now takes 0.6 ms alone.
    """

    def __init__(self) -> None:
        self.broken: torch.Tensor | None = None

    def attach(self, model: nn.Module) -> None:
        """Register the two hooks on ``model`` (a :class:`~.torch_model.FocusDistModel`)."""
        model.register_forward_pre_hook(self.find_broken_images)
        model.register_forward_hook(self.score_broken_images_as_anomalous)

    def find_broken_images(self, module: nn.Module, args: tuple) -> tuple | None:
        """Evaluation: remember (and outside an export, zero) the images of ``args[0]`` with non-finite pixels."""
        if module.training:
            return None
        images = args[0]
        # x * 0 is 0 for a finite pixel and NaN for NaN or +-inf, so an image's sum of them is NaN exactly when it has
        # a non-finite pixel, and never overflows: one reduction instead of a per-pixel mask, whose IsInf, IsNaN and
        # Select cost a tenth of the exported model's time.
        self.broken = torch.isnan((images * 0).sum(dim=(1, 2, 3)))
        if torch.compiler.is_exporting():
            return None
        if bool(self.broken.any()):
            logger.warning(
                "FocusDist: %d of %d images have NaN or infinite pixel values: scored as fully anomalous; check the "
                "image files and the pre-processing (e.g. a Normalize with a zero std).",
                int(self.broken.sum()),
                len(images),
            )
        return (images.masked_fill(self.broken.view(-1, 1, 1, 1), 0.0), *args[1:])

    def score_broken_images_as_anomalous(self, module: nn.Module, args: tuple, output: object) -> object:
        """Evaluation: ``+inf`` score and map for the remembered images; the others' output stays as it is."""
        del args
        broken, self.broken = self.broken, None
        if module.training or broken is None or not isinstance(output, InferenceBatch):
            return None
        infinite = torch.full_like(output.pred_score, float("inf"))
        return output._replace(
            pred_score=torch.where(broken, infinite, output.pred_score),
            anomaly_map=torch.where(broken.view(-1, 1, 1, 1), torch.full_like(output.anomaly_map, float("inf")),
                                    output.anomaly_map),
        )  # fmt: skip
