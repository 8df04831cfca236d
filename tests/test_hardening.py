"""Hardening (issue 10): inputs that users and factories give FocusDist get the right result or one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from anomalib_cfa_ncl import FocusDist


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("pre_trained", [True, False])
def test_backbone_weights_are_loaded_whatever_pre_trained_says(tmp_path: Path, pre_trained: bool) -> None:
    reference = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = FocusDist(backbone="resnet18", pre_trained=pre_trained, backbone_weights=str(path))
    loaded = model.model.feature_extractor.state_dict()
    assert torch.equal(loaded["conv1.weight"], reference.state_dict()["conv1.weight"])


@pytest.mark.parametrize("pre_trained", [True, False])
def test_missing_backbone_weights_file_whatever_pre_trained_says(tmp_path: Path, pre_trained: bool) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist") as error:
        FocusDist(backbone="resnet18", pre_trained=pre_trained, backbone_weights=str(tmp_path / "nope.safetensors"))
    _one_line(error)


def test_token_backbone_is_refused_in_one_line() -> None:
    from anomalib_cfa_ncl.cli import user_error

    with pytest.raises(ValueError, match="FocusDist needs a backbone with feature maps") as error:
        FocusDist(backbone="vit_tiny_patch16_224", layers=["blocks.2", "blocks.5", "blocks.8"], pre_trained=False)
    assert "'vit_tiny_patch16_224'" in _one_line(error)
    assert user_error(error.value) is error.value  # the CLI prints this line alone


def test_unreachable_hub_fails_without_retries(tmp_path: Path) -> None:
    """Not offline mode, an empty hub cache and a dead proxy: the hub client would retry for about 47 s."""
    script = "from anomalib_cfa_ncl import FocusDist; FocusDist(backbone='resnet18')"
    dead_proxy = "http://127.0.0.1:9"
    environment = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    environment.update(HF_HOME=str(tmp_path / "hf"), https_proxy=dead_proxy, HTTPS_PROXY=dead_proxy)
    result = subprocess.run(
        [sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode != 0
    assert "Retrying in" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: Could not fetch ImageNet weights for 'resnet18'")
    assert "backbone_weights=" in last
