"""Fit a tiny FocusDist with Lightning (optionally DDP on CPU) and save its fitted statistics.

Run as a script because Lightning's CPU DDP launcher starts the other processes by re-running the command.
Learning rates are zero, so the network is identical in both runs and only the statistics fit differs in how
the images are split over processes: the saved statistics must then be equal.

Usage: python tests/ddp_fit.py DATASET_ROOT OUTPUT_FILE DEVICES
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers import tiny_datamodule, tiny_engine, tiny_model


def main() -> None:
    """Fit on DEVICES processes and save mean and precision from rank 0."""
    root, output, devices = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    torch.manual_seed(0)
    model = tiny_model(lr=0.0, backbone_lr=0.0)
    strategy = {"strategy": "ddp", "devices": devices} if devices > 1 else {"devices": 1}
    engine = tiny_engine(output.parent / f"project{devices}", **strategy)
    engine.fit(model, datamodule=tiny_datamodule(root))
    if engine.trainer.global_rank == 0:
        gaussian = model.model.gaussian
        torch.save(
            {"mean": gaussian.mean, "precision": gaussian.precision.float() * gaussian.precision_scale[:, None, None]},
            output,
        )


if __name__ == "__main__":
    main()
