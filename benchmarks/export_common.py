"""Shared pieces of the export benchmarks (``export_parity.py``, ``speed.py``): data, training, export, runtimes.

Every exported variant takes what an edge inspector feeds it: a raw RGB image as float32 ``(B, 3, H, W)`` in
``[0, 1]``; pre-processing, model and post-processing all run inside the exported graph.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from anomalib.data import MVTecAD
from anomalib.deploy import CompressionType, ExportType
from anomalib.engine import Engine
from anomalib.models import AnomalibModule
from lightning.pytorch import seed_everything

ONNX_KWARGS = {"opset_version": 18}
F32 = {"INFERENCE_PRECISION_HINT": "f32"}


@dataclass
class Variant:
    """One exported form of a model: how it is exported and how OpenVINO compiles it."""

    name: str
    export_type: ExportType
    compression: CompressionType | None = None
    input_size: tuple[int, int] | None = None
    precision: str | None = "f32"  # INFERENCE_PRECISION_HINT; None: OpenVINO's default for the device

    @property
    def folder(self) -> str:
        """Export folder name; variants that differ only in ``precision`` share one exported file."""
        size = "dynamic" if self.input_size is None else f"{self.input_size[0]}x{self.input_size[1]}"
        compression = self.compression.value.lower() if self.compression else "fp32"
        return f"{self.export_type.value}_{compression}_{size}"

    @property
    def config(self) -> dict[str, str]:
        """OpenVINO compile configuration."""
        return {"INFERENCE_PRECISION_HINT": self.precision} if self.precision else {}


def quiet() -> None:
    """Silence Lightning's and the exporters' progress output."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for name in ("lightning.pytorch", "lightning.fabric", "anomalib", "nncf", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.ERROR)


def argument_parser(description: str, out: str) -> argparse.ArgumentParser:
    """Parser with the arguments both benchmarks take: data, category, weights, seed, output folder."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="MVTec-format dataset root")
    parser.add_argument("--category", default="coffee_pose")
    parser.add_argument("--backbone-weights", default=None, help="local weights file for FocusDist's backbone")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(out))
    return parser


def parse(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse and check the arguments, silence the libraries and create the output folder."""
    args = parser.parse_args()
    if not (args.root / args.category).is_dir():
        parser.error(f"{args.root / args.category} is not a folder: pass an MVTec-format root and a category of it.")
    quiet()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def test_and_calibration_data(args: argparse.Namespace) -> tuple[MVTecAD, MVTecAD]:
    """The category, and the same category whose validation images (INT8 calibration) are normal training images."""
    data = datamodule(args.root, args.category, args.seed)
    calibration = datamodule(args.root, args.category, args.seed, val_split_mode="from_train", val_split_ratio=0.5)
    return data, calibration


def datamodule(root: Path, category: str, seed: int, **kwargs: Any) -> MVTecAD:
    """The MVTec-format category, set up, with raw images (all pre-processing is the model's)."""
    data = MVTecAD(
        root=root, category=category, train_batch_size=16, eval_batch_size=32, num_workers=0, seed=seed, **kwargs
    )
    data.setup()
    return data


def quiet_engine(out: Path, epochs: int | None = None, accelerator: str = "cpu", **kwargs: Any) -> Engine:
    """An anomalib Engine on one device (the CPU unless told), without logger or progress bar.

    Args:
        out: Its ``default_root_dir``.
        epochs: ``max_epochs``; the model's own default when ``None``.
        accelerator: Lightning accelerator, ``"cpu"`` or ``"gpu"``.
        **kwargs: Further ``Engine`` arguments (``precision``, ``callbacks``, ...).
    """
    if epochs:
        kwargs["max_epochs"] = epochs
    return Engine(
        accelerator=accelerator, devices=1, logger=False, default_root_dir=out, enable_progress_bar=False, **kwargs
    )


def train(model: AnomalibModule, data: MVTecAD, out: Path, epochs: int | None) -> tuple[Engine, Path]:
    """Fit ``model`` on CPU; return the engine and the checkpoint it wrote."""
    engine = quiet_engine(out, epochs)
    engine.fit(model=model, datamodule=data)
    return engine, Path(engine.trainer.checkpoint_callback.best_model_path)


def load(model_class: type[AnomalibModule], checkpoint: Path) -> AnomalibModule:
    """The PyTorch model from the checkpoint, on CPU, in evaluation mode."""
    return model_class.load_from_checkpoint(checkpoint, map_location="cpu").eval()


def export(
    engine: Engine,
    model: AnomalibModule,
    checkpoint: Path,
    variant: Variant,
    out: Path,
    calibration: MVTecAD | None = None,
) -> Path:
    """Export from the checkpoint the way a user would, with ``Engine.export`` (which reloads ``checkpoint``)."""
    return engine.export(
        model=model,
        export_type=variant.export_type,
        export_root=out / variant.folder,
        input_size=variant.input_size,
        compression_type=variant.compression,
        datamodule=calibration,
        onnx_kwargs=None if variant.export_type == ExportType.TORCH else ONNX_KWARGS,
        ckpt_path=checkpoint,
    )


def compile_openvino(path: Path, config: dict[str, str], threads: int | None = None) -> Any:
    """Compile an IR for the CPU; returns the compiled model (callable on ``{input: array}``)."""
    import openvino as ov

    config = dict(config)
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return ov.Core().compile_model(str(path), "CPU", config)


def onnx_session(path: Path, threads: int) -> Any:
    """An ONNX Runtime CPU session, or ``None`` when onnxruntime is not installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def torch_runner(model: AnomalibModule) -> Any:
    """Callable running the whole PyTorch module (pre-processing, model, post-processing) on an array."""

    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            output = model(torch.from_numpy(images))
        return {key: value.numpy() for key, value in output._asdict().items() if value is not None}

    return run


def openvino_runner(compiled: Any) -> Any:
    """Callable running a compiled OpenVINO model on an array, outputs by name."""

    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        result = compiled(images)
        return {output.any_name: result[output] for output in compiled.outputs}

    return run


def onnx_runner(session: Any) -> Any:
    """Callable running an ONNX Runtime session on an array, outputs by name."""
    name = session.get_inputs()[0].name
    outputs = [output.name for output in session.get_outputs()]

    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(outputs, session.run(outputs, {name: images}), strict=True))

    return run


@contextlib.contextmanager
def working_directory(path: Path) -> Any:
    """Run inside ``path`` (``OpenVINOInferencer`` writes its compile cache into the working directory)."""
    path.mkdir(parents=True, exist_ok=True)
    with contextlib.chdir(path):
        yield


def seed(value: int) -> None:
    """Seed Python, NumPy and torch."""
    seed_everything(value, workers=True, verbose=False)
