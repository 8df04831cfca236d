"""Multi-process training: statistics fitted under DDP (CPU, gloo, 2 processes) equal a single-process fit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).with_name("ddp_fit.py")


def _fit(root: Path, output: Path, devices: int) -> dict[str, torch.Tensor]:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(root), str(output), str(devices)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(output)


def test_ddp_statistics_equal_single_process(tiny_dataset_root: Path, tmp_path: Path) -> None:
    single = _fit(tiny_dataset_root, tmp_path / "single.pt", 1)
    distributed = _fit(tiny_dataset_root, tmp_path / "ddp.pt", 2)
    assert torch.allclose(single["mean"], distributed["mean"], rtol=1e-5, atol=1e-6)
    assert torch.allclose(
        single["precision"], distributed["precision"], rtol=1e-3, atol=1e-3 * single["precision"].abs().max()
    )
