"""Run an exported FocusDist OpenVINO IR on an inspection machine that has only ``openvino`` and ``numpy``.

The IR holds the whole pipeline (resize, normalisation, alignment, backbone, Gaussian scoring, inverse warp,
blur, score normalisation, thresholds), so a raw RGB image goes in and the score, label, anomaly map and mask
come out. Nothing of torch, anomalib or this package is needed at inference time.

Images are read without an image library from ``.npy`` files (``(H, W, 3)`` RGB, ``uint8`` or float in
``[0, 1]``) and binary PPM files (``P6``, 8 bit; written by most camera SDKs, ImageMagick's ``convert`` and
OpenCV). PNG, JPEG and other formats are read only if Pillow happens to be installed.

Usage:
    python edge_inference.py exported/weights/openvino/model.xml part_001.ppm part_002.npy --out maps/

Each image gives one JSON line: ``score`` (normalised, 0.5 is the threshold), ``label`` (``true`` = anomalous)
and ``anomalous_fraction`` (share of mask pixels). With ``--out``, the anomaly map (``.npy``, float32) and the
mask and map as PGM pictures are written, resized to the image's own size so they overlay its pixels. They are
named by the image's path below the folder all images share (``good/000.ppm`` -> ``good/000_map.npy``), so
``good/000`` and ``scratch/000`` do not overwrite each other; files of an earlier run are replaced only with
``--overwrite``.

A missing model or image file, or two images that would write the same output, stop the run before anything
is computed, with one line that says what to do. An image that cannot be used (NaN or infinite pixels, an
unreadable format) is skipped with one line naming the file; the others are still scored, and the exit status
is 1.

``--precision f32`` (the default here) makes OpenVINO compute in float32, matching the PyTorch model to about
1e-6. ``--precision default`` lets the CPU plugin choose: on CPUs with bfloat16 units (AVX512-BF16, AMX) that
is bfloat16, faster but with map differences of the order of 1e-2 (see the project README).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import openvino as ov

OUTPUTS = ("pred_score", "pred_label", "anomaly_map", "pred_mask")
OUTPUT_SUFFIXES = ("_map.npy", "_map.pgm", "_mask.pgm")


def load_model(path: str | Path, device: str = "CPU", precision: str = "f32") -> ov.CompiledModel:
    """Read and compile an IR (``model.xml`` next to its ``model.bin``).

    Args:
        path (str | Path): The ``.xml`` file.
        device (str): OpenVINO device, e.g. ``"CPU"``, ``"GPU"`` or ``"AUTO"``.
        precision (str): ``"f32"`` for float32 inference, ``"default"`` for the device's default precision.

    Returns:
        ov.CompiledModel: The model, ready for :func:`predict`.

    """
    config = {} if precision == "default" else {"INFERENCE_PRECISION_HINT": precision}
    return ov.Core().compile_model(str(path), device, config)


def _read_ppm(path: Path) -> np.ndarray:
    """Read a binary 8-bit PPM (``P6``) file as ``(H, W, 3)`` uint8."""
    data = path.read_bytes()
    fields: list[bytes] = []
    position = 0
    while len(fields) < 4:  # magic, width, height, maxval, separated by whitespace, with '#' comments
        while data[position : position + 1].isspace():
            position += 1
        if data[position : position + 1] == b"#":
            position = data.index(b"\n", position) + 1
            continue
        end = position
        while not data[end : end + 1].isspace():
            end += 1
        fields.append(data[position:end])
        position = end
    magic, width, height, maxval = fields[0], int(fields[1]), int(fields[2]), int(fields[3])
    if magic != b"P6" or maxval != 255:
        msg = f"{path} is not a binary 8-bit colour PPM (P6, maxval 255): convert it, e.g. `convert in.png out.ppm`."
        raise ValueError(msg)
    pixels = np.frombuffer(data, dtype=np.uint8, count=width * height * 3, offset=position + 1)
    return pixels.reshape(height, width, 3)


def read_image(path: str | Path) -> np.ndarray:
    """Read an RGB image as float32 ``(H, W, 3)`` in ``[0, 1]``.

    Args:
        path (str | Path): A ``.npy`` or ``.ppm`` file (any format if Pillow is installed).

    Returns:
        np.ndarray: The image.

    Raises:
        ValueError: If the file is not an RGB image this function can read, or has NaN or infinite values.

    """
    path = Path(path)
    if path.suffix.lower() == ".npy":
        image = np.load(path)
    elif path.suffix.lower() == ".ppm":
        image = _read_ppm(path)
    else:
        try:
            from PIL import Image
        except ImportError:
            msg = f"{path}: only .npy and .ppm images are read without Pillow; convert it or `pip install pillow`."
            raise ValueError(msg) from None
        image = np.asarray(Image.open(path).convert("RGB"))
    if image.ndim != 3 or image.shape[-1] != 3:
        msg = f"{path}: expected an RGB image of shape (H, W, 3), got {image.shape}."
        raise ValueError(msg)
    image = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
    bad = int(np.count_nonzero(~np.isfinite(image)))
    if bad:
        msg = f"{path}: {bad} NaN or infinite pixel value(s): not scored (fix its source file)."
        raise ValueError(msg)
    return image


def predict(model: ov.CompiledModel, image: np.ndarray) -> dict[str, np.ndarray]:
    """Run the IR on one raw image.

    Args:
        model (ov.CompiledModel): From :func:`load_model`.
        image (np.ndarray): RGB float32 ``(H, W, 3)`` in ``[0, 1]``, any size for an IR exported with a dynamic
            input size, the export's size otherwise.

    Returns:
        dict[str, np.ndarray]: ``pred_score`` ``(1,)``, ``pred_label`` ``(1,)``, ``anomaly_map`` and
        ``pred_mask`` ``(1, 1, h, w)`` at the model's input size.

    Raises:
        ValueError: If a static IR gets an image of another size.

    """
    expected = model.input(0).get_partial_shape()
    height, width = image.shape[:2]
    if expected[2].is_static and (expected[2].get_length(), expected[3].get_length()) != (height, width):
        msg = (
            f"This IR takes {expected[2].get_length()}x{expected[3].get_length()} images only, got {height}x{width}: "
            "resize the image, or export with a dynamic input size (input_size=None) to resize inside the model."
        )
        raise ValueError(msg)
    batch = np.ascontiguousarray(image.transpose(2, 0, 1)[None])
    result = model(batch)
    return {output.any_name: result[output] for output in model.outputs if output.any_name in OUTPUTS}


def resize_nearest(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a 2-D array to ``size`` by nearest-neighbour sampling (pixel centres)."""
    rows = ((np.arange(size[0]) + 0.5) * array.shape[0] / size[0]).astype(int)
    cols = ((np.arange(size[1]) + 0.5) * array.shape[1] / size[1]).astype(int)
    return array[np.ix_(rows, cols)]


def write_pgm(path: Path, array: np.ndarray) -> None:
    """Write a 2-D array in ``[0, 1]`` as an 8-bit greyscale PGM picture."""
    pixels = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    path.write_bytes(f"P5 {pixels.shape[1]} {pixels.shape[0]} 255\n".encode() + pixels.tobytes())


def output_names(images: list[Path]) -> dict[Path, Path]:
    """Name each image's outputs by its path below the folder all images share, without the suffix.

    ``test/good/000.png`` and ``test/scratch/000.png`` give ``good/000`` and ``scratch/000``; a single image
    gives its stem.

    Args:
        images (list[Path]): The image files.

    Returns:
        dict[Path, Path]: For each image, the relative name its outputs start with.

    """
    folders = [path.resolve().parent for path in images]
    common = Path(os.path.commonpath(folders)) if folders else Path()
    return {path: path.resolve().relative_to(common).with_suffix("") for path in images}


def check_inputs(model: Path, images: list[Path], out: Path | None, overwrite: bool) -> dict[Path, Path]:
    """Check every file before any work; return the output names (see :func:`output_names`).

    Raises:
        SystemExit: With one line that says what to do, if the model or an image is missing, two images would
            write the same outputs, or the outputs exist already and ``overwrite`` is off.

    """
    if not model.is_file():
        raise SystemExit(
            f"error: model file {model} not found: export the model first (`anomalib export ... --export_root "
            "exported` writes exported/weights/openvino/model.xml) or give the path of its model.xml."
        )
    if model.suffix == ".xml" and not model.with_suffix(".bin").is_file():
        raise SystemExit(f"error: {model.with_suffix('.bin')} not found: copy it together with {model.name}.")
    missing = [str(path) for path in images if not path.is_file()]
    if missing:
        raise SystemExit(f"error: image file(s) not found: {', '.join(missing)}.")
    names = output_names(images)
    if out is None:
        return names
    seen: dict[Path, Path] = {}
    for path, name in names.items():
        if name in seen:
            raise SystemExit(
                f"error: {seen[name]} and {path} would both write {out / name}{OUTPUT_SUFFIXES[0]}: rename one "
                "of them or score them in separate runs with different --out folders."
            )
        seen[name] = path
    if not overwrite:
        existing = [out / f"{name}{suffix}" for name in names.values() for suffix in OUTPUT_SUFFIXES]
        existing = [path for path in existing if path.exists()]
        if existing:
            raise SystemExit(
                f"error: {existing[0]} exists already ({len(existing)} output files of an earlier run): choose "
                "another --out folder, or pass --overwrite to replace them."
            )
    return names


def save_outputs(out: Path, name: Path, prediction: dict[str, np.ndarray], size: tuple[int, int]) -> None:
    """Write the map (``.npy`` and PGM) and the mask (PGM) at the image's own size, as ``out/name_*``."""
    base = out / name
    base.parent.mkdir(parents=True, exist_ok=True)
    anomaly_map = resize_nearest(prediction["anomaly_map"][0, 0], size)
    np.save(f"{base}_map.npy", anomaly_map)
    write_pgm(Path(f"{base}_map.pgm"), anomaly_map)
    if "pred_mask" in prediction:
        write_pgm(Path(f"{base}_mask.pgm"), resize_nearest(prediction["pred_mask"][0, 0].astype(np.float32), size))


def main(argv: list[str] | None = None) -> int:
    """Score every image given on the command line and print one JSON line per image.

    Returns:
        int: The exit status: 0 if every image was scored, 1 if some were skipped.

    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="model.xml of the exported IR")
    parser.add_argument("images", type=Path, nargs="+", help=".npy or .ppm images (other formats with Pillow)")
    parser.add_argument("--device", default="CPU")
    parser.add_argument("--precision", default="f32", choices=["f32", "default"])
    parser.add_argument("--out", type=Path, default=None, help="folder for the maps and masks")
    parser.add_argument("--overwrite", action="store_true", help="replace outputs of an earlier run in --out")
    args = parser.parse_args(argv)
    names = check_inputs(args.model, args.images, args.out, args.overwrite)
    model = load_model(args.model, args.device, args.precision)
    skipped = 0
    for path in args.images:
        try:
            image = read_image(path)
            prediction = predict(model, image)
        except (ValueError, OSError) as error:  # OSError: a file Pillow cannot read
            named = str(error) if str(path) in str(error) else f"{path}: {error}"
            print(f"error: {named}", file=sys.stderr, flush=True)
            skipped += 1
            continue
        mask = prediction.get("pred_mask")
        record = {
            "image": str(path),
            "score": round(float(prediction["pred_score"].ravel()[0]), 6),
            "label": bool(prediction["pred_label"].ravel()[0]) if "pred_label" in prediction else None,
            "anomalous_fraction": round(float(mask.mean()), 6) if mask is not None else None,
        }
        print(json.dumps(record), flush=True)
        if args.out is not None:
            save_outputs(args.out, names[path], prediction, image.shape[:2])
    return 1 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
