"""FocusDist torch model and anomalib wrapper: scoring geometry, checkpoints, errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from skimage import data as skimage_data

from anomalib_cfa_ncl import FocusDist, FocusDistModel
from anomalib_cfa_ncl.models.focusdist.alignment import warp
from anomalib_cfa_ncl.models.focusdist.checkpoint import CALIBRATION_KEY, POOLING_KEY
from anomalib_cfa_ncl.models.focusdist.lightning_model import pixel_normalization

from .helpers import tiny_datamodule, tiny_engine, tiny_model


def _photo(size: int) -> torch.Tensor:
    photo = torch.from_numpy(skimage_data.camera().astype(np.float32) / 255.0)[None, None]
    return F.interpolate(photo, size=(size, size), mode="area").expand(1, 3, size, size).clone()


def test_defect_scores_highest_where_it_is_in_the_input() -> None:
    """With a non-trivial image alignment, the map must be warped back to the input's pixels."""
    torch.manual_seed(0)
    size = 128
    switches = {"feature_alignment": False, "ncl": False, "image_alignment_gate": False}  # always aligned
    model = FocusDistModel(backbone="resnet18", pre_trained=False, n_features=None, **switches)
    with torch.no_grad():  # a fixed, clearly non-identity alignment: rotation and a large shift
        model.image_transformer.head.bias.copy_(torch.tensor([0.5, 0.3, 0.8, -0.6]))
    model.eval()
    normal = _photo(size).expand(16, -1, -1, -1) + 0.02 * torch.randn(16, 3, size, size)
    with torch.no_grad():
        model.fit_statistics([normal])
        theta = model.align_images(normal[:1])[1]
        assert (theta - torch.eye(2, 3)).abs().max() > 0.2
        defective = _photo(size).clone()
        top, left = 24, 84
        defective[:, :, top : top + 12, left : left + 12] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
        anomaly_map = model(defective).anomaly_map[0, 0]
    row, col = divmod(int(anomaly_map.argmax()), size)
    assert abs(row - (top + 6)) <= 10
    assert abs(col - (left + 6)) <= 10


def test_identity_alignment_maps_match_an_unaligned_model() -> None:
    """At initialisation all transformers are the identity, so the map needs no warp at all."""
    images = torch.rand(2, 3, 64, 64)
    base = warp(images, torch.eye(2, 3).expand(2, 2, 3))
    assert torch.allclose(base, images, atol=1e-4)  # float32 rounding of the sampling positions


@pytest.mark.parametrize("stages", [{}, {"feature_alignment": True, "ncl": True}], ids=["default", "all three stages"])
def test_fit_then_reload_from_checkpoint_gives_identical_scores(stages, tiny_dataset_root, tmp_path) -> None:
    torch.manual_seed(0)
    model = tiny_model(backbone_lr=1e-3, **stages)
    before = [parameter.detach().clone() for parameter in model.model.feature_extractor.parameters()]
    datamodule = tiny_datamodule(tiny_dataset_root)
    engine = tiny_engine(tmp_path)
    engine.fit(model, datamodule=datamodule)
    after = list(model.model.feature_extractor.parameters())
    fine_tuned = any(not torch.equal(old, new) for old, new in zip(before, after, strict=True))
    assert fine_tuned == bool(stages)  # only NCL changes the backbone
    checkpoint = tmp_path / "focusdist.ckpt"
    engine.trainer.save_checkpoint(checkpoint)
    reloaded = FocusDist.load_from_checkpoint(checkpoint, map_location="cpu")  # weights_only=True, as anomalib does
    images = torch.rand(3, 3, 64, 64)
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        first, second = model(images), reloaded(images)
    assert torch.equal(first.pred_score, second.pred_score)
    assert torch.equal(first.anomaly_map, second.anomaly_map)
    if not stages:  # a 0.1.0 checkpoint has no distance calibration nor grid pooling: it scores as fitted
        assert not bool((model.model.gaussian.location_scale == 1).all())
        old = torch.load(checkpoint, weights_only=False)
        del old["state_dict"][CALIBRATION_KEY]
        del old["state_dict"][POOLING_KEY]
        del old["hyper_parameters"]["grid_pooling"]
        torch.save(old, tmp_path / "old.ckpt")
        legacy = FocusDist.load_from_checkpoint(tmp_path / "old.ckpt", map_location="cpu").eval()
        assert not bool(legacy.model.grid_pooling.enabled)
        model.model.gaussian.location_scale.fill_(1.0)
        with torch.no_grad():
            assert torch.equal(legacy(images).anomaly_map, model(images).anomaly_map)


def test_unfitted_model_says_what_to_do() -> None:
    model = FocusDistModel(backbone="resnet18", pre_trained=False).eval()
    with pytest.raises(RuntimeError, match="train it"):
        model(torch.rand(1, 3, 64, 64))


def test_statistics_budget_at_256_pixels() -> None:
    model = FocusDistModel(backbone="resnet18", pre_trained=False).eval()
    model.fit_statistics([torch.rand(2, 3, 256, 256)])
    size = sum(buffer.numel() * buffer.element_size() for buffer in model.gaussian.buffers())
    assert size <= 64 * 2**20


def test_fit_statistics_streams_batches_and_restores_the_mode() -> None:
    """Uneven batches give the statistics of one batch; the gate decides before the Gaussian is fitted."""
    torch.manual_seed(0)
    images = torch.rand(6, 3, 64, 64)
    streamed = FocusDistModel(backbone="resnet18", pre_trained=False, n_features=32)
    whole = copy.deepcopy(streamed)
    streamed.fit_statistics(list(images.split(4)))
    whole.fit_statistics([images])
    assert streamed.training  # the mode it was called in
    assert torch.equal(streamed.alignment_gate.enabled, whole.alignment_gate.enabled)
    assert torch.isfinite(streamed.alignment_gate.separation).all()
    assert torch.allclose(streamed.gaussian.mean, whole.gaussian.mean, atol=1e-5)
    with pytest.raises(TypeError, match="not a generator"):
        streamed.fit_statistics(image[None] for image in images)


def test_switches_remove_their_modules() -> None:
    model = FocusDist(
        backbone="resnet18",
        pre_trained=False,
        image_alignment=False,
        feature_alignment=False,
        ncl=False,
    )
    assert model.model.image_transformer is None
    assert model.model.feature_transformers is None
    assert model.model.ncl_heads is None
    assert model.configure_optimizers() is None


def test_statistics_are_fitted_once_for_a_validation_after_the_last_epoch(tiny_dataset_root, tmp_path) -> None:
    """Validating every epoch would refit the gate and the Gaussian every epoch for scores nobody keeps."""
    model = tiny_model()
    fits = []
    fit_statistics = model.model.fit_statistics
    model.model.fit_statistics = lambda *args, **kwargs: (fits.append(args), fit_statistics(*args, **kwargs))
    engine = tiny_engine(tmp_path, max_epochs=3)
    engine.fit(model, datamodule=tiny_datamodule(tiny_dataset_root))
    assert len(fits) == 1
    assert engine.trainer.check_val_every_n_epoch == 3
    # the gate draws its synthetic defects in pixel values: it is given the pre-processor's normalisation
    mean, std = fits[0][2]
    assert torch.allclose(mean, torch.tensor([0.485, 0.456, 0.406])) and torch.allclose(
        std, torch.tensor([0.229, 0.224, 0.225])
    )


def test_the_normalisation_is_read_from_any_pre_processor_transform() -> None:
    from torchvision.transforms import v2

    assert pixel_normalization(None) is None
    assert pixel_normalization(v2.Compose([v2.Resize(64)])) is None  # images in pixel values
    transform = v2.Compose(
        [
            v2.Resize(64),
            v2.Normalize([0.2, 0.3, 0.4], [0.5, 0.6, 0.7]),
            v2.Compose([v2.Normalize([1.0, -1.0, 0.5], [2.0, 3.0, 4.0])]),
        ]
    )
    pixels = torch.rand(1, 3, 64, 64)
    mean, std = pixel_normalization(transform)
    assert torch.allclose(transform(pixels) * std.view(3, 1, 1) + mean.view(3, 1, 1), pixels, atol=1e-6)


def test_mixed_precision_training_runs_all_three_stages(tiny_dataset_root, tmp_path) -> None:
    """``--trainer.precision bf16-mixed`` (the CPU's mixed precision; GPUs also take 16-mixed) trains and scores."""
    model = tiny_model(feature_alignment=True, ncl=True)
    tiny_engine(tmp_path, precision="bf16-mixed").fit(model, datamodule=tiny_datamodule(tiny_dataset_root))
    model.eval()
    with torch.no_grad():
        output = model(torch.rand(2, 3, 64, 64))
    assert output.anomaly_map.dtype == torch.float32
    assert torch.isfinite(output.anomaly_map).all()
    assert torch.isfinite(output.pred_score).all()
