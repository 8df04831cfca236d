"""A quiet ONNX export: opset 18 and no INFO wall from the ONNX tool chain.

anomalib asks ``torch.onnx.export`` for opset 14. torch's exporter has no lower opset than 18, so it exports at
18 and converts the model down; for FocusDist the conversion fails on ``Pad`` and the converter logs a Python
traceback as a warning before keeping opset 18 anyway. The graph optimiser then logs one INFO record per
deduplicated initializer (about 190 for FocusDist), which anomalib's CLI prints twice (plain and rich).
:func:`quiet_onnx_export` asks for opset 18 directly and raises the ONNX loggers to ``WARNING`` for the export.

Example:
    >>> from anomalib_cfa_ncl.onnx_export import onnx_export_kwargs
    >>> onnx_export_kwargs(None)
    {'opset_version': 18, 'verbose': False}
    >>> onnx_export_kwargs({"opset_version": 20})["opset_version"]  # the user's choice wins
    20

"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

ONNX_OPSET = 18  # the lowest opset torch's (dynamo) exporter implements: no down-conversion
ONNX_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx")


def onnx_export_kwargs(onnx_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """``torch.onnx.export`` options with opset 18 and no progress printing, unless the caller chose otherwise.

    Args:
        onnx_kwargs (dict[str, Any] | None): The caller's options (``Engine.export(onnx_kwargs=...)``).

    Returns:
        dict[str, Any]: A new dict: the caller's options over the quiet defaults.

    """
    return {"opset_version": ONNX_OPSET, "verbose": False, **(onnx_kwargs or {})}


@contextlib.contextmanager
def quiet_onnx_export(level: int = logging.WARNING) -> Iterator[None]:
    """Raise the ONNX exporter's loggers to ``level`` for the duration of the block, then restore them.

    Args:
        level (int): The lowest level that still gets through (warnings and errors by default).

    Yields:
        None

    """
    loggers = [logging.getLogger(name) for name in ONNX_LOGGERS]
    previous = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(level, logger.getEffectiveLevel()))
    try:
        yield
    finally:
        for logger, old in zip(loggers, previous, strict=True):
            logger.setLevel(old)
