"""FocusDist checkpoints: one-line errors for a missing or corrupted file and for another model's checkpoint."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch

# a key only a FocusDist checkpoint has: it tells our checkpoints from other models' ones
SIGNATURE_KEY = "model.gaussian.precision_scale"
CALIBRATION_KEY = "model.gaussian.location_scale"  # 0.1.0 checkpoints lack it
POOLING_KEY = "model.grid_pooling.enabled"  # 0.2 checkpoints lack it
BANK_KEYS = ("model.patch_bank.bank", "model.patch_bank.location_scale")  # 0.3 checkpoints lack them
JOINT_KEY = "model.patch_bank.joint_weights"  # checkpoints before 0.4 lack it: their bank replaced the Gaussian
# checkpoints before 0.5 lack them: their bank searched every channel
PROJECTION_KEYS = ("model.patch_bank.projection", "model.patch_bank.patch_mean")


def check_checkpoint(checkpoint: dict[str, Any]) -> None:
    """Raise a one-line error unless ``checkpoint`` holds a fitted FocusDist."""
    if SIGNATURE_KEY not in checkpoint.get("state_dict", {}):
        msg = (
            "The checkpoint is not a FocusDist checkpoint (it has no fitted FocusDist statistics): load it with the "
            "model class that wrote it, or train FocusDist first."
        )
        raise ValueError(msg)


def upgrade_checkpoint(checkpoint: dict[str, Any]) -> None:
    """Give a checkpoint written before the calibration, the grid pooling or the patch bank existed neutral ones.

    Scores are unchanged: no calibration, no pooling, an empty bank (the Gaussian scores), a bank that replaces the
    Gaussian where one was chosen (before the bank could join it), a bank in every channel (before its projection).
    """
    state = checkpoint["state_dict"]
    if CALIBRATION_KEY not in state:
        state[CALIBRATION_KEY] = torch.ones_like(state[SIGNATURE_KEY])
    if POOLING_KEY not in state:
        state[POOLING_KEY] = torch.zeros((), dtype=torch.bool)
    for key in (*BANK_KEYS, JOINT_KEY, *PROJECTION_KEYS):
        state.setdefault(key, torch.empty(0))


def checkpoint_file(path: str | Path) -> Path:
    """Return the path of a checkpoint file, or raise a one-line error when it is missing, not a checkpoint or unsafe.

    Lightning checkpoints are zip archives (``torch.save``); testing for one reads only the archive's directory, and
    the unsafe-object test reads only its pickle (without running it), so the tensors are read once, by Lightning.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"Checkpoint {str(path)!r} does not exist: give the path of a FocusDist .ckpt file."
        raise FileNotFoundError(msg)
    if not zipfile.is_zipfile(path):
        msg = (
            f"Could not read checkpoint {str(path)!r}: the file is corrupted or not a PyTorch Lightning checkpoint; "
            "train again or copy the file again."
        )
        raise ValueError(msg)
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as error:
        msg = f"Could not read checkpoint {str(path)!r}: the file is corrupted; train again or copy the file again."
        raise ValueError(msg) from error
    if unsafe:
        msg = (
            f"Checkpoint {str(path)!r} holds Python objects a checkpoint never needs ({', '.join(unsafe[:3])}), which "
            "could run code when loaded: it was not loaded. Use a checkpoint written by FocusDist's training."
        )
        raise ValueError(msg)
    return path


def check_checkpoint_to_load(path: str | Path | None) -> None:
    """One-line errors for the local checkpoint a trainer will load (``ckpt_path``), before Lightning reads it.

    Lightning's own ``torch.load`` ends a corrupted or unsafe file in about 190 lines; remote paths are left to it.
    """
    if path and "://" not in str(path):
        checkpoint_file(path)
