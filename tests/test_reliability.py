"""Reliability: bad input gets a one-line error that says the fix, scores stay finite, runs reproduce."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from lightning.pytorch import seed_everything
from safetensors.torch import save_file

from anomalib_cfa_ncl import FocusDist, FocusDistModel

from .helpers import tiny_datamodule, tiny_engine, tiny_model


@pytest.fixture(scope="module")
def fitted_model() -> FocusDistModel:
    """A FocusDistModel fitted on random images (no training needed for input checks)."""
    torch.manual_seed(0)
    model = FocusDistModel(backbone="resnet18", pre_trained=False, n_features=32)
    model.fit_statistics([torch.randn(4, 3, 64, 64)])
    return model.eval()


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("channels", [1, 4])
def test_grayscale_and_rgba_batches_say_convert_to_rgb(fitted_model: FocusDistModel, channels: int) -> None:
    with pytest.raises(ValueError, match="convert grayscale or RGBA") as error:
        fitted_model(torch.rand(1, channels, 64, 64))
    _one_line(error)


def test_too_small_images_say_the_minimum_size(fitted_model: FocusDistModel) -> None:
    with pytest.raises(ValueError, match="at least 16x16") as error:
        fitted_model(torch.rand(1, 3, 8, 8))
    _one_line(error)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_image_scores_as_anomalous_alone(fitted_model: FocusDistModel, value: float) -> None:
    """Evaluation: the broken image scores +inf over its whole map; the clean one beside it scores as alone."""
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        alone = fitted_model(images[:1])
        images[1, 0, 3, 3] = value
        output = fitted_model(images)
    torch.testing.assert_close(output.pred_score[:1], alone.pred_score)  # batched kernels differ by rounding only
    torch.testing.assert_close(output.anomaly_map[:1], alone.anomaly_map)
    assert output.pred_score[1] == float("inf") and (output.anomaly_map[1] == float("inf")).all()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_in_training_images_is_refused(value: float) -> None:
    model = FocusDistModel(backbone="resnet18", pre_trained=False, n_features=32)
    images = torch.rand(2, 3, 64, 64)
    images[1, 0, 3, 3] = value
    with pytest.raises(ValueError, match="NaN or Inf") as error:
        model.fit_statistics([images])
    _one_line(error)


def test_wrong_input_size_for_the_fitted_statistics(fitted_model: FocusDistModel) -> None:
    with pytest.raises(ValueError, match="training size") as error:
        fitted_model(torch.rand(1, 3, 128, 128))
    _one_line(error)


@pytest.mark.parametrize("scale", [1.0, 1e6, 1e30, -1e30, 3e38])
def test_scores_are_finite_for_any_finite_input(fitted_model: FocusDistModel, scale: float) -> None:
    with torch.no_grad():
        output = fitted_model(torch.rand(2, 3, 64, 64) * scale)
    assert torch.isfinite(output.pred_score).all()
    assert torch.isfinite(output.anomaly_map).all()


def test_near_constant_training_images_give_finite_scores() -> None:
    model = FocusDistModel(backbone="resnet18", pre_trained=False, n_features=32)
    model.fit_statistics([torch.full((3, 3, 64, 64), 0.5) + 1e-6 * torch.randn(3, 3, 64, 64)])
    with torch.no_grad():
        output = model.eval()(torch.rand(2, 3, 64, 64))
    assert torch.isfinite(output.pred_score).all()


def test_unknown_backbone_suggests_names() -> None:
    with pytest.raises(ValueError, match=r"Unknown backbone 'resnet181'.*resnet18") as error:
        FocusDist(backbone="resnet181", pre_trained=False)
    _one_line(error)


def test_wrong_layer_lists_the_valid_layers() -> None:
    with pytest.raises(ValueError, match=r"no feature layer 'layer9'.*layer1") as error:
        FocusDist(backbone="resnet18", layers=["layer1", "layer9"], pre_trained=False)
    _one_line(error)


def test_missing_backbone_weights_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist") as error:
        FocusDist(backbone="resnet18", backbone_weights=str(tmp_path / "nope.safetensors"))
    _one_line(error)


def test_backbone_weights_of_another_architecture(tmp_path: Path) -> None:
    path = tmp_path / "resnet34.safetensors"
    save_file(timm.create_model("resnet34", pretrained=False).state_dict(), str(path))
    with pytest.raises(ValueError, match="do not fit backbone 'resnet18'") as error:
        FocusDist(backbone="resnet18", backbone_weights=str(path))
    _one_line(error)


@pytest.mark.parametrize("content", [b"not a state dict", b"PK\x03\x04 truncated"], ids=["garbage", "truncated"])
def test_unreadable_backbone_weights_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="Could not read backbone_weights") as error:
        FocusDist(backbone="resnet18", backbone_weights=str(path))
    _one_line(error)


def test_local_backbone_weights_are_loaded(tmp_path: Path) -> None:
    reference = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = FocusDist(backbone="resnet18", backbone_weights=str(path))
    loaded = model.model.feature_extractor.state_dict()
    assert torch.equal(loaded["conv1.weight"], reference.state_dict()["conv1.weight"])


def test_unreachable_hub_names_backbone_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    create_model = timm.create_model

    def offline(*args, pretrained: bool = False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")
        return create_model(*args, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(RuntimeError, match="backbone_weights") as error:
        FocusDist(backbone="resnet18", pre_trained=True)
    _one_line(error)


def test_corrupted_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "broken.ckpt"
    path.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    with pytest.raises(ValueError, match="corrupted") as error:
        FocusDist.load_from_checkpoint(path)
    _one_line(error)


def test_checkpoint_of_another_model(tmp_path: Path, tiny_dataset_root: Path) -> None:
    from anomalib.models import Padim

    padim = Padim(backbone="resnet18", pre_trained=False, n_features=16)
    engine = tiny_engine(tmp_path)
    engine.fit(padim, datamodule=tiny_datamodule(tiny_dataset_root))
    path = tmp_path / "padim.ckpt"
    engine.trainer.save_checkpoint(path)
    with pytest.raises(ValueError, match="not a FocusDist checkpoint") as error:
        FocusDist.load_from_checkpoint(path)
    _one_line(error)
    with pytest.raises(ValueError, match="not a FocusDist checkpoint"):
        tiny_engine(tmp_path).test(tiny_model(), datamodule=tiny_datamodule(tiny_dataset_root), ckpt_path=str(path))


def _test_scores(root: Path, tmp_path: Path) -> torch.Tensor:
    seed_everything(0, workers=True)
    model = tiny_model()
    engine = tiny_engine(tmp_path, deterministic=True)
    datamodule = tiny_datamodule(root)
    engine.fit(model, datamodule=datamodule)
    predictions = engine.predict(model, datamodule=datamodule)
    return torch.cat([batch.pred_score for batch in predictions])


def test_seeded_trainings_give_identical_scores(tiny_dataset_root: Path, tmp_path: Path) -> None:
    first = _test_scores(tiny_dataset_root, tmp_path / "a")
    second = _test_scores(tiny_dataset_root, tmp_path / "b")
    assert torch.equal(first, second)


def _grayscale_16bit_copy(root: Path, target: Path) -> None:
    """Copy the tiny dataset with every image stored as 16-bit grayscale (a 12-bit camera's range)."""
    import cv2
    import numpy as np

    for path in root.rglob("*.png"):
        destination = target / path.relative_to(root)
        destination.parent.mkdir(parents=True, exist_ok=True)
        image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if "ground_truth" not in path.parts:
            image = (image.astype(np.uint16) * 16).astype(np.uint16)  # 0..4080, as from a 12-bit sensor
        cv2.imwrite(str(destination), image)


def test_16bit_images_are_refused_and_convert_without_clipping(tiny_dataset_root: Path, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from anomalib_cfa_ncl.data.convert import convert_dataset

    deep = tmp_path / "deep"
    _grayscale_16bit_copy(tiny_dataset_root, deep)
    with pytest.raises(ValueError, match="16-bit grayscale") as error:
        tiny_engine(tmp_path).fit(tiny_model(), datamodule=tiny_datamodule(deep))
    _one_line(error)

    converted = tmp_path / "converted"
    assert convert_dataset(deep, converted) == len(list(deep.rglob("*.png"))) - len(list(deep.rglob("*_mask.png")))
    sample = next((converted / "coffee" / "train" / "good").glob("*.png"))
    pixels = np.asarray(Image.open(sample))
    original = np.asarray(Image.open(deep / sample.relative_to(converted))).astype(float)
    assert pixels.ndim == 3 and pixels.dtype == np.uint8
    assert (pixels[..., 0] == 255).mean() < 0.2  # not clipped to white
    assert np.corrcoef(pixels[..., 0].ravel(), original.ravel())[0, 1] > 0.99
    with pytest.raises(FileExistsError):
        convert_dataset(deep, converted)


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_grayscale_and_rgba_files_are_read_as_rgb(tiny_dataset_root: Path, tmp_path: Path, mode: str) -> None:
    """anomalib's reader converts 8-bit grayscale and RGBA files to RGB; FocusDist accepts them."""
    from PIL import Image

    from anomalib_cfa_ncl.data.convert import check_image_files

    target = tmp_path / mode
    for path in tiny_dataset_root.rglob("*.png"):
        destination = target / path.relative_to(tiny_dataset_root)
        destination.parent.mkdir(parents=True, exist_ok=True)
        image = Image.open(path)
        (image if "ground_truth" in path.parts else image.convert(mode)).save(destination)
    check_image_files(target.rglob("*.png"))
    datamodule = tiny_datamodule(target)
    datamodule.setup()
    assert datamodule.train_data[0].image.shape[0] == 3


def test_empty_training_folder_says_where_to_put_images(tiny_dataset_root: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "empty"
    shutil.copytree(tiny_dataset_root, root)
    for image in (root / "coffee" / "train" / "good").iterdir():
        image.unlink()
    with pytest.raises(ValueError, match="training set is empty") as error:
        tiny_engine(tmp_path).fit(tiny_model(), datamodule=tiny_datamodule(root))
    assert str(root / "coffee" / "train" / "good") in _one_line(error)
    assert len(list((root / "coffee" / "test").rglob("*.png"))) > 0  # nothing of the user's data was touched


def test_one_image_training_set_gives_finite_scores(tiny_dataset_root: Path, tmp_path: Path) -> None:
    """A single normal image: the ridge keeps every covariance invertible and the scores finite."""
    import shutil

    root = tmp_path / "one"
    shutil.copytree(tiny_dataset_root, root)
    for image in sorted((root / "coffee" / "train" / "good").iterdir())[1:]:
        image.unlink()
    model = tiny_model()
    engine = tiny_engine(tmp_path)
    engine.fit(model, datamodule=tiny_datamodule(root))
    predictions = engine.predict(model, datamodule=tiny_datamodule(root))
    scores = torch.cat([batch.pred_score for batch in predictions])
    assert torch.isfinite(scores).all()
    assert torch.isfinite(torch.cat([batch.anomaly_map for batch in predictions])).all()
