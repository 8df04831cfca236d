"""Checks of FocusDist's constructor numbers, so a value that cannot work stops at once, in one line.

A ``map_stride`` of 0 used to end in a ``ZeroDivisionError`` deep in training, one of 1000 trained on a 1x1
scoring grid without a word, a negative ``regularization`` failed in the Cholesky factorisation after a whole
epoch, and an ``n_features`` above the backbone's channels was clamped without a word.

Example:
    >>> check_scoring_grid((256, 256), map_stride=8)  # a 32x32 grid
    >>> check_scoring_grid((256, 256), map_stride=128)
    Traceback (most recent call last):
    ...
    ValueError: map_stride=128 gives a 2x2 scoring grid at 256x256 input: ...

"""

from __future__ import annotations

import logging
import numbers

logger = logging.getLogger(__name__)

MIN_GRID = 4  # locations per side: fewer cannot localise anything (a 1x1 grid gave pixel AUROC 0.5)


def check_scoring_grid(image_size: tuple[int, int], map_stride: int) -> None:
    """Raise a one-line error when the scoring grid of an input size is smaller than ``MIN_GRID`` per side.

    Args:
        image_size (tuple[int, int]): The model's input ``(H, W)`` (after the pre-processor).
        map_stride (int): Stride of the scoring grid.

    Raises:
        ValueError: If ``H // map_stride`` or ``W // map_stride`` is below ``MIN_GRID``.

    """
    height, width = image_size[0], image_size[1]  # no int(): sizes may be symbolic while exporting
    grid = (height // map_stride, width // map_stride)
    if min(grid) < MIN_GRID:
        largest = max(min(height, width) // MIN_GRID, 1)
        msg = (
            f"map_stride={map_stride} gives a {grid[0]}x{grid[1]} scoring grid at {height}x{width} input: FocusDist "
            f"needs at least {MIN_GRID}x{MIN_GRID}; use map_stride <= {largest} (8 is the default) or larger images."
        )
        raise ValueError(msg)


def check_model_arguments(
    backbone: str, map_stride: int, regularization: float, n_features: int | None, channels: int, grid_pooling: int = 1
) -> None:
    """Raise a one-line error, with the fix, for a constructor number FocusDist cannot work with.

    Args:
        backbone (str): The timm model name (for the message).
        map_stride (int): Stride of the scoring grid; a whole number >= 1.
        regularization (float): Covariance ridge; >= 0.
        n_features (int | None): Channels kept for the Gaussian; above ``channels`` all are kept, with a warning.
        channels (int): The number of channels of the selected backbone layers together.
        grid_pooling (int): Side of the grid pooling candidate; an odd whole number >= 1.

    Raises:
        ValueError: If a number is out of its range.

    """
    if isinstance(map_stride, bool) or not isinstance(map_stride, numbers.Integral) or map_stride < 1:
        msg = f"map_stride must be a whole number >= 1 (8 is the default), got {map_stride!r}."
        raise ValueError(msg)
    whole = not isinstance(grid_pooling, bool) and isinstance(grid_pooling, numbers.Integral)
    if not whole or grid_pooling < 1 or grid_pooling % 2 == 0:  # even sides would shift the grid by half a location
        msg = (
            f"grid_pooling must be an odd whole number >= 1 (1, the default, never pools; 5 lets the gate choose a "
            f"5x5 pooling), got {grid_pooling!r}."
        )
        raise ValueError(msg)
    if not regularization >= 0:  # also refuses NaN
        msg = f"regularization must be >= 0 (0.01 is the default), got {regularization!r}."
        raise ValueError(msg)
    if n_features is not None and n_features > channels:  # a warning: the default 176 exceeds some layer choices
        logger.warning(
            "FocusDist: n_features=%d is more than the %d channels of %r's selected layers: all %d are kept "
            "(n_features=None keeps all without this warning).",
            n_features,
            channels,
            backbone,
            channels,
        )
