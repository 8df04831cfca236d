"""Export of FocusDist to OpenVINO: parity with PyTorch, precisions, input sizes, checkpoints, edge example.

The session's tiny FocusDist (64 px, untrained resnet18, 1 epoch; ``conftest.tiny_project``) is exported with
``Engine.export`` from its checkpoint, as a user would. The CPU plugin is told to compute in float32: its default on
CPUs with bfloat16 units is bfloat16, which is measured in ``benchmarks/export_parity.py``, not asserted here.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.deploy import CompressionType, OpenVINOInferencer
from anomalib.pre_processing import PreProcessor
from torchvision.transforms.v2 import Normalize

from anomalib_cfa_ncl import FocusDist
from anomalib_cfa_ncl.models.focusdist.checkpoint import BANK_KEYS, JOINT_KEY, POOLING_KEY, PROJECTION_KEYS
from anomalib_cfa_ncl.models.focusdist.gaussian import CPU_LOCATION_CHUNK

from .helpers import IMAGE_SIZE, export_ir, tiny_datamodule

ov = pytest.importorskip("openvino")

F32 = {"INFERENCE_PRECISION_HINT": "f32"}
PARITY_TOLERANCE = 1e-3  # normalised scores and maps, FP32 IR against PyTorch
THRESHOLD = 0.5  # the post-processor's normalised threshold
FP16_TOLERANCE = 1e-2  # FP16 weights: measured 1e-4 to 1e-3 on the tiny model
INT8_TOLERANCE = 0.1  # INT8 feature network: measured about 2e-2; whole-graph PTQ gave 0.8 (constant maps)
GATE_KEY = "model.alignment_gate.enabled"
EXAMPLE = Path(__file__).parents[1] / "examples" / "edge_inference.py"


@pytest.fixture(scope="module")
def checkpoint(tiny_project: tuple[Path, Path]) -> Path:
    """The checkpoint of the session's tiny model (``conftest.tiny_project``)."""
    return tiny_project[1]


@contextlib.contextmanager
def storages_tagged(location: str) -> Iterator[None]:
    """Make ``torch.save`` record every tensor storage at ``location`` (what a save on that device writes)."""
    original = torch.serialization.location_tag
    torch.serialization.location_tag = lambda storage: location
    try:
        yield
    finally:
        torch.serialization.location_tag = original


@pytest.fixture(scope="module")
def cuda_checkpoint(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same checkpoint as a GPU training machine writes it: every tensor tagged ``cuda:0``, and the backbone
    built from ImageNet weights in a local file that this machine does not have. Its gate chose the image
    alignment, the grid pooling and the patch bank joined to the Gaussian (the tiny model holds back too few images to
    choose anything), so that its export carries all of them: the bank holds the Gaussian's means, real feature
    vectors, on 8 of their directions (a projection), with a calibration scale per location, and both distances are
    weighted."""
    content = torch.load(checkpoint, map_location="cpu", weights_only=False)
    content["hyper_parameters"].update(
        pre_trained=True, backbone_weights="/training-machine/resnet18.safetensors", grid_pooling=5
    )
    state = content["state_dict"]
    state[POOLING_KEY] = torch.ones((), dtype=torch.bool)
    state[GATE_KEY] = torch.ones((), dtype=torch.bool)  # the image alignment kept: its graph warps the input
    means = state["model.gaussian.mean"].float()  # (locations, D)
    directions = torch.linalg.qr(torch.randn(means.shape[1], 8, generator=torch.Generator().manual_seed(0)))[0].T
    state[PROJECTION_KEYS[0]], state[PROJECTION_KEYS[1]] = directions, means.mean(dim=0)  # searched in 8 directions
    state[BANK_KEYS[0]] = (means - means.mean(dim=0)) @ directions.T
    state[BANK_KEYS[1]] = torch.linspace(0.8, 1.2, means.shape[0])
    state[JOINT_KEY] = torch.tensor([0.3, 2.0])
    path = tmp_path_factory.mktemp("cuda_checkpoint") / "model.ckpt"
    with storages_tagged("cuda:0"):
        torch.save(content, path)
    return path


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> FocusDist:
    """The PyTorch model from the same checkpoint."""
    return FocusDist.load_from_checkpoint(checkpoint, map_location="cpu").eval()


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenVINOInferencer writes an ``openvino_cache`` folder into the working directory."""
    monkeypatch.chdir(tmp_path)


def torch_predict(model: FocusDist, image: torch.Tensor) -> dict[str, np.ndarray]:
    with torch.no_grad():
        output = model(image.unsqueeze(0))
    return {key: value.numpy() for key, value in output._asdict().items() if value is not None}


def openvino_predict(inferencer: OpenVINOInferencer, image: torch.Tensor) -> dict[str, np.ndarray]:
    prediction = inferencer.predict(image)
    return {key: getattr(prediction, key) for key in ("pred_score", "pred_label", "anomaly_map", "pred_mask")}


def largest_differences(expected: list[dict], actual: list[dict]) -> tuple[float, float, int]:
    """Largest score and map differences, and the number of differing labels away from the threshold.

    anomalib's adaptive threshold is the score of one validation image, and the tiny datamodule validates on its
    test images, so one test image scores exactly the (normalised) threshold 0.5: its label may flip on a
    difference of 1e-7. Labels are compared where the reference score is farther than the tolerance from 0.5.
    """
    pairs = list(zip(expected, actual, strict=True))
    score = max(float(np.abs(e["pred_score"] - a["pred_score"]).max()) for e, a in pairs)
    maps = max(float(np.abs(e["anomaly_map"] - a["anomaly_map"]).max()) for e, a in pairs)
    labels = sum(
        int(e["pred_label"].item() != a["pred_label"].item())
        for e, a in pairs
        if abs(float(e["pred_score"].item()) - THRESHOLD) > PARITY_TOLERANCE
    )
    return score, maps, labels


def image_transformer_ops(ir: Path) -> list[str]:
    """Names of the IR's operations that the image transformer produced (the exporter names them by module)."""
    names = [op.get_friendly_name() for op in ov.Core().read_model(ir).get_ops()]
    return [name for name in names if "image_transformer" in name]


def grid_samples(ir: Path) -> int:
    """How many warps the IR runs (one ``GridSample`` each); a resize where nothing moves has none."""
    return sum(op.get_type_name() == "GridSample" for op in ov.Core().read_model(ir).get_ops())


def test_openvino_matches_pytorch(dynamic_ir: Path, reference: FocusDist, images: list[torch.Tensor]) -> None:
    # the gate chose the input frame (too few images to hold back): the graph holds no transformer and no image warp
    assert not bool(reference.model.alignment_gate.enabled)
    assert not image_transformer_ops(dynamic_ir)
    assert grid_samples(dynamic_ir) == 0  # no feature alignment either: the layers and the map are only resized
    inferencer = OpenVINOInferencer(dynamic_ir, device="CPU", config=F32)
    expected = [torch_predict(reference, image) for image in images]
    actual = [openvino_predict(inferencer, image) for image in images]
    assert {"pred_score", "pred_label", "anomaly_map", "pred_mask"} <= set(actual[0])
    assert actual[0]["anomaly_map"].shape == (1, 1, IMAGE_SIZE, IMAGE_SIZE)
    score, maps, labels = largest_differences(expected, actual)
    assert labels == 0
    assert score <= PARITY_TOLERANCE
    assert maps <= PARITY_TOLERANCE
    assert len({float(a["pred_score"][0]) for a in actual}) > 1  # the scores depend on the image


def test_dynamic_ir_resizes_raw_images_of_any_size(
    dynamic_ir: Path, reference: FocusDist, images: list[torch.Tensor]
) -> None:
    inferencer = OpenVINOInferencer(dynamic_ir, device="CPU", config=F32)
    raw = [F.interpolate(image[None], size=(80, 96), mode="bilinear")[0] for image in images[:3]]
    expected = [torch_predict(reference, image) for image in raw]
    actual = [openvino_predict(inferencer, image) for image in raw]
    assert actual[0]["anomaly_map"].shape == (1, 1, IMAGE_SIZE, IMAGE_SIZE)  # maps at the model's input size
    score, maps, labels = largest_differences(expected, actual)
    assert labels == 0
    assert score <= PARITY_TOLERANCE
    assert maps <= PARITY_TOLERANCE


def test_cuda_checkpoint_exports_static_ir_on_cpu(
    cuda_checkpoint: Path, checkpoint: Path, reference: FocusDist, images: list[torch.Tensor], tmp_path: Path
) -> None:
    if not torch.cuda.is_available():  # the checkpoint really claims CUDA: a plain load fails here
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(cuda_checkpoint, weights_only=False)
    static_ir = export_ir(cuda_checkpoint, tmp_path / "static", input_size=(IMAGE_SIZE, IMAGE_SIZE))
    assert image_transformer_ops(static_ir)  # the aligned frame: exported with its transformer
    assert grid_samples(static_ir) == 5  # the image, three layers to the scoring grid, the map back to the input
    shape = ov.Core().read_model(static_ir).input(0).get_partial_shape()
    assert shape[2].is_static and shape[3].is_static
    assert (shape[2].get_length(), shape[3].get_length()) == (IMAGE_SIZE, IMAGE_SIZE)
    static = OpenVINOInferencer(static_ir, device="CPU", config=F32)
    pooled = FocusDist.load_from_checkpoint(checkpoint, map_location="cpu", grid_pooling=5).eval()
    pooled.model.grid_pooling.enabled.fill_(True)
    with_bank = FocusDist.load_from_checkpoint(cuda_checkpoint, map_location="cpu").eval()
    assert with_bank.model.patch_bank.joins_gaussian and with_bank.model.grid_pooling.enabled
    assert with_bank.model.patch_bank.projection.shape[0] == 8
    assert with_bank.model.alignment_gate.enabled
    expected = [torch_predict(with_bank, image) for image in images]
    for other in (reference, pooled):  # the pooling and the bank change the maps, so the IR must carry both
        changed = [
            float(np.abs(e["anomaly_map"] - o["anomaly_map"]).max())
            for e, o in zip(expected, [torch_predict(other, image) for image in images], strict=True)
        ]
        assert max(changed) > 0.01
    score, maps, labels = largest_differences(expected, [openvino_predict(static, image) for image in images])
    assert labels == 0 and score <= PARITY_TOLERANCE and maps <= PARITY_TOLERANCE
    with pytest.raises(RuntimeError):  # a static IR refuses another size
        static.predict(F.interpolate(images[0][None], size=(80, 96), mode="bilinear")[0])


def test_fp16_ir_stays_close(
    checkpoint: Path, reference: FocusDist, images: list[torch.Tensor], tmp_path: Path, record_property
) -> None:
    fp16_ir = export_ir(checkpoint, tmp_path, compression_type=CompressionType.FP16)
    constants = [op for op in ov.Core().read_model(fp16_ir).get_ops() if op.get_type_name() == "Constant"]
    assert any(op.get_element_type() == ov.Type.f16 for op in constants)  # the weights really are FP16
    inferencer = OpenVINOInferencer(fp16_ir, device="CPU", config=F32)
    expected = [torch_predict(reference, image) for image in images]
    score, maps, _ = largest_differences(expected, [openvino_predict(inferencer, image) for image in images])
    record_property("fp16_max_score_diff", score)
    record_property("fp16_max_map_diff", maps)
    assert score <= FP16_TOLERANCE
    assert maps <= FP16_TOLERANCE


def test_int8_ptq_quantises_only_the_feature_network(
    checkpoint: Path,
    reference: FocusDist,
    images: list[torch.Tensor],
    tiny_dataset_root: Path,
    tmp_path: Path,
    record_property,
) -> None:
    int8_ir = export_ir(
        checkpoint,
        tmp_path,
        compression_type=CompressionType.INT8_PTQ,
        datamodule=tiny_datamodule(tiny_dataset_root),
    )
    quantised = [op for op in ov.Core().read_model(int8_ir).get_ops() if op.get_type_name() == "FakeQuantize"]
    consumers = {target.get_node().get_type_name() for op in quantised for target in op.output(0).get_target_inputs()}
    assert quantised, "INT8_PTQ quantised nothing"
    assert consumers <= {"Convolution", "GroupConvolution"}
    inferencer = OpenVINOInferencer(int8_ir, device="CPU", config=F32)
    expected = [torch_predict(reference, image) for image in images]
    actual = [openvino_predict(inferencer, image) for image in images]
    score, maps, labels = largest_differences(expected, actual)
    record_property("int8_max_score_diff", score)
    record_property("int8_max_map_diff", maps)
    record_property("int8_labels_differ", labels)
    assert maps <= INT8_TOLERANCE
    # no constant maps where PyTorch's vary (its normalised maps of clearly normal images may be all zero)
    varying = [float(e["anomaly_map"].std()) > 0 for e in expected]
    assert any(varying)
    assert all(float(a["anomaly_map"].std()) > 0 for a, v in zip(actual, varying, strict=True) if v)


def test_export_size_the_model_cannot_take_fails_in_one_line(checkpoint: Path, tmp_path: Path) -> None:
    model = FocusDist.load_from_checkpoint(checkpoint, map_location="cpu")
    model.pre_processor = PreProcessor(transform=Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]))
    with pytest.raises(ValueError, match=rf"input_size=\({IMAGE_SIZE}, {IMAGE_SIZE}\)") as static_error:
        model.to_onnx(tmp_path, input_size=(32, 32))
    with pytest.raises(ValueError, match="Resize") as dynamic_error:
        model.to_openvino(tmp_path)
    assert "\n" not in str(static_error.value)
    assert "\n" not in str(dynamic_error.value)
    assert not list(tmp_path.rglob("*.onnx"))  # refused before exporting


BLOCKER = textwrap.dedent(
    """
    import runpy, sys
    BLOCKED = {"torch", "anomalib", "anomalib_cfa_ncl", "lightning", "torchvision", "PIL", "cv2", "timm"}

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"edge example imported {name}")

    sys.meta_path.insert(0, Blocker())
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
    """
)


def run_example(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the edge example with torch, anomalib, Pillow and OpenCV blocked from import."""
    command = [sys.executable, "-c", BLOCKER, str(EXAMPLE), *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=120, check=False)


def to_pixels(image: torch.Tensor) -> np.ndarray:
    return (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def write_ppm(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"P6\n# camera\n64 64\n255\n" + pixels.tobytes())


def test_edge_example_needs_only_openvino_and_numpy(
    dynamic_ir: Path, images: list[torch.Tensor], tmp_path: Path
) -> None:
    pixels = to_pixels(images[0])
    np.save(tmp_path / "part.npy", pixels)
    write_ppm(tmp_path / "camera" / "part.ppm", pixels)
    result = run_example(str(dynamic_ir), "part.npy", "camera/part.ppm", "--out", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in result.stdout.splitlines()]
    expected = OpenVINOInferencer(dynamic_ir, device="CPU", config=F32).predict(pixels)
    assert [record["label"] for record in records] == [bool(expected.pred_label.item())] * 2
    for record in records:
        assert abs(record["score"] - float(expected.pred_score.item())) <= 1e-5
    for name in ("part", "camera/part"):
        assert np.load(tmp_path / "out" / f"{name}_map.npy").shape == (64, 64)
        assert (tmp_path / "out" / f"{name}_mask.pgm").read_bytes().startswith(b"P5 64 64 255\n")


def assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert result.stderr.startswith("error: ") and fragment in result.stderr, result.stderr


def test_edge_example_names_outputs_by_relative_path_and_never_overwrites(
    dynamic_ir: Path, images: list[torch.Tensor], tmp_path: Path
) -> None:
    """MVTec layout: ``good/000`` and ``scratch/000`` keep their own maps; a second run does not replace them."""
    write_ppm(tmp_path / "test" / "good" / "000.ppm", to_pixels(images[0]))
    write_ppm(tmp_path / "test" / "scratch" / "000.ppm", to_pixels(images[-1]))
    inputs = (str(dynamic_ir), "test/good/000.ppm", "test/scratch/000.ppm", "--out", "out")
    assert run_example(*inputs, cwd=tmp_path).returncode == 0
    good, scratch = (np.load(tmp_path / "out" / defect / "000_map.npy") for defect in ("good", "scratch"))
    assert not np.array_equal(good, scratch)
    assert_one_line_error(run_example(*inputs, cwd=tmp_path), "exists already")
    assert np.array_equal(np.load(tmp_path / "out" / "good" / "000_map.npy"), good)
    assert run_example(*inputs, "--overwrite", cwd=tmp_path).returncode == 0


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        (("exported/weights/openvino/model.xml", "part.npy"), "model file exported/weights/openvino/model.xml not"),
        (("IR", "part.npy", "missing.ppm"), "image file(s) not found: missing.ppm"),
        (("IR", "part.npy", "part.ppm", "--out", "out"), "part.npy and part.ppm would both write out/part_map.npy"),
    ],
    ids=["missing-model", "missing-image", "same-output"],
)
def test_edge_example_refuses_bad_files_in_one_line(
    arguments: tuple[str, ...], fragment: str, dynamic_ir: Path, tmp_path: Path
) -> None:
    (tmp_path / "part.npy").touch()
    (tmp_path / "part.ppm").touch()
    arguments = tuple(str(dynamic_ir) if argument == "IR" else argument for argument in arguments)
    result = run_example(*arguments, cwd=tmp_path)
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "out").exists()


def test_edge_example_skips_a_non_finite_image_in_one_line(
    dynamic_ir: Path, images: list[torch.Tensor], tmp_path: Path
) -> None:
    clean = images[0].permute(1, 2, 0).numpy()
    broken = clean.copy()
    broken[3, 5, 1] = np.nan
    np.save(tmp_path / "clean.npy", clean)
    np.save(tmp_path / "broken.npy", broken)
    result = run_example(str(dynamic_ir), "broken.npy", "clean.npy", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "error: broken.npy: 1 NaN or infinite pixel value(s): not scored (fix its source file)."
    )
    assert [json.loads(line)["image"] for line in result.stdout.splitlines()] == ["clean.npy"]


def test_exported_distances_convert_the_precision_matrices_once(dynamic_ir: Path, reference: FocusDist) -> None:
    # Eager CPU distances take the locations a few at a time (cheaper there); an export must hold one product.
    locations = reference.model.gaussian.precision.shape[0]
    assert locations > CPU_LOCATION_CHUNK  # else one chunk would look like one product
    model = ov.Core().read_model(dynamic_ir)
    matrices = [
        op for op in model.get_ops() if op.get_type_name() == "MatMul" and op.get_output_partial_shape(0).rank == 3
    ]
    precision_products = [op for op in matrices if op.get_output_partial_shape(0)[0] == locations]
    assert len(precision_products) == 1
