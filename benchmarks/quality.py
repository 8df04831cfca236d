"""Quality benchmark: FocusDist beside anomalib's Padim and Patchcore on the same backbone and data.

Prints one markdown table (model x category: image AUROC, pixel AUROC, AUPRO, fit seconds, test images/s)
with the ablation rows of FocusDist (which stage adds what), the means over categories, and FocusDist's test
metrics after every epoch (reported only: the schedule is fixed in advance, test anomalies never steer it).

Usage:
    python benchmarks/quality.py --root DATA [--categories a b ...] [--epochs 5] [--out results/quality]
        [--accelerator gpu]
    python benchmarks/quality.py --report results/a/results.json results/b/results.json

DATA is an MVTec-format root (e.g. written by the development benchmark generator). With the default
``--backbone tf_efficientnet_lite0`` the ImageNet weights must be in timm's cache (offline: set HF_HUB_OFFLINE=1
after seeding the cache) or be given with ``--backbone-weights``.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from pathlib import Path

import numpy as np
import torch
from anomalib.data import MVTecAD
from anomalib.metrics import AUPRO, AUROC, Evaluator
from builders import LAYERS, add_variant_argument, build_model, parse_variants
from export_common import quiet_engine
from intervals import MAP_SIZE, RESAMPLES, PairedBootstrap, PredictionRecorder, load_predictions, raw_score_auroc
from lightning.pytorch import Callback, seed_everything

from anomalib_cfa_ncl import FocusDist

# FocusDist rows: the default, then the paper's stages added one by one (switches given in full, so a row keeps its
# meaning whatever the defaults are)
ABLATIONS = {
    "FocusDist": {},
    "FocusDist frozen (no training)": {"image_alignment": False, "feature_alignment": False, "ncl": False},
    "FocusDist image alignment only": {"image_alignment": True, "feature_alignment": False, "ncl": False},
    "FocusDist + feature alignment": {"image_alignment": True, "feature_alignment": True, "ncl": False},
    "FocusDist + NCL (all three stages)": {"image_alignment": True, "feature_alignment": True, "ncl": True},
    "FocusDist without patch bank (patch_bank: 0)": {"patch_bank": 0},
    "FocusDist fast preset (image_alignment: false, patch_bank: 0)": {"image_alignment": False, "patch_bank": 0},
}


def evaluator() -> Evaluator:
    """Image AUROC, pixel AUROC and pixel AUPRO (FPR limit 0.3) on the test set."""
    return Evaluator(
        test_metrics=[
            AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
            AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
        ],
    )


class EpochCurve(Callback):
    """After every training epoch, fit FocusDist's statistics and record test image/pixel AUROC (report only)."""

    def __init__(self, datamodule: MVTecAD) -> None:
        self.datamodule = datamodule
        self.rows: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer, pl_module: FocusDist) -> None:
        pl_module.fit_statistics_if_stale()
        pl_module.model.eval()
        scores, labels, maps, masks = [], [], [], []
        with torch.no_grad():
            for batch in self.datamodule.test_dataloader():
                images = pl_module.pre_processor.transform(batch.image.to(pl_module.device))
                output = pl_module.model(images)
                size = batch.gt_mask.shape[-2:]
                maps.append(
                    torch.nn.functional.interpolate(output.anomaly_map, size=size, mode="bilinear").cpu().flatten()
                )
                scores.append(output.pred_score.cpu().flatten())
                labels.append(batch.gt_label.flatten())
                masks.append(batch.gt_mask.flatten())
        pl_module.model.train()
        self.rows.append(
            {
                "epoch": trainer.current_epoch + 1,
                **{
                    name: float(trainer.callback_metrics[key])
                    for name, key in (
                        ("train_loss", "train_loss_epoch"),
                        ("ncl_loss", "train_ncl_loss"),
                        ("ica_loss", "train_ica_loss"),
                    )
                    if key in trainer.callback_metrics
                },
                "image_AUROC": raw_score_auroc(torch.cat(scores), torch.cat(labels)),
                "pixel_AUROC": raw_score_auroc(torch.cat(maps), torch.cat(masks)),
            }
        )


METRIC_KEYS = ("image_AUROC", "pixel_AUROC", "pixel_AUPRO", "fit_s", "test_img_s")
SEED_SUFFIX = re.compile(r" \(seed \d+\)$")


def row_name(name: str, seed: int) -> str:
    """The table's name of a model run with ``seed``: the model's name at seed 0, else with the seed appended."""
    return name if seed == 0 else f"{name} (seed {seed})"


def seed_groups(names: list[str]) -> dict[str, list[str]]:
    """Models run with several seeds: ``"NAME (mean of K seeds)"`` -> the names of their K runs."""
    groups: dict[str, list[str]] = {}
    for name in dict.fromkeys(names):
        groups.setdefault(SEED_SUFFIX.sub("", name), []).append(name)
    return {f"{base} (mean of {len(runs)} seeds)": runs for base, runs in groups.items() if len(runs) > 1}


def run(name: str, category: str, args: argparse.Namespace) -> dict:
    """Fit and test one model on one category; return its metrics and timings."""
    seed_everything(args.seed, workers=True)
    datamodule = MVTecAD(
        root=args.root,
        category=category,
        train_batch_size=args.batch_size,
        eval_batch_size=32,
        num_workers=args.workers,
        seed=args.seed,
    )
    datamodule.setup()
    arguments = {**ABLATIONS, **args.variants}[name] if name not in ("Padim", "Patchcore") else None
    model = build_model(name, args.backbone, True, args.backbone_weights, arguments, evaluator=evaluator())
    focusdist = isinstance(model, FocusDist)
    trained = focusdist and (model.model.ncl_heads is not None or model.model.image_transformer is not None)
    recorder = PredictionRecorder()
    wanted = args.curve and (name == "FocusDist" or name in args.variants)
    curve = EpochCurve(datamodule) if trained and wanted else None
    callbacks = [recorder, curve] if curve else [recorder]
    engine = quiet_engine(args.out / "runs", args.epochs if trained else 1, args.accelerator, callbacks=callbacks)
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    metrics = engine.test(model=model, datamodule=datamodule, verbose=False)[0]
    test_seconds = time.perf_counter() - start
    predictions = args.out / "predictions"
    predictions.mkdir(parents=True, exist_ok=True)
    recorder.save(predictions / prediction_file(row_name(name, args.seed), category))
    n_test = len(datamodule.test_data)
    result = {
        "model": row_name(name, args.seed),
        "seed": args.seed,
        "category": category,
        "image_AUROC": float(metrics["image_AUROC"]),
        "pixel_AUROC": float(metrics["pixel_AUROC"]),
        "pixel_AUPRO": float(metrics["pixel_AUPRO"]),
        "fit_s": fit_seconds,
        "test_img_s": n_test / test_seconds,
    }
    gate = model.model.alignment_gate if focusdist else None
    if gate is not None:  # which frame the alignment gate chose, on the training images alone
        result["alignment_kept"] = bool(gate.enabled)
        result["gate_separation"] = gate.separation.tolist()
        result["gate_wins"] = gate.wins  # share of the held-back resamples in which the aligned frame won
    if focusdist:  # the grid pooling, shrinkage, scorer and calibration chosen on the training images alone
        result["grid_pooled"] = bool(model.model.grid_pooling.enabled)
        result["covariance_shrinkage"] = model.model.gaussian.shrinkage
        result["patch_bank_chosen"] = model.model.patch_bank.is_fitted  # the bank scores, alone or with the Gaussian
        result["patch_bank_joined"] = model.model.patch_bank.joins_gaussian
        scorer = model.model.patch_bank if result["patch_bank_chosen"] else model.model.gaussian
        result["distance_calibrated"] = not bool((scorer.location_scale == 1).all())
    if curve:
        result["curve"] = curve.rows
    return result


def prediction_file(name: str, category: str) -> str:
    """File name of one run's saved test predictions."""
    return "".join(char if char.isalnum() else "_" for char in f"{name}__{category}") + ".npz"


def differences(results: list[dict], categories: list[str], folders: list[Path], references: list[str]) -> list[str]:
    """Table lines: each model's mean AUROC difference to ``references`` with a 95 % paired bootstrap interval.

    Several references (one model's runs with several seeds) are averaged: the difference is to their mean AUROC.
    """

    def predictions(name: str) -> dict | None:
        found = {}
        for category in categories:
            files = [folder / prediction_file(name, category) for folder in folders]
            existing = [file for file in files if file.is_file()]
            if not existing:
                return None
            found[category] = load_predictions(existing[0])
        return found

    bases = [predictions(reference) for reference in references]
    if any(base is None for base in bases) or len(categories) < 1:
        return []
    bootstrap = PairedBootstrap(categories, {c: len(bases[0][c].scores) for c in categories})
    reference = references[0] if len(references) == 1 else f"the mean AUROC of {', '.join(references)}"
    lines = [
        "",
        f"Mean difference to {reference} over the {len(categories)} categories, with a 95 % paired bootstrap interval "
        f"over test images ({RESAMPLES} resamples; pixel AUROC on {MAP_SIZE}x{MAP_SIZE} maps). An interval that "
        "contains 0 means: equal within the test sets' noise.",
        "",
        "| model | image AUROC difference [95 % interval] | pixel AUROC difference [95 % interval] |",
        "|---|---|---|",
    ]
    names = list(dict.fromkeys(r["model"] for r in results))
    entries = [(name, [name]) for name in names] + list(seed_groups(names).items())
    for name, runs in entries:
        own = [predictions(run) for run in runs] if not set(runs) <= set(references) else None
        if own is None or any(run is None for run in own):
            continue
        cells = []
        for level in ("image", "pixel"):
            mean, low, high = bootstrap.mean_difference(own, bases, level)
            cells.append(f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]")
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    return lines


def per_category_differences(
    results: list[dict], categories: list[str], folders: list[Path], references: list[str], model: str
) -> list[str]:
    """Table lines: ``model``'s AUROC difference to ``references`` in each category alone, with its interval."""
    lines = [
        "",
        f"{model} against {' / '.join(references)}, per category (same bootstrap, each category alone):",
        "",
        "| category | image AUROC difference [95 % interval] | pixel AUROC difference [95 % interval] |",
        "|---|---|---|",
    ]
    runs = seed_groups([row["model"] for row in results]).get(model, [model])
    for category in categories:
        rows = [row for row in results if row["category"] == category and row["model"] in {*runs, *references}]
        found = [line for line in differences(rows, [category], folders, references) if line.startswith(f"| {model} |")]
        lines += [line.replace(f"| {model} |", f"| {category} |", 1) for line in found]
    return lines


def table(results: list[dict], categories: list[str]) -> str:
    """Markdown table, one row per model and category plus the mean over categories."""
    lines = [
        "| model | category | image AUROC | pixel AUROC | AUPRO | fit s | test img/s |",
        "|---|---|---|---|---|---|---|",
    ]
    names = list(dict.fromkeys(r["model"] for r in results))
    averaged = [  # models run with several seeds: each category's mean over the runs
        {
            "model": group,
            "category": category,
            **{key: np.mean([r[key] for r in runs]) for key in METRIC_KEYS},
        }
        for group, members in seed_groups(names).items()
        for category in categories
        if len(runs := [r for r in results if r["model"] in members and r["category"] == category]) == len(members)
    ]
    results = results + averaged
    for name in names + list(dict.fromkeys(r["model"] for r in averaged)):
        rows = [r for r in results if r["model"] == name]
        for r in rows:
            lines.append(
                f"| {name} | {r['category']} | {r['image_AUROC']:.3f} | {r['pixel_AUROC']:.3f} | "
                f"{r['pixel_AUPRO']:.3f} | {r['fit_s']:.0f} | {r['test_img_s']:.1f} |"
            )
        if len(rows) == len(categories) and len(categories) > 1:
            mean = {key: np.mean([r[key] for r in rows]) for key in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO")}
            lines.append(
                f"| **{name}** | **mean** | **{mean['image_AUROC']:.3f}** | **{mean['pixel_AUROC']:.3f}** | "
                f"**{mean['pixel_AUPRO']:.3f}** | {np.mean([r['fit_s'] for r in rows]):.0f} | "
                f"{np.mean([r['test_img_s'] for r in rows]):.1f} |"
            )
    curves = [r for r in results if "curve" in r]
    if curves:
        lines += [
            "",
            "FocusDist test metrics after each epoch (image / pixel AUROC; reported, not a stopping rule):",
            "",
        ]
        epochs = [row["epoch"] for row in curves[0]["curve"]]
        lines.append("| model | category | " + " | ".join(f"epoch {e}" for e in epochs) + " |")
        lines.append("|---|---|" + "---|" * len(epochs))
        for r in curves:
            cells = " | ".join(f"{row['image_AUROC']:.3f} / {row['pixel_AUROC']:.3f}" for row in r["curve"])
            lines.append(f"| {r['model']} | {r['category']} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    """Parse arguments, run every model on every category, print the table and save the results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, help="MVTec-format dataset root")
    parser.add_argument("--categories", nargs="+", default=["brick", "coffee_pose", "grass", "gravel"])
    parser.add_argument("--models", nargs="+", default=["Padim", "Patchcore", *ABLATIONS])
    parser.add_argument("--backbone", default="tf_efficientnet_lite0", choices=sorted(LAYERS))
    parser.add_argument("--backbone-weights", default=None, help="local weights file for FocusDist")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument(
        "--curve",
        action="store_true",
        help="also record FocusDist's test metrics after every epoch (reported only; adds its time to fit s)",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0, help="rows of another seed are named 'MODEL (seed N)'")
    parser.add_argument("--accelerator", default="cpu", help="Lightning accelerator: cpu (default), gpu, auto")
    parser.add_argument("--out", type=Path, default=Path("results/quality"))
    add_variant_argument(parser)
    parser.add_argument(
        "--reference",
        nargs="+",
        default=["Patchcore"],
        help="model the differences with intervals refer to; several (e.g. 'Patchcore' 'Patchcore (seed 1)'): "
        "their mean AUROC",
    )
    parser.add_argument(
        "--per-category",
        nargs="+",
        default=[],
        metavar="MODEL",
        help="with --report: also each category's difference of these models (or 'NAME (mean of K seeds)') to the "
        "reference",
    )
    parser.add_argument(
        "--report",
        nargs="+",
        type=Path,
        metavar="RESULTS_JSON",
        help="print the table of earlier runs' results.json files (e.g. of runs split over processes) and exit",
    )
    args = parser.parse_args()
    if args.report:
        results = [row for path in args.report for row in json.loads(path.read_text())]
        categories = list(dict.fromkeys(row["category"] for row in results))
        folders = [path.parent / "predictions" for path in args.report]
        lines = differences(results, categories, folders, args.reference)
        for model in args.per_category:
            lines += per_category_differences(results, categories, folders, args.reference, model)
        print("\n".join([table(results, categories), *lines]))
        return
    parse_variants(parser, args)
    if args.root is None or not args.root.is_dir():
        parser.error(f"--root {args.root} is not a folder: generate the dataset first or pass an MVTec-format root.")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.models:
        for category in args.categories:
            result = run(name, category, args)
            results.append(result)
            print(json.dumps({k: v for k, v in result.items() if k != "curve"}), flush=True)
            (args.out / "results.json").write_text(json.dumps(results, indent=1))
    lines = differences(results, args.categories, [args.out / "predictions"], args.reference)
    report = "\n".join([table(results, args.categories), *lines])
    (args.out / "table.md").write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    main()
