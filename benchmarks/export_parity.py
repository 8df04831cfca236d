"""Export parity: FocusDist's exported forms against its PyTorch model on the test images of one category.

Trains FocusDist on one MVTec-format category, exports it from the checkpoint with ``Engine.export`` (ONNX;
OpenVINO FP32 dynamic and static, FP16, INT8 weight compression, INT8 post-training quantisation), runs every
form on every test image (OpenVINO through anomalib's ``OpenVINOInferencer``) and prints one markdown table:
label agreement, largest score and anomaly-map differences (normalised outputs, as the exported graph returns
them), predicted-mask pixels that differ, and the image / pixel AUROC with their change against PyTorch.

The dynamic forms get the raw test images (the graph resizes them); the static 256x256 IR gets them resized to
256x256 first, and is compared with PyTorch on the same resized images.

INT8_PTQ is calibrated on normal training images only (a ``from_train`` validation split), never on test
images. For comparison one row quantises the whole graph, as anomalib's stock ``INT8_PTQ`` would without
FocusDist's quantisation scope.

Usage:
    python benchmarks/export_parity.py --root DATA [--category coffee_pose] [--epochs 5] [--out results/export]

DATA is an MVTec-format root. The backbone is ``tf_efficientnet_lite0`` (ImageNet weights from timm's cache
with HF_HUB_OFFLINE=1, or ``--backbone-weights FILE``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.deploy import CompressionType, ExportType, OpenVINOInferencer
from anomalib.engine import Engine
from anomalib.models.components.base.export_mixin import ExportMixin
from builders import build_model
from export_common import (
    Variant,
    argument_parser,
    export,
    onnx_runner,
    onnx_session,
    parse,
    quiet_engine,
    seed,
    test_and_calibration_data,
    torch_runner,
    train,
    working_directory,
)
from sklearn.metrics import roc_auc_score

from anomalib_cfa_ncl import FocusDist

VARIANTS = [
    Variant("ONNX Runtime FP32", ExportType.ONNX),
    Variant("OpenVINO FP32", ExportType.OPENVINO),
    Variant("OpenVINO FP32, static 256x256", ExportType.OPENVINO, input_size=(256, 256)),
    Variant("OpenVINO FP32, default precision", ExportType.OPENVINO, precision=None),
    Variant("OpenVINO FP16", ExportType.OPENVINO, CompressionType.FP16),
    Variant("OpenVINO FP16, default precision", ExportType.OPENVINO, CompressionType.FP16, precision=None),
    Variant("OpenVINO INT8 weights", ExportType.OPENVINO, CompressionType.INT8),
    Variant("OpenVINO INT8_PTQ", ExportType.OPENVINO, CompressionType.INT8_PTQ),
]
THRESHOLD = 0.5  # the post-processor's normalised threshold
TIE_TOLERANCE = 1e-3
WHOLE_GRAPH_PTQ = Variant("OpenVINO INT8_PTQ, whole graph (anomalib's scope)", ExportType.OPENVINO)


def test_set(data) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Raw test images as float32 ``(1, 3, H, W)`` in [0, 1], their labels and their masks ``(N, H, W)``."""
    items = [data.test_data[index] for index in range(len(data.test_data))]
    images = [item.image.unsqueeze(0).numpy().astype(np.float32) for item in items]
    labels = np.array([int(item.gt_label) for item in items])
    masks = np.stack([item.gt_mask.numpy().astype(bool).reshape(item.image.shape[-2:]) for item in items])
    return images, labels, masks


def predict_all(run, images: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Run one image at a time; stack each output over the images."""
    outputs = [run(image) for image in images]
    return {key: np.concatenate([np.asarray(output[key]).reshape(1, -1) for output in outputs]) for key in outputs[0]}


def inferencer_runner(path: Path, config: dict[str, str]):
    """Run an IR through anomalib's OpenVINOInferencer; also return the precision the CPU plugin chose."""
    inferencer = OpenVINOInferencer(path, device="CPU", config=config)
    precision = inferencer.model.get_property("INFERENCE_PRECISION_HINT").to_string()

    def run(image: np.ndarray) -> dict[str, np.ndarray]:
        prediction = inferencer.predict(image[0])
        return {key: getattr(prediction, key) for key in ("pred_score", "pred_label", "anomaly_map", "pred_mask")}

    return run, precision


def metrics(outputs: dict[str, np.ndarray], labels: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    """Image AUROC from the scores; pixel AUROC from the maps resized to the masks' size."""
    side = int(np.sqrt(outputs["anomaly_map"].shape[1]))
    maps = torch.from_numpy(outputs["anomaly_map"].reshape(-1, 1, side, side).astype(np.float32))
    maps = F.interpolate(maps, size=masks.shape[-2:], mode="bilinear", align_corners=False).numpy()
    return {
        "image_AUROC": float(roc_auc_score(labels, outputs["pred_score"].ravel())),
        "pixel_AUROC": float(roc_auc_score(masks.ravel(), maps.ravel())),
    }


def compare(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, float]:
    """Agreement of an exported form with the PyTorch model.

    anomalib's adaptive threshold is the score of one validation image; with the default validation split (the
    test images) one test image scores exactly the normalised threshold 0.5 and its label flips on any rounding.
    Differing labels are therefore counted in all and among the images scored within 1e-3 of the threshold.
    """
    differ = outputs["pred_label"].ravel() != reference["pred_label"].ravel()
    at_threshold = np.abs(reference["pred_score"].ravel() - THRESHOLD) <= TIE_TOLERANCE
    return {
        "labels_differ": int(differ.sum()),
        "labels_differ_at_threshold": int((differ & at_threshold).sum()),
        "max_score_diff": float(np.abs(outputs["pred_score"] - reference["pred_score"]).max()),
        "max_map_diff": float(np.abs(outputs["anomaly_map"] - reference["anomaly_map"]).max()),
        "mean_map_diff": float(np.abs(outputs["anomaly_map"] - reference["anomaly_map"]).mean()),
        "mask_px_differ": float(np.mean(outputs["pred_mask"] != reference["pred_mask"])),
    }


def whole_graph_ptq(fp32_xml: Path, calibration, out: Path) -> Path:
    """Quantise the FP32 IR the way anomalib's ``INT8_PTQ`` does for models without a quantisation scope."""
    import openvino as ov

    model = ExportMixin._post_training_quantization_ov(ov.Core().read_model(fp32_xml), calibration)
    path = out / "openvino_int8_ptq_whole_graph" / "model.xml"
    path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, path, compress_to_fp16=False)
    return path


def table(rows: list[dict]) -> str:
    """Markdown table of the rows."""
    lines = [
        "| form | computes in | labels differ (at threshold) | max score diff | max map diff | mean map diff "
        "| mask px differ | image AUROC (change) | pixel AUROC (change) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    reference = rows[0]
    for row in rows:
        if row is reference:
            lines.append(
                f"| {row['form']} | {row['precision']} | reference | | | | | {row['image_AUROC']:.4f} | "
                f"{row['pixel_AUROC']:.4f} |"
            )
            continue
        image_change = row["image_AUROC"] - reference["image_AUROC"]
        pixel_change = row["pixel_AUROC"] - reference["pixel_AUROC"]
        lines.append(
            f"| {row['form']} | {row['precision']} | {row['labels_differ']} ({row['labels_differ_at_threshold']}) | "
            f"{row['max_score_diff']:.1e} | "
            f"{row['max_map_diff']:.1e} | {row['mean_map_diff']:.1e} | {row['mask_px_differ']:.2%} | "
            f"{row['image_AUROC']:.4f} ({image_change:+.4f}) | {row['pixel_AUROC']:.4f} ({pixel_change:+.4f}) |"
        )
    return "\n".join(lines)


def trained(args, data) -> tuple[Engine, FocusDist, Path]:
    """Train FocusDist (or take ``--checkpoint``); return the engine, the model and its checkpoint."""
    if args.checkpoint is not None:
        checkpoint = args.checkpoint.resolve()
        return (
            quiet_engine(args.out / "runs"),
            FocusDist.load_from_checkpoint(checkpoint, map_location="cpu"),
            checkpoint,
        )
    start = time.perf_counter()
    model = build_model("FocusDist", backbone_weights=args.backbone_weights)
    engine, checkpoint = train(model, data, args.out / "runs", args.epochs)
    print(f"trained in {time.perf_counter() - start:.0f} s: {checkpoint}", flush=True)
    return engine, model, checkpoint


def form_runner(variant: Variant, path: Path, out: Path):
    """Callable for one exported form and the precision it computes in; ``None`` if its runtime is missing."""
    if variant.export_type == ExportType.ONNX:
        session = onnx_session(path, torch.get_num_threads())
        return (onnx_runner(session) if session is not None else None), "f32"
    with working_directory(out):
        return inferencer_runner(path, variant.config)


def resized(images: list[np.ndarray], size: tuple[int, int]) -> list[np.ndarray]:
    """Images resized as the exported graph resizes them (bilinear, no antialiasing), for a static input size."""
    return [
        F.interpolate(torch.from_numpy(image), size=size, mode="bilinear", align_corners=False).numpy()
        for image in images
    ]


def main() -> None:
    """Train, export every form, compare each with the PyTorch model, print and save the table."""
    parser = argument_parser(__doc__, "results/export")
    parser.add_argument("--epochs", type=int, default=None, help="default: FocusDist's own default")
    parser.add_argument("--checkpoint", type=Path, default=None, help="a FocusDist trained on --category: no training")
    parser.add_argument(
        "--forms",
        nargs="+",
        default=None,
        metavar="FORM",
        help="only the forms (rows) with these names, e.g. 'OpenVINO FP32'; default: all",
    )
    args = parse(parser)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    seed(args.seed)
    data, calibration = test_and_calibration_data(args)
    images, labels, masks = test_set(data)  # raw: read before fitting attaches the model's Resize to the datasets
    engine, model, checkpoint = trained(args, data)
    run_torch = torch_runner(FocusDist.load_from_checkpoint(checkpoint, map_location="cpu").eval())
    reference = predict_all(run_torch, images)
    rows = [{"form": "PyTorch eager", "precision": "f32", **metrics(reference, labels, masks)}]
    exported: dict[str, Path] = {}
    forms = [variant for variant in [*VARIANTS, WHOLE_GRAPH_PTQ] if args.forms is None or variant.name in args.forms]
    for variant in forms:
        if variant is WHOLE_GRAPH_PTQ:
            fp32 = VARIANTS[1]
            if fp32.folder not in exported:
                exported[fp32.folder] = export(engine, model, checkpoint, fp32, args.out, calibration)
            path = whole_graph_ptq(exported[fp32.folder], calibration, args.out)
        else:
            if variant.folder not in exported:
                exported[variant.folder] = export(engine, model, checkpoint, variant, args.out, calibration)
            path = exported[variant.folder]
        run, precision = form_runner(variant, path, args.out)
        if run is None:
            print(f"{variant.name}: runtime not installed, skipped", flush=True)
            continue
        inputs, expected = images, reference
        if variant.input_size is not None:  # a static IR takes only its size: resize first, for PyTorch too
            inputs = resized(images, variant.input_size)
            expected = predict_all(run_torch, inputs)
        outputs = predict_all(run, inputs)
        rows.append({"form": variant.name, "precision": precision, **compare(outputs, expected)})
        rows[-1].update(metrics(outputs, labels, masks))
        print(json.dumps(rows[-1]), flush=True)

    size = f"{images[0].shape[-2]}x{images[0].shape[-1]}"
    text = f"FocusDist on {args.category} ({len(images)} test images of {size} px):\n\n" + table(rows)
    print(text)
    (args.out / "table.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
