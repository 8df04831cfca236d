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


def test_cli_without_max_epochs_announces_only_focusdist_epochs(
    tiny_dataset_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Lightning used to say "`max_epochs` was not set. Setting it to 1000 epochs." and FocusDist "training 5"."""
    import warnings

    from anomalib.cli import AnomalibCLI

    from .test_cli import TINY_MODEL, mvtec_args

    with caplog.at_level("INFO"):
        cli = AnomalibCLI(["fit", *TINY_MODEL, *mvtec_args(tiny_dataset_root)], run=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli.engine._setup_trainer(cli.model)
    assert not [warning for warning in caught if "max_epochs" in str(warning.message)]
    assert cli.engine.trainer.max_epochs == cli.model.default_max_epochs()
    epochs = [record.getMessage() for record in caplog.records if "epochs" in record.getMessage()]
    assert epochs == [f"FocusDist: no --trainer.max_epochs given: training {cli.model.default_max_epochs()} epochs."]


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        ({"map_stride": 0}, "map_stride must be a whole number >= 1"),
        ({"map_stride": 1000}, "map_stride=1000 gives a 0x0 scoring grid at 64x64 input"),
        ({"regularization": -1.0}, "regularization must be >= 0"),
        ({"covariance_shrinkage": 2.0}, r"covariance_shrinkage must lie in \[0, 1\]"),
        ({"grid_pooling": 4}, "grid_pooling must be an odd whole number >= 1"),
        ({"grid_pooling": 0}, "grid_pooling must be an odd whole number >= 1"),
    ],
    ids=["stride-0", "stride-1000", "negative-ridge", "shrinkage-2", "pooling-even", "pooling-0"],
)
def test_constructor_numbers_are_checked_before_training(
    arguments: dict, fragment: str, tiny_dataset_root: Path, tmp_path: Path
) -> None:
    from .helpers import tiny_datamodule, tiny_engine, tiny_model

    with pytest.raises(ValueError, match=fragment) as error:
        tiny_engine(tmp_path).fit(tiny_model(**arguments), datamodule=tiny_datamodule(tiny_dataset_root))
    _one_line(error)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_more_features_than_channels_says_so(caplog: pytest.LogCaptureFixture) -> None:
    from anomalib_cfa_ncl import FocusDistModel

    with caplog.at_level("WARNING"):
        model = FocusDistModel(backbone="resnet18", pre_trained=False, n_features=5000)
    assert model.feature_index.numel() == 448
    (warning,) = [record.getMessage() for record in caplog.records if "n_features" in record.getMessage()]
    assert warning.startswith("FocusDist: n_features=5000 is more than the 448 channels of 'resnet18'")


def test_too_small_scoring_grid_is_refused_by_the_torch_model() -> None:
    from anomalib_cfa_ncl import FocusDistModel

    model = FocusDistModel(backbone="resnet18", pre_trained=False, n_features=32, map_stride=32)
    with pytest.raises(ValueError, match="map_stride=32 gives a 2x2 scoring grid at 64x64 input") as error:
        model(torch.rand(1, 3, 64, 64))
    _one_line(error)


class _RunsCode:
    """A pickle that runs a command when loaded (what a malicious checkpoint does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize(
    ("subcommand", "kind"),
    [("test", "corrupted"), ("predict", "malicious"), ("train", "corrupted"), ("train", "malicious")],
)
def test_bad_checkpoint_through_the_cli_is_one_line(
    subcommand: str, kind: str, tiny_dataset_root: Path, tmp_path: Path
) -> None:
    from .test_cli import TINY_MODEL, assert_one_line_error, mvtec_args, run_anomalib

    path = tmp_path / "model.ckpt"
    marker = tmp_path / "pwned"
    if kind == "corrupted":
        path.write_bytes(b"PK\x03\x04" + b"\x00" * 64)
    else:
        torch.save({"state_dict": {}, "payload": _RunsCode(marker)}, path)
    result = run_anomalib(
        subcommand, *TINY_MODEL, *mvtec_args(tiny_dataset_root), "--ckpt_path", str(path), cwd=tmp_path
    )
    assert_one_line_error(result, str(path), "corrupted" if kind == "corrupted" else "could run code")
    assert not marker.exists()
