"""Memory benchmark: peak resident memory of fitting on 200 versus 2,000 small images.

FocusDist fits its Gaussian from running sums, so its peak memory should not grow with the training set;
anomalib's Padim (stores every embedding before fitting) and Patchcore (memory bank before coreset
selection) are measured beside it. Each fit runs in a fresh process and reports its own peak RSS.

Usage:
    python benchmarks/memory.py [--sizes 200 2000] [--image-size 64] [--models FocusDist Padim Patchcore]
        [--repeats 3] [--variant 'NAME={"patch_bank": 4096}']

Offline: the backbone is an untrained resnet18 (memory does not depend on the weights); the images are a
synthetic MVTec-format category written to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from builders import add_variant_argument, parse_variants


def fit_once(model_name: str, root: Path, image_size: int, arguments: dict | None = None) -> dict[str, float]:
    """Fit one model for one epoch and return its peak RSS in MiB and the fit time (runs in a child process)."""
    import torch
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from builders import build_model

    from anomalib_cfa_ncl import FocusDist

    torch.manual_seed(0)
    pre_processor = FocusDist.configure_pre_processor((image_size, image_size))
    model = build_model(
        model_name,
        "resnet18",
        pre_trained=False,
        focusdist_arguments=arguments,
        pre_processor=pre_processor,
        evaluator=False,
    )
    datamodule = MVTecAD(root=root, category="coffee", train_batch_size=32, eval_batch_size=32, num_workers=0)
    engine = Engine(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        default_root_dir=root.parent / "runs",
        limit_val_batches=0,
    )
    start = time.perf_counter()
    engine.fit(model, datamodule=datamodule)
    seconds = time.perf_counter() - start
    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "fit_s": seconds}


def measure(model_name: str, root: Path, image_size: int, arguments: dict | None = None) -> dict[str, float]:
    """Run :func:`fit_once` in a fresh interpreter so each peak is its own."""
    command = [sys.executable, __file__, "--child", model_name, str(root), str(image_size), json.dumps(arguments)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{model_name} on {root} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    """Build the datasets, measure every model at every size and print one table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[200, 2000])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--models", nargs="+", default=["FocusDist", "Padim", "Patchcore"])
    parser.add_argument(
        "--repeats", type=int, default=1, help="fresh processes per model and size; the table gives min-max"
    )
    add_variant_argument(parser)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, root, size, arguments = args.child
        print(json.dumps(fit_once(name, Path(root), int(size), json.loads(arguments))))
        return

    parse_variants(parser, args)

    from anomalib_cfa_ncl.data import make_mvtec_dataset

    with tempfile.TemporaryDirectory() as folder:
        roots = {}
        for size in args.sizes:
            roots[size] = Path(folder) / f"n{size}"
            make_mvtec_dataset(
                roots[size], "coffee", n_train=size, n_test_good=2, n_test_per_defect=1, image_size=args.image_size
            )
        sizes = args.sizes
        rows = {
            name: {
                size: [
                    measure(name, roots[size], args.image_size, args.variants.get(name)) for _ in range(args.repeats)
                ]
                for size in sizes
            }
            for name in args.models
        }
    first, last = args.sizes[0], args.sizes[-1]
    print(
        "| model | "
        + " | ".join(f"peak RSS, {n} images (MiB)" for n in args.sizes)
        + f" | growth {first}->{last} | "
        + " | ".join(f"fit s ({n})" for n in args.sizes)
        + " |"
    )
    print("|---|" + "---|" * (2 * len(args.sizes) + 1))
    for name, by_size in rows.items():
        peaks = {n: [run["peak_rss_mib"] for run in by_size[n]] for n in args.sizes}
        cells = " | ".join(_spread(peaks[n]) for n in args.sizes)
        times = " | ".join(f"{np.median([run['fit_s'] for run in by_size[n]]):.0f}" for n in args.sizes)
        growth = np.median(peaks[last]) - np.median(peaks[first])
        print(f"| {name} | {cells} | {growth:+.0f} MiB | {times} |")


def _spread(values: list[float]) -> str:
    """Median, with the min-max range when several processes were measured."""
    if len(values) == 1:
        return f"{values[0]:.0f}"
    return f"{np.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


if __name__ == "__main__":
    main()
