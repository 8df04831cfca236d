"""Every file in configs/ is loaded the way its README command loads it (tiny data, offline)."""

from __future__ import annotations

import csv
import inspect
import os
import subprocess
import sysconfig
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from .helpers import CATEGORY, make_defects_obvious

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALL_CONFIGS = sorted(CONFIGS.rglob("*.y*ml"))


def configs(kind: str) -> list[Path]:
    return [path for path in ALL_CONFIGS if path.parent.name == kind]


def test_every_config_is_loaded_by_a_test() -> None:
    assert ALL_CONFIGS
    assert {path.parent.name for path in ALL_CONFIGS} <= {"model", "data", "benchmark"}
    assert configs("model") and configs("data") and configs("benchmark")


def cli(*args: str):
    from anomalib.cli import AnomalibCLI

    return AnomalibCLI(["fit", *args], run=False)


@pytest.mark.parametrize("config", configs("model"), ids=lambda path: path.name)
def test_model_config(config: Path, tiny_dataset_root: Path) -> None:
    from anomalib_cfa_ncl import FocusDist

    spec = yaml.safe_load(config.read_text())
    data = ("--data", "MVTec", "--data.root", str(tiny_dataset_root), "--data.category", CATEGORY)
    loaded = cli("--config", str(config), "--model.init_args.pre_trained", "false", *data)
    assert isinstance(loaded.model, FocusDist)
    defaults = inspect.signature(FocusDist).parameters
    for name, value in spec["model"]["init_args"].items():
        assert value == defaults[name].default, f"{config.name}: {name} differs from FocusDist's default"
        if name != "pre_trained":
            assert loaded.model.hparams[name] == value
    assert loaded.config.fit.trainer.max_epochs == spec["trainer"]["max_epochs"]


def _write_dataset(class_path: str) -> Callable[[Path], tuple[str, int]]:
    """The writer of a tiny dataset in the layout of the datamodule; returns the category and training size."""
    from anomalib_cfa_ncl.data import make_btad_dataset, make_mvtec_dataset

    sizes = {"n_train": 6, "n_test_good": 2, "n_test_per_defect": 1, "image_size": 64}
    writers = {
        "MVTec": lambda root: (make_mvtec_dataset(root, CATEGORY, **sizes).name, sizes["n_train"]),
        "BTAD": lambda root: (make_btad_dataset(root, "01", **sizes).name, sizes["n_train"]),
    }
    return writers[class_path.rsplit(".", 1)[-1]]


@pytest.mark.parametrize("config", configs("data"), ids=lambda path: path.name)
def test_data_config(config: Path, tmp_path: Path) -> None:
    from anomalib_cfa_ncl.data.datamodules import DEFAULT_NUM_WORKERS

    spec = yaml.safe_load(config.read_text())
    category, n_train = _write_dataset(spec["class_path"])(tmp_path)
    data = ("--data", str(config), "--data.root", str(tmp_path), "--data.category", category)
    loaded = cli("--model", "FocusDist", "--model.init_args.pre_trained", "false", *data)
    datamodule = loaded.datamodule
    assert type(datamodule).__name__ == spec["class_path"].rsplit(".", 1)[-1]
    for name in ("train_batch_size", "eval_batch_size"):
        assert getattr(datamodule, name) == spec["init_args"][name]
    assert datamodule.num_workers == DEFAULT_NUM_WORKERS  # fits the machine: no "8 worker processes" warning
    datamodule.prepare_data()
    datamodule.setup()
    assert len(datamodule.train_data) == n_train
    assert set(datamodule.test_data.samples.label_index) == {0, 1}


@pytest.mark.parametrize("config", configs("benchmark"), ids=lambda path: path.name)
def test_benchmark_config(config: Path, tiny_dataset_root: Path, tmp_path: Path) -> None:
    """Run ``anomalib benchmark`` with the config's models and datamodule, on tiny data and untrained backbones.

    The defects of the tiny data are made obvious, so a FocusDist that works finds every one.
    """
    import shutil

    from anomalib.data.datasets.image.mvtecad import CATEGORIES

    data_root = tmp_path / "data"
    shutil.copytree(tiny_dataset_root, data_root)
    make_defects_obvious(data_root / CATEGORY)

    spec = yaml.safe_load(config.read_text())
    models = spec["benchmark"]["model"]["class_path"]["grid"]
    data = spec["benchmark"]["data"]
    assert {"FocusDist", "Padim", "Patchcore"} <= set(models)
    assert data["class_path"] == "MVTec"
    assert set(data["init_args"]["category"]["grid"]) <= set(CATEGORIES)

    # Same keys for every model: anomalib's results table takes its columns from the first job.
    offline = {"backbone": "resnet18", "pre_trained": False}
    spec["benchmark"]["model"] = {"grid": [{"class_path": name, "init_args": offline} for name in models]}
    data["init_args"].update(root=str(data_root), category=CATEGORY, num_workers=0)
    tiny_config = tmp_path / config.name
    tiny_config.write_text(yaml.safe_dump(spec))
    anomalib = Path(sysconfig.get_path("scripts")) / "anomalib"
    # Lightning takes trainer defaults from PL_TRAINER_* variables: one epoch for FocusDist too (Padim's is 1).
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PL_TRAINER_MAX_EPOCHS": "1"}
    result = subprocess.run(
        [str(anomalib), "benchmark", "--config", str(tiny_config)], cwd=tmp_path, env=environment,
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    (results,) = tmp_path.glob("runs/benchmark/*/results.csv")
    with results.open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert sorted(row["model.class_path"] for row in rows) == sorted(models), result.stdout[-3000:]
    for row in rows:
        assert row["data.class_path"] == "MVTec"
        assert {"image_AUROC", "pixel_AUROC"} <= set(row)
    (focusdist,) = [row for row in rows if row["model.class_path"] == "FocusDist"]
    assert float(focusdist["image_AUROC"]) == 1.0
