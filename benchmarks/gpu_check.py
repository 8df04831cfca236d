"""GPU check: FocusDist fits, tests and predicts on a CUDA device as it does on the CPU.

For each configuration (the default; the paper's three stages with grid pooling; the default at bf16-mixed
precision) it fits and tests FocusDist with anomalib's ``Engine`` on the GPU, saves the checkpoint the way a GPU
training machine writes it, and predicts the test images twice: on the GPU with the trained model, and on the CPU
from that checkpoint (as an inspector without a GPU loads it). Prints one table: fit seconds and peak GPU memory,
test metrics, and the largest CPU-GPU difference of the scores and maps (relative to the map's range) with the label
flips.

The data is the embedded synthetic category of ``focusdist-demo`` (no download), written below ``--root``.

Usage:
    python benchmarks/gpu_check.py [--root DIR] [--epochs 3] [--backbone tf_efficientnet_lite0] [--out DIR]

The backbone's ImageNet weights come from timm's cache (offline: ``HF_HUB_OFFLINE=1``) or the hub;
``--no-pre-trained`` uses random weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from anomalib.data import MVTecAD
from builders import LAYERS, build_model
from export_common import quiet_engine
from lightning.pytorch import seed_everything
from quality import evaluator

from anomalib_cfa_ncl.data.synthetic import make_mvtec_dataset

CATEGORY = "coffee"
# name: (FocusDist arguments, Lightning precision)
CONFIGURATIONS = {
    "default": ({}, "32-true"),
    "three stages + grid pooling 5": ({"feature_alignment": True, "ncl": True, "grid_pooling": 5}, "32-true"),
    "default, bf16-mixed": ({}, "bf16-mixed"),
    "default, 16-mixed": ({}, "16-mixed"),
    "three stages + grid pooling 5, 16-mixed": (
        {"feature_alignment": True, "ncl": True, "grid_pooling": 5},
        "16-mixed",
    ),
}


def predictions(batches: list) -> dict[str, torch.Tensor]:
    """Scores, maps and labels of ``Engine.predict``'s batches, on the CPU in float32."""
    return {
        "score": torch.cat([batch.pred_score.float().cpu().reshape(-1) for batch in batches]),
        "map": torch.cat([batch.anomaly_map.float().cpu() for batch in batches]),
        "label": torch.cat([batch.pred_label.cpu().reshape(-1) for batch in batches]),
    }


def compare(gpu: dict[str, torch.Tensor], cpu: dict[str, torch.Tensor]) -> dict[str, float]:
    """Largest score difference, largest map difference relative to the map's range, and label flips."""
    span = float(cpu["map"].max() - cpu["map"].min()) or 1.0
    return {
        "score_diff": float((gpu["score"] - cpu["score"]).abs().max()),
        "map_diff_rel": float((gpu["map"] - cpu["map"]).abs().max()) / span,
        "label_flips": int((gpu["label"] != cpu["label"]).sum()),
    }


def check(name: str, args: argparse.Namespace) -> dict:
    """Fit and test one configuration on the GPU, then predict on the GPU and, from its checkpoint, on the CPU."""
    arguments, precision = CONFIGURATIONS[name]
    out = args.out / "".join(char if char.isalnum() else "_" for char in name)

    def model():
        return build_model(name, args.backbone, args.pre_trained, None, arguments, evaluator=evaluator())

    seed_everything(args.seed, workers=True)
    datamodule = MVTecAD(
        root=args.root, category=CATEGORY, train_batch_size=16, eval_batch_size=16, num_workers=args.workers
    )
    gpu_engine = quiet_engine(out, args.epochs, args.accelerator, precision=precision)
    trained = model()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    gpu_engine.fit(model=trained, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    peak_mib = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else float("nan")
    metrics = gpu_engine.test(model=trained, datamodule=datamodule, verbose=False)[0]
    checkpoint = out / "model.ckpt"
    gpu_engine.trainer.save_checkpoint(checkpoint)
    on_gpu = predictions(gpu_engine.predict(model=trained, dataloaders=datamodule.test_dataloader()))
    cpu_batches = quiet_engine(out / "cpu").predict(
        model=model(), dataloaders=datamodule.test_dataloader(), ckpt_path=str(checkpoint)
    )
    return {
        "configuration": name,
        "precision": precision,
        "fit_s": fit_seconds,
        "fit_peak_MiB": peak_mib,
        "image_AUROC": float(metrics["image_AUROC"]),
        "pixel_AUROC": float(metrics["pixel_AUROC"]),
        **compare(on_gpu, predictions(cpu_batches)),
    }


def table(results: list[dict]) -> str:
    """Markdown table of the checks."""
    lines = [
        "| configuration | fit s (GPU) | fit peak MiB (GPU) | image AUROC | pixel AUROC | CPU-GPU score diff "
        "| CPU-GPU map diff (of range) | label flips |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['configuration']} | {r['fit_s']:.1f} | {r['fit_peak_MiB']:.0f} | {r['image_AUROC']:.3f} | "
            f"{r['pixel_AUROC']:.3f} | {r['score_diff']:.1e} | {r['map_diff_rel']:.1e} | {r['label_flips']} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Parse arguments, run every configuration, print the table and save the results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("datasets/focusdist_gpu_check"))
    parser.add_argument("--configurations", nargs="+", default=list(CONFIGURATIONS), choices=list(CONFIGURATIONS))
    parser.add_argument("--backbone", default="tf_efficientnet_lite0", choices=sorted(LAYERS))
    parser.add_argument("--no-pre-trained", dest="pre_trained", action="store_false")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results/gpu_check"))
    parser.add_argument("--accelerator", default="gpu", help="gpu; cpu only tries the script itself out")
    args = parser.parse_args()
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        parser.error("no CUDA device is visible to torch: run this check on a machine with an NVIDIA GPU.")
    if not (args.root / CATEGORY).is_dir():
        make_mvtec_dataset(args.root, CATEGORY, n_train=120, n_test_good=40, image_size=args.image_size)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0) if args.accelerator == "gpu" else args.accelerator
    print(f"device: {device}, torch {torch.__version__}", flush=True)
    results = []
    for name in args.configurations:
        try:
            results.append(check(name, args))
        except Exception as error:  # one failing configuration must not hide the others' results
            logging.exception("configuration %r failed", name)
            results.append({"configuration": name, "error": f"{type(error).__name__}: {error}"})
        print(json.dumps(results[-1]), flush=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(table([r for r in results if "error" not in r]))
    failed = [r for r in results if "error" in r]
    for r in failed:
        print(f"FAILED {r['configuration']}: {r['error']}")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
