"""Mixed precision: FocusDist's geometry and statistics stay in float32 when the backbone runs in half precision.

Lightning's ``precision="16-mixed"`` / ``"bf16-mixed"`` runs the forward pass under ``torch.autocast``. The
backbone gains from it; transforms (their products, inverses and sampling grids), Mahalanobis distances and
anomaly maps do not: a bfloat16 sampling grid is off by more than half a pixel at 256 px (kornia's own note),
distances in half precision keep 3 significant digits or fewer, and autocast gives the parts of one transform different
dtypes, which kornia rejects.

Example:
    >>> import torch
    >>> with torch.autocast("cpu", dtype=torch.bfloat16):
    ...     half = torch.ones(2, 2) @ torch.ones(2, 2)
    ...     with full_precision("cpu"):
    ...         full = at_least_float32(half) @ torch.ones(2, 2)
    >>> half.dtype, full.dtype
    (torch.bfloat16, torch.float32)

"""

from __future__ import annotations

import contextlib

import torch

HALF_PRECISION = (torch.float16, torch.bfloat16)


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in float32 if it is in half precision, else unchanged (no operation in an exported graph)."""
    return tensor.float() if tensor.dtype in HALF_PRECISION else tensor


def full_precision(device_type: str) -> contextlib.AbstractContextManager:
    """Switch autocast off while it is on (mixed-precision training, e.g. ``--trainer.precision 16-mixed``).

    Transforms, their inverses, distances and maps need float32 (see the module's docstring). Only the backbone
    and the transformers' localisation networks run in half precision. Nothing is entered when autocast is off,
    so an exported graph holds no autocast node.

    Args:
        device_type (str): ``"cpu"``, ``"cuda"``, ...: the device of the tensors that follow.

    Returns:
        contextlib.AbstractContextManager: ``torch.autocast(device_type, enabled=False)`` or a no-op context.

    """
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
