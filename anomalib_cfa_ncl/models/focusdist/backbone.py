"""Backbone creation for FocusDist: any timm model through ``features_only``, with offline weights.

Air-gapped inspection machines cannot reach the Hugging Face hub, so a local weights file can replace the
download; weights are checked against the architecture before use so a wrong file fails loudly instead of
leaving layers randomly initialised.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import timm
import torch
from torch import nn


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


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        msg = f"backbone_weights file {str(path)!r} does not exist: give the path of a .safetensors or .pth file."
        raise FileNotFoundError(msg)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        msg = f"Could not read backbone_weights {str(path)!r} ({error}): give a .safetensors or .pth state dict."
        raise ValueError(msg) from error
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        msg = f"backbone_weights {str(path)!r} holds a {type(state).__name__}, not a state dict of tensors."
        raise ValueError(msg)
    return state


def load_backbone_weights(model: nn.Module, path: str | Path, backbone: str) -> None:
    """Load a local state dict (timm key names) into a ``features_only`` model, checking every tensor.

    Keys of the full model that the feature model does not use (e.g. the classifier) are ignored; a missing
    key, a shape mismatch or a key the architecture does not have (e.g. the extra blocks of a deeper variant)
    means the file belongs to another architecture and raises.

    Args:
        model (nn.Module): The timm feature model.
        path (str | Path): A ``.safetensors`` or ``.pth``/``.pt`` file.
        backbone (str): The timm model name, for the error message.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the file cannot be read or does not fit the architecture.

    """
    state = _read_state_dict(Path(path))
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    mismatched = [key for key in expected if key in state and state[key].shape != expected[key].shape]
    full_model_keys = set(timm.create_model(backbone, pretrained=False).state_dict())
    foreign = [key for key in state if key not in full_model_keys and key not in expected]
    if missing or mismatched or foreign:
        example = (missing or foreign or [f"{mismatched[0]} {tuple(state[mismatched[0]].shape)}"])[0]
        msg = (
            f"backbone_weights {str(path)!r} do not fit backbone {backbone!r}: {len(missing)} tensors missing, "
            f"{len(mismatched)} of another shape and {len(foreign)} unknown (e.g. {example}). "
            f"Give the weights of {backbone!r} in timm key names."
        )
        raise ValueError(msg)
    model.load_state_dict({key: state[key] for key in expected})


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
        pre_trained (bool): Start from ImageNet weights.
        backbone_weights (str | None): Local weights file; when given it is used instead of the download.

    Returns:
        nn.Module: The feature model; ``model.feature_info`` describes the selected layers.

    Raises:
        RuntimeError: If the weights must be downloaded and the hub cannot be reached.

    """
    indices = layer_indices(backbone, layers)
    download = pre_trained and backbone_weights is None
    try:
        model = timm.create_model(backbone, pretrained=download, features_only=True, out_indices=indices)
    except Exception as error:
        if not download:
            raise
        msg = (
            f"Could not fetch ImageNet weights for {backbone!r} ({type(error).__name__}: {error}). Without internet, "
            "pass backbone_weights=<path to a .safetensors or .pth file of this backbone>, or pre_trained=False."
        )
        raise RuntimeError(msg) from error
    if pre_trained and backbone_weights is not None:
        load_backbone_weights(model, backbone_weights, backbone)
    return model


def feature_module(model: nn.Module, layer: str) -> nn.Module:
    """Return the submodule whose output is the feature ``layer`` (timm flattens ``a.b`` to ``a_b`` in some nets)."""
    modules = dict(model.named_modules())
    return modules.get(layer) or modules[layer.replace(".", "_")]
