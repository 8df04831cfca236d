"""The one model builder of the benchmark scripts (quality, speed, export parity, memory).

FocusDist, Padim and Patchcore on the same backbone and layers: Padim keeps a random 100 channels, Patchcore
takes the two deeper layers and a 1 % coreset, FocusDist takes its own defaults unless told otherwise. Nothing is
written per image (no visualiser) unless the caller passes one.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from anomalib.models import AnomalibModule, Padim, Patchcore

from anomalib_cfa_ncl import FocusDist

LAYERS = {
    "tf_efficientnet_lite0": ["blocks.1", "blocks.2", "blocks.4"],
    "resnet18": ["layer1", "layer2", "layer3"],
}
DEFAULT_BACKBONE = "tf_efficientnet_lite0"


def build_model(
    name: str,
    backbone: str = DEFAULT_BACKBONE,
    pre_trained: bool = True,
    backbone_weights: str | None = None,
    focusdist_arguments: dict[str, Any] | None = None,
    **common: Any,
) -> AnomalibModule:
    """Create ``"Padim"``, ``"Patchcore"`` or a FocusDist (any other name) for a benchmark.

    Args:
        name: The model, or the name of a FocusDist row.
        backbone: A backbone of ``LAYERS``.
        pre_trained: Start from ImageNet weights.
        backbone_weights: Local weights file for FocusDist's backbone.
        focusdist_arguments: FocusDist constructor arguments of the row (e.g. an ablation's switches).
        **common: Arguments every model takes (``evaluator``, ``pre_processor``, ...).

    Returns:
        AnomalibModule: The model.
    """
    layers = LAYERS[backbone]
    common.setdefault("visualizer", False)
    if name == "Padim":
        return Padim(backbone=backbone, layers=layers, pre_trained=pre_trained, n_features=100, **common)
    if name == "Patchcore":
        return Patchcore(
            backbone=backbone, layers=layers[1:], pre_trained=pre_trained, coreset_sampling_ratio=0.01, **common
        )
    return FocusDist(
        backbone=backbone,
        layers=layers,
        pre_trained=pre_trained,
        backbone_weights=backbone_weights,
        **common,
        **(focusdist_arguments or {}),
    )


def parse_variants(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Parse ``--variant NAME=JSON`` into ``args.variants`` (constructor arguments per name) and add their rows.

    Every variant's name joins ``args.models`` (once), so that it is run after the models asked for.
    """
    args.variants = {}
    for spec in args.variant:
        name, _, arguments = spec.partition("=")
        try:
            args.variants[name.strip()] = json.loads(arguments)
        except json.JSONDecodeError as error:
            parser.error(f'--variant {spec!r}: expected NAME={{"argument": value}} with JSON arguments ({error}).')
    args.models += [name for name in args.variants if name not in args.models]


def add_variant_argument(parser: argparse.ArgumentParser) -> None:
    """``--variant NAME=JSON``: an extra FocusDist row with these constructor arguments (see :func:`parse_variants`)."""
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar='NAME={"arg": value}',
        help="an extra FocusDist row: a name and the constructor arguments (JSON) it changes; repeatable",
    )
