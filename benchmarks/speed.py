"""Speed benchmark: FocusDist, Padim and Patchcore in PyTorch eager, ONNX Runtime and OpenVINO, in one run.

Each model is fitted on one MVTec-format category (the weights do not change the speed; FocusDist trains for
``--epochs``, 1 by default), exported from its checkpoint with ``Engine.export`` (ONNX; OpenVINO FP32 and
FP16, both with a dynamic input size; FocusDist also INT8_PTQ calibrated on training images) and timed on
256x256 raw images, the whole pipeline (pre-processing to post-processing) included:

- latency: batch 1, ``--runs`` timed calls after ``--warmup`` untimed ones; median (p50) and 99th percentile;
- throughput: batch ``--batch``, ``--batches`` timed calls; images per second.

OpenVINO runs twice per IR: with ``INFERENCE_PRECISION_HINT=f32`` (exact) and with the CPU plugin's default
precision (bfloat16 on CPUs with bf16 units). Every runtime gets the same ``--threads``. Prints one markdown
table with ratios against FocusDist in PyTorch eager (higher is faster), the CPU and its load average.

Usage:
    python benchmarks/speed.py --root DATA [--category coffee_pose] [--threads 2] [--out results/speed]
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.deploy import CompressionType, ExportType
from builders import DEFAULT_BACKBONE, LAYERS, add_variant_argument, build_model, parse_variants
from export_common import (
    Variant,
    argument_parser,
    compile_openvino,
    export,
    load,
    onnx_runner,
    onnx_session,
    openvino_runner,
    parse,
    seed,
    test_and_calibration_data,
    torch_runner,
    train,
)

from anomalib_cfa_ncl import FocusDist
from anomalib_cfa_ncl.models.focusdist.backbone import create_feature_extractor

MODELS = ["FocusDist", "Padim", "Patchcore"]
SIZE = 256
FORMS = [
    Variant("ONNX Runtime", ExportType.ONNX),
    Variant("OpenVINO FP32", ExportType.OPENVINO),
    Variant("OpenVINO FP32", ExportType.OPENVINO, precision=None),
    Variant("OpenVINO FP16", ExportType.OPENVINO, CompressionType.FP16),
    Variant("OpenVINO FP16", ExportType.OPENVINO, CompressionType.FP16, precision=None),
]
FOCUSDIST_ONLY = [
    Variant("OpenVINO INT8_PTQ", ExportType.OPENVINO, CompressionType.INT8_PTQ),
    Variant("OpenVINO INT8_PTQ", ExportType.OPENVINO, CompressionType.INT8_PTQ, precision=None),
]


def inputs(data, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """One test image and a batch of test images, raw RGB resized to 256x256, float32 in [0, 1]."""
    images = torch.stack([data.test_data[index].image for index in range(batch)])
    images = F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", align_corners=False).clamp(0, 1)
    images = images.numpy().astype(np.float32)
    return np.ascontiguousarray(images[:1]), np.ascontiguousarray(images)


def time_calls(run: Callable[[np.ndarray], object], images: np.ndarray, calls: int, warmup: int) -> np.ndarray:
    """Seconds per call, after untimed warm-up calls."""
    for _ in range(warmup):
        run(images)
    seconds = np.empty(calls)
    for index in range(calls):
        start = time.perf_counter()
        run(images)
        seconds[index] = time.perf_counter() - start
    return seconds


def measure(
    run: Callable[[np.ndarray], object], single: np.ndarray, batch: np.ndarray, args, fixed_batch: int | None = None
) -> dict:
    """Latency percentiles at batch 1 and throughput at batch ``args.batch``.

    An exported graph whose batch dimension the exporter fixed (anomalib's Patchcore export fixes it at 2) takes
    only that many images per call: both measurements then use that batch, and ``latency_batch`` says so.
    """
    calls = args.batches
    if fixed_batch is not None:
        single = batch = np.resize(batch, (fixed_batch, *batch.shape[1:]))
        calls = max(args.batches * args.batch // fixed_batch, 1)
    latency = time_calls(run, single, args.runs, args.warmup)
    throughput = time_calls(run, batch, calls, 1)
    return {
        "latency_batch": len(single),
        "p50_ms": float(np.percentile(latency, 50) * 1e3),
        "p99_ms": float(np.percentile(latency, 99) * 1e3),
        "images_per_s": float(len(batch) * calls / throughput.sum()),
    }


def runner(variant: Variant, path: Path, threads: int) -> tuple[Callable | None, str, int | None]:
    """The callable for an exported file, the precision it computes in and the batch size the graph fixes.

    The callable is ``None`` if the runtime is not installed; the batch size is ``None`` when it is dynamic.
    """
    if variant.export_type == ExportType.ONNX:
        session = onnx_session(path, threads)
        if session is None:
            return None, "f32", None
        size = session.get_inputs()[0].shape[0]
        return onnx_runner(session), "f32", size if isinstance(size, int) else None
    compiled = compile_openvino(path, variant.config, threads)
    precision = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
    size = compiled.input(0).get_partial_shape()[0]
    return openvino_runner(compiled), precision, size.get_length() if size.is_static else None


def benchmark_model(name: str, data, calibration, args) -> list[dict]:
    """Fit, export and time one model in every form."""
    seed(args.seed)
    model = build_model(name, backbone_weights=args.backbone_weights, focusdist_arguments=args.variants.get(name))
    epochs = args.epochs if isinstance(model, FocusDist) else 1
    engine, checkpoint = train(model, data, args.out / "runs" / name, epochs)
    single, batch = inputs(data, args.batch)
    rows = [{"model": name, "runtime": "PyTorch eager", "precision": "f32"}]
    rows[0].update(measure(torch_runner(load(type(model), checkpoint)), single, batch, args))
    print(json.dumps(rows[0]), flush=True)
    exported: dict[str, Path] = {}
    for variant in FORMS + (FOCUSDIST_ONLY if isinstance(model, FocusDist) else []):
        if args.forms and variant.name not in args.forms:
            continue
        if variant.folder not in exported:
            exported[variant.folder] = export(engine, model, checkpoint, variant, args.out / name, calibration)
        run, precision, fixed_batch = runner(variant, exported[variant.folder], args.threads)
        if run is None:
            print(f"{variant.name}: runtime not installed, skipped", flush=True)
            continue
        rows.append({"model": name, "runtime": variant.name, "precision": precision})
        rows[-1].update(measure(run, single, batch, args, fixed_batch))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def benchmark_backbone(args) -> dict:
    """The feature extractor alone (``features_only``, FocusDist's layers) as an OpenVINO FP32 IR: the floor that
    every model built on this backbone pays, to compare the scoring's cost with."""
    import openvino as ov

    backbone = create_feature_extractor(DEFAULT_BACKBONE, LAYERS[DEFAULT_BACKBONE], pre_trained=False).eval()
    example = torch.rand(args.batch, 3, SIZE, SIZE)
    path = args.out / "backbone" / "backbone.xml"
    path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(ov.convert_model(backbone, example_input=example), str(path))
    compiled = compile_openvino(path, {"INFERENCE_PRECISION_HINT": "f32"}, args.threads)
    single, batch = (np.random.default_rng(0).random((n, 3, SIZE, SIZE), dtype=np.float32) for n in (1, args.batch))
    row = {"model": f"{DEFAULT_BACKBONE} features only", "runtime": "OpenVINO FP32", "precision": "f32"}
    row.update(measure(openvino_runner(compiled), single, batch, args))
    print(json.dumps(row), flush=True)
    return row


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, or the platform's processor string."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def runtime(row: dict) -> str:
    """The runtime's name, with the batch size when the export fixed it (its latency is per call of that batch)."""
    fixed = row["latency_batch"] != 1
    return f"{row['runtime']} (batch fixed at {row['latency_batch']} by the export)" if fixed else row["runtime"]


def table(rows: list[dict], header: str) -> str:
    """Markdown table with ratios against FocusDist in PyTorch eager (the first row when FocusDist did not run)."""
    eager = [row for row in rows if row["model"] == "FocusDist" and row["runtime"] == "PyTorch eager"]
    base = eager[0] if eager else rows[0]
    lines = [
        header,
        "",
        f"| model | runtime | computes in | throughput img/s (batch {rows[0]['batch']}) | p50 ms | p99 ms "
        "| throughput ratio | p50 speed ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {runtime(row)} | {row['precision']} | {row['images_per_s']:.1f} | "
            f"{row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {row['images_per_s'] / base['images_per_s']:.2f} | "
            f"{base['p50_ms'] / row['p50_ms']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Run every model in every form and print one table."""
    parser = argument_parser(__doc__, "results/speed")
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--epochs", type=int, default=1, help="FocusDist training epochs (speed does not depend on it)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--runs", type=int, default=100, help="timed batch-1 calls per form")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=10, help="timed calls at --batch per form")
    parser.add_argument("--forms", nargs="+", help="only these exported forms (e.g. 'OpenVINO FP32'); default: all")
    parser.add_argument("--no-backbone", action="store_true", help="skip the row of the feature extractor alone")
    add_variant_argument(parser)
    args = parse(parser)
    parse_variants(parser, args)
    torch.set_num_threads(args.threads)
    data, calibration = test_and_calibration_data(args)
    load_before = os.getloadavg()
    start = time.perf_counter()
    rows = []
    for name in args.models:
        rows += benchmark_model(name, data, calibration, args)
    if not args.no_backbone:
        rows.append(benchmark_backbone(args))
    for row in rows:
        row["batch"] = args.batch
    load_after = os.getloadavg()
    header = (
        f"{SIZE}x{SIZE} input, {args.threads} threads on {cpu_name()}, torch {torch.__version__}; "
        f"load average {load_before[0]:.1f} at the start, {load_after[0]:.1f} at the end "
        f"({time.perf_counter() - start:.0f} s in all)."
    )
    text = table(rows, header)
    print(text)
    (args.out / "table.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
