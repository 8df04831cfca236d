"""``focusdist-demo``: train and test FocusDist with anomalib's own CLI on a dataset built on the fly.

The dataset is a small MVTec-format category written from a photo shipped with scikit-image (no download):
one object under random poses, lights and sensor noise, with stains and scratches as defects. The demo then
runs the real ``anomalib train --model FocusDist --data MVTec --data.root <folder> ...`` in a subprocess, so the
output is what anomalib users know, prints the test metrics and says where the images went.

FocusDist starts from ImageNet weights downloaded from the Hugging Face hub. When they are not cached and the
hub cannot be reached (air-gapped machines), the demo trains from random weights and says so.

Example:
    $ focusdist-demo                                  # about 3 minutes on 2 CPU cores
    $ focusdist-demo -- --trainer.max_epochs 10       # arguments after -- go to `anomalib train`

"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import constants, try_to_load_from_cache
from timm.models import get_pretrained_cfg

from .data.synthetic import make_mvtec_dataset

CATEGORY = "coffee"
BACKBONE = "resnet18"  # FocusDist's default backbone
MARKER = ".focusdist-demo"  # marks dataset folders the demo wrote, so it may rewrite them
METRICS = ("image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_F1Score")


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """Parse the demo's options; arguments after ``--`` are passed on to ``anomalib train``."""
    parser = argparse.ArgumentParser(
        prog="focusdist-demo",
        description="Train and test FocusDist with `anomalib train` on a small dataset built on the fly.",
        epilog="Arguments after -- are passed to `anomalib train`, e.g. -- --trainer.max_epochs 10.",
    )
    parser.add_argument("--dataset-root", type=Path, default=Path("datasets/focusdist_demo"), help="%(default)s")
    parser.add_argument("--results", type=Path, default=Path("results"), help="anomalib's results folder")
    parser.add_argument("--n-train", type=int, default=60, help="normal training images (%(default)s)")
    parser.add_argument("--image-size", type=int, default=224, help="side of the generated images (%(default)s)")
    parser.add_argument("--epochs", type=int, default=5, help="training epochs (%(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training run (%(default)s)")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    return parser.parse_args(own), extra


def write_dataset(root: Path, n_train: int, image_size: int) -> Path:
    """Write the demo category below ``root``, replacing an earlier demo's, never a folder of someone else's.

    Args:
        root (Path): Dataset root (``--data.root``).
        n_train (int): Normal training images.
        image_size (int): Side of the square images.

    Returns:
        Path: The category folder.

    Raises:
        FileExistsError: If the category folder exists and was not written by the demo.

    """
    folder = root / CATEGORY
    if folder.exists():
        if not (folder / MARKER).is_file():
            msg = f"{folder} exists and was not written by focusdist-demo: pass another --dataset-root."
            raise FileExistsError(msg)
        shutil.rmtree(folder)
    make_mvtec_dataset(root, CATEGORY, n_train=n_train, image_size=image_size)
    (folder / MARKER).write_text("written by focusdist-demo\n")
    return folder


def _weights_cached(backbone: str) -> bool:
    """Whether timm finds the backbone's ImageNet weights in the Hugging Face cache."""
    config = get_pretrained_cfg(backbone)
    if config is None or not config.hf_hub_id:
        return False
    return any(
        isinstance(try_to_load_from_cache(config.hf_hub_id, name), str)
        for name in ("model.safetensors", "pytorch_model.bin")
    )


def _hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the Hugging Face hub answers (any HTTP status counts; proxies from the environment are used)."""
    if constants.HF_HUB_OFFLINE:
        return False
    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False
    return True


def weights_available(backbone: str = BACKBONE) -> bool:
    """Whether timm can load the backbone's ImageNet weights: cached, or the Hugging Face hub reachable.

    Args:
        backbone (str): timm model name.

    Returns:
        bool: ``True`` when ``pre_trained=True`` will work.

    """
    return _weights_cached(backbone) or _hub_reachable()


def backbone_arguments(backbone: str = BACKBONE) -> list[str]:
    """``anomalib train`` arguments for the backbone: nothing when ImageNet weights are available, else random ones.

    Args:
        backbone (str): timm model name.

    Returns:
        list[str]: ``[]``, or ``["--model.init_args.pre_trained", "false"]`` (the demo says so in one line).

    """
    if weights_available(backbone):
        return []
    print(
        f"focusdist-demo: ImageNet weights of {backbone} are not cached and the Hugging Face hub cannot be reached: "
        "training from random weights (--model.init_args.pre_trained false); scores will be lower."
    )
    return ["--model.init_args.pre_trained", "false"]


def anomalib_executable() -> str:
    """The ``anomalib`` console script of this Python environment."""
    scripts = Path(sysconfig.get_path("scripts"))
    for name in ("anomalib", "anomalib.exe"):
        if (scripts / name).is_file():
            return str(scripts / name)
    return "anomalib"


def read_test_metrics(log_dir: Path) -> dict[str, float]:
    """Read the test metrics from the CSV logger's ``metrics.csv`` (the last row that has them)."""
    metrics: dict[str, float] = {}
    for path in sorted(log_dir.rglob("metrics.csv")):
        with path.open(newline="") as file:
            for row in csv.DictReader(file):
                metrics.update({name: float(row[name]) for name in METRICS if row.get(name)})
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the exit status of ``anomalib train``."""
    args, extra = parse_args(argv)
    start = time.perf_counter()
    try:
        folder = write_dataset(args.dataset_root, args.n_train, args.image_size)
    except FileExistsError as error:
        print(f"focusdist-demo: error: {error}", file=sys.stderr)
        return 2
    print(f"focusdist-demo: wrote the dataset to {folder} ({args.n_train} normal training images)")
    with tempfile.TemporaryDirectory(prefix="focusdist-demo-") as log_dir:
        command = [
            anomalib_executable(),
            "train",
            "--model", "FocusDist",
            "--data", "MVTec",
            "--data.root", str(args.dataset_root),
            "--data.category", CATEGORY,
            "--data.num_workers", str(min(os.cpu_count() or 1, 8)),
            "--default_root_dir", str(args.results),
            "--seed_everything", str(args.seed),
            "--trainer.max_epochs", str(args.epochs),
            # Validation refits the Gaussian on all training images: once, after the last epoch, is enough here.
            "--trainer.check_val_every_n_epoch", str(args.epochs),
            "--trainer.logger", "CSVLogger",
            "--trainer.logger.save_dir", log_dir,
            *backbone_arguments(),
            *extra,
        ]  # fmt: skip
        print("focusdist-demo: running anomalib", " ".join(command[1:]), flush=True)
        status = subprocess.run(command, check=False).returncode
        metrics = read_test_metrics(Path(log_dir))
    if status != 0:
        return status
    run = (args.results / "FocusDist" / "MVTec" / CATEGORY / "latest").resolve()
    print(f"\nfocusdist-demo: done in {time.perf_counter() - start:.0f} s. Test metrics:")
    for name, value in metrics.items():
        print(f"  {name:<14} {value:.3f}")
    print(f"Test images with anomaly maps and masks: {run / 'images'}")
    print(f"Alignment view (input | aligned):        {run / 'images' / 'alignment'}")
    print(f"Checkpoint:                              {run / 'weights' / 'lightning' / 'model.ckpt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
