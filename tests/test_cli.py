"""FocusDist through anomalib's own console script, as a user types it (subprocesses, tiny data, offline).

The short names ``--model FocusDist``, ``--data MVTec`` and ``--data BTAD`` must resolve without importing anything:
the ``.pth`` hook installed with the package does it. Ordinary mistakes end in one line that says the fix.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from .helpers import CATEGORY

REPO = Path(__file__).resolve().parents[1]
ANOMALIB = Path(sysconfig.get_path("scripts")) / "anomalib"
TINY_MODEL = (
    *("--model", "FocusDist", "--model.init_args.pre_trained", "false"),
    *("--model.init_args.projection_dim", "32", "--model.init_args.n_features", "64"),
)
RUN = Path("results") / "FocusDist" / "MVTec" / CATEGORY / "v0"


def run_anomalib(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """Run the ``anomalib`` console script of this environment, offline."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run(
        [str(ANOMALIB), *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=900, check=False
    )


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def mvtec_args(root: Path) -> tuple[str, ...]:
    return "--data", "MVTec", "--data.root", str(root), "--data.category", CATEGORY, "--data.num_workers", "0"


@pytest.fixture(scope="module")
def trained(tiny_dataset_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The README's command, ``anomalib train --model FocusDist --data MVTec ...``, run once."""
    workdir = tmp_path_factory.mktemp("cli")
    result = run_anomalib(
        "train", *TINY_MODEL, *mvtec_args(tiny_dataset_root), "--trainer.max_epochs", "1", cwd=workdir
    )
    assert_ok(result)
    return workdir, result.stdout + result.stderr


def test_train_writes_metrics_checkpoint_and_images(trained: tuple[Path, str], tiny_dataset_root: Path) -> None:
    workdir, output = trained
    assert "image_AUROC" in output and "pixel_AUROC" in output
    run = workdir / RUN
    assert (run / "weights" / "lightning" / "model.ckpt").is_file()
    test_images = sorted((tiny_dataset_root / CATEGORY / "test").glob("*/*.png"))
    for image in test_images:
        relative = image.relative_to(tiny_dataset_root / CATEGORY / "test")
        assert (run / "images" / relative).is_file()  # anomalib's visualiser
        view = Image.open(run / "images" / "alignment" / relative)
        assert view.width == 2 * view.height  # input | aligned


def test_test_from_checkpoint(trained: tuple[Path, str], tiny_dataset_root: Path) -> None:
    """The README's command, without ``--data.num_workers``: the default fits the machine's CPUs."""
    workdir, _ = trained
    checkpoint = workdir / RUN / "weights" / "lightning" / "model.ckpt"
    data = mvtec_args(tiny_dataset_root)[:-2]
    result = run_anomalib("test", *TINY_MODEL, *data, "--ckpt_path", str(checkpoint), cwd=workdir)
    assert_ok(result)
    assert "image_AUROC" in result.stdout + result.stderr
    assert "worker processes" not in result.stderr  # torch: "This DataLoader will create 8 worker processes ..."


def test_predict_folder(trained: tuple[Path, str], tiny_dataset_root: Path) -> None:
    workdir, _ = trained
    checkpoint = workdir / RUN / "weights" / "lightning" / "model.ckpt"
    images = tiny_dataset_root / CATEGORY / "test" / "stain"
    output = workdir / "predictions"
    args = ("--data", str(images), "--ckpt_path", str(checkpoint), "--default_root_dir", str(output))
    result = run_anomalib("predict", *TINY_MODEL, *args, cwd=workdir)
    assert_ok(result)
    expected = sorted(path.name for path in images.glob("*.png"))
    assert sorted(path.name for path in output.rglob("images/stain/*.png")) == expected
    assert sorted(path.name for path in output.rglob("images/alignment/stain/*.png")) == expected
    # The log says where the scores and images went; the scores are in a CSV, one row per image.
    (scores,) = output.rglob("predictions.csv")
    report = f"FocusDist: {len(expected)} images predicted: scores in {scores}, images in {scores.parent / 'images'}"
    assert report in result.stdout + result.stderr
    with scores.open() as file:
        rows = list(csv.DictReader(file))
    assert sorted(Path(row["image"]).name for row in rows) == expected
    assert all(0.0 <= float(row["pred_score"]) <= 1.0 and row["pred_label"] in {"true", "false"} for row in rows)


def test_export(trained: tuple[Path, str]) -> None:
    workdir, _ = trained
    checkpoint = workdir / RUN / "weights" / "lightning" / "model.ckpt"
    export_root = workdir / "export"
    result = run_anomalib(
        "export",
        *TINY_MODEL,
        "--ckpt_path",
        str(checkpoint),
        "--export_type",
        "torch",
        "--export_root",
        str(export_root),
        cwd=workdir,
    )
    assert_ok(result)
    assert (export_root / "weights" / "torch" / "model.pt").is_file()


def test_onnx_export_is_quiet_and_at_opset_18(trained: tuple[Path, str]) -> None:
    """anomalib asks for opset 14: torch exports at 18, fails to convert down (a logged traceback) and the graph
    optimiser logs ~190 ``Replaced initializer`` records. The CLI asks for 18 and keeps those loggers quiet."""
    import onnx

    workdir, _ = trained
    checkpoint = workdir / RUN / "weights" / "lightning" / "model.ckpt"
    export_root = workdir / "export_onnx"
    args = ("--ckpt_path", str(checkpoint), "--export_type", "onnx", "--export_root", str(export_root))
    result = run_anomalib("export", *TINY_MODEL, *args, cwd=workdir)
    assert_ok(result)
    output = result.stdout + result.stderr
    assert "Traceback" not in output and "Replaced initializer" not in output and "opset" not in output
    assert len(output.splitlines()) < 40, output
    model = onnx.load(export_root / "weights" / "onnx" / "model.onnx", load_external_data=False)
    assert {entry.version for entry in model.opset_import if entry.domain in {"", "ai.onnx"}} == {18}


def test_fit_on_btad(tmp_path: Path) -> None:
    from anomalib_cfa_ncl.data import make_btad_dataset

    root = tmp_path / "BTech"
    make_btad_dataset(root, "01", n_train=8, n_test_good=2, n_test_per_defect=1, image_size=64)
    btad = ("--data", "BTAD", "--data.root", str(root), "--data.category", "01", "--data.num_workers", "0")
    result = run_anomalib("fit", *TINY_MODEL, *btad, "--trainer.max_epochs", "1", cwd=tmp_path)
    assert_ok(result)
    assert (
        tmp_path / "results" / "FocusDist" / "BTAD" / "01" / "v0" / "weights" / "lightning" / "model.ckpt"
    ).is_file()


def test_get_model_and_get_datamodule_by_name(tmp_path: Path) -> None:
    """In a fresh interpreter that imports only anomalib, as ``anomalib benchmark`` does."""
    script = """
import sys
from anomalib.data import get_datamodule
from anomalib.models import get_model
print(type(get_model("FocusDist", pre_trained=False)).__name__)
print(type(get_model({"class_path": "FocusDist", "init_args": {"pre_trained": False}})).__name__)
print(type(get_datamodule({"class_path": "MVTec", "init_args": {"category": "coffee"}})).__name__)
print(type(get_datamodule({"class_path": "BTAD", "init_args": {"category": "01"}})).__name__)
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert_ok(result)
    assert result.stdout.split() == ["FocusDist", "FocusDist", "MVTec", "BTAD"]


def test_plugin_hook_is_installed_and_lazy() -> None:
    assert (Path(sysconfig.get_path("purelib")) / "anomalib_cfa_ncl_plugin.pth").is_file()
    script = "import sys; print('anomalib_cfa_ncl_plugin' in sys.modules, 'torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert result.stdout.split() == ["True", "False"]  # the hook waits, nothing heavy is imported at start-up


@pytest.mark.parametrize("editable", [False, True], ids=["wheel", "editable"])
def test_wheels_put_the_pth_file_into_site_packages(editable: bool, tmp_path: Path) -> None:
    """Both install modes: the .pth file sits at the root of the wheel, which pip unpacks into site-packages."""
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".*", "results", "datasets", "*.egg-info", "build"))
    hook = "build_editable" if editable else "build_wheel"
    script = f"from setuptools import build_meta; print(build_meta.{hook}({str(tmp_path / 'dist')!r}))"
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=source, capture_output=True, text=True, timeout=300, check=False
    )
    assert_ok(result)
    wheel = tmp_path / "dist" / result.stdout.split()[-1]
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert "anomalib_cfa_ncl_plugin.pth" in names
        assert archive.read("anomalib_cfa_ncl_plugin.pth") == (REPO / "anomalib_cfa_ncl_plugin.pth").read_bytes()
    if not editable:
        assert "anomalib_cfa_ncl_plugin.py" in names
    assert any(name.endswith("entry_points.txt") for name in names)


# Ordinary mistakes: one line that says the fix, no stack trace.


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    for fragment in fragments:
        assert fragment in last
    assert "Traceback" not in result.stderr and "╭" not in result.stderr


def test_unknown_backbone_is_one_line(tiny_dataset_root: Path, tmp_path: Path) -> None:
    args = ("fit", *TINY_MODEL, "--model.init_args.backbone", "resnet1000", *mvtec_args(tiny_dataset_root))
    assert_one_line_error(run_anomalib(*args, cwd=tmp_path), "Unknown backbone 'resnet1000'", "resnet18")


def test_unknown_category_is_explained(tiny_dataset_root: Path) -> None:
    from anomalib_cfa_ncl.cli import user_error
    from anomalib_cfa_ncl.data import BTAD, MVTec

    with pytest.raises(ValueError, match=r"Unknown MVTec AD category 'cofee' .* Did you mean 'coffee'\?") as error:
        MVTec(root=tiny_dataset_root, category="cofee").prepare_data()
    assert user_error(error.value) is error.value  # the CLI prints this message alone
    with pytest.raises(ValueError, match=r"Unknown BTAD category '1' .* Choose one of 01, 02, 03"):
        BTAD(root=tiny_dataset_root, category="1").prepare_data()


def test_missing_dataset_folder_is_one_line(tmp_path: Path) -> None:
    # An unusable proxy makes the download fail at once, with or without internet.
    args = ("fit", *TINY_MODEL, "--data", "MVTec", "--data.root", str(tmp_path / "none"), "--data.category", "bottle")
    result = run_anomalib(*args, cwd=tmp_path, https_proxy="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")
    assert_one_line_error(result, "'bottle' is not in", "--data.root")


def test_wrong_layer_stops_the_cli_with_one_line(tiny_dataset_root: Path) -> None:
    from anomalib.cli import AnomalibCLI

    args = ["fit", *TINY_MODEL, "--model.init_args.layers", "[layer9]", *mvtec_args(tiny_dataset_root)]
    with pytest.raises(SystemExit, match=r"^error: Backbone 'resnet18' has no feature layer 'layer9': choose layers"):
        AnomalibCLI(args, run=False)


def test_only_errors_raised_on_purpose_are_shortened() -> None:
    import torch

    from anomalib_cfa_ncl.cli import user_error
    from anomalib_cfa_ncl.models.focusdist.backbone import layer_indices

    with pytest.raises(ValueError, match="no feature layer") as explained:
        layer_indices("resnet18", ["layer9"])
    assert user_error(explained.value) is explained.value
    with pytest.raises(RuntimeError) as bug:  # raised inside torch: keeps anomalib's full trace
        torch.zeros(2).view(3)
    assert user_error(bug.value) is None


def test_seed_everything_is_applied() -> None:
    """anomalib 2.7's CLI parses ``--seed_everything`` but never applies it; the plugin does."""
    import torch
    from anomalib.cli.cli import AnomalibCLI

    from anomalib_cfa_ncl.cli import seed_from_config

    assert getattr(AnomalibCLI.instantiate_classes, "focusdist", False)
    assert seed_from_config({"subcommand": "train", "train": {"seed_everything": 7}}) == 7
    first = torch.rand(3)
    seed_from_config({"subcommand": "train", "train": {"seed_everything": 7}})
    assert torch.equal(first, torch.rand(3))
    assert seed_from_config({"subcommand": "train", "train": {"seed_everything": True}}) is None
