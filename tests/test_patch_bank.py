"""The patch bank: a bounded uniform sample of training patches, nearest-neighbour distances, the gate's choice."""

from __future__ import annotations

import pytest
import torch

from anomalib_cfa_ncl import FocusDistModel
from anomalib_cfa_ncl.models.focusdist import gate
from anomalib_cfa_ncl.models.focusdist.checkpoint import upgrade_checkpoint
from anomalib_cfa_ncl.models.focusdist.patch_bank import PatchBank

SIZE = 64


def _numbered_patches(batches: int, per_batch: int = 4, grid: int = 4) -> list[torch.Tensor]:
    """Batches ``(B, 1, g, g)`` whose patches hold their own running number: a sampled patch says where it came from."""
    count = per_batch * grid * grid
    return [
        torch.arange(index * count, (index + 1) * count, dtype=torch.float32)
        .view(per_batch, grid, grid, 1)
        .permute(0, 3, 1, 2)
        for index in range(batches)
    ]


def _sampled(batches: list[torch.Tensor], size: int) -> torch.Tensor:
    bank = PatchBank(size)
    for batch in batches:
        bank.update(batch)
    bank.finalize()
    return bank.bank[:, 0]


def test_bank_is_a_bounded_uniform_sample_of_every_batch() -> None:
    batches = _numbered_patches(50)  # 3,200 patches
    numbers = _sampled(batches, 256)
    assert numbers.shape == (256,) and numbers.unique().numel() == 256  # real patches, each once
    assert bool((numbers == numbers.round()).all()) and int(numbers.min()) >= 0 and int(numbers.max()) < 3200
    # uniform over the stream, not the first or the last batches: each fifth of the patches holds about a fifth
    fifths = torch.bincount((numbers // 640).long(), minlength=5)
    assert int(fifths.min()) >= 30, fifths
    torch.testing.assert_close(numbers, _sampled(batches, 256))  # seeded: the same sample every fit
    assert _sampled(batches[:1], 256).shape == (64,)  # fewer patches than the size: all of them


def _bank_and_query(size: int, side: int, seed: int) -> tuple[PatchBank, torch.Tensor, torch.Tensor]:
    """A bank of ``size`` random patches, a query ``(3, 8, side, side)`` and its nearest distances by cdist."""
    generator = torch.Generator().manual_seed(seed)
    bank = PatchBank(size)
    bank.update(torch.randn(4, 8, side, side, generator=generator))
    bank.finalize()
    embedding = torch.randn(3, 8, side, side, generator=generator)
    patches = embedding.permute(0, 2, 3, 1).reshape(3, side * side, 8)
    expected = torch.cdist(patches, bank.bank[None].expand(3, -1, -1)).amin(dim=2).view(3, side, side)
    return bank, embedding, expected


def test_distance_is_each_locations_nearest_bank_patch_divided_by_its_scale() -> None:
    bank, embedding, expected = _bank_and_query(size=32, side=3, seed=0)
    torch.testing.assert_close(bank.distance(embedding), expected, atol=1e-4, rtol=1e-4)
    member = bank.bank[5].view(1, 8, 1, 1).expand(1, 8, 3, 3)
    assert float(bank.distance(member).max()) < 1e-2  # a bank patch is its own nearest neighbour
    scale = torch.linspace(0.5, 2.0, 9)
    bank.calibrate(scale)
    torch.testing.assert_close(bank.distance(embedding), expected / scale.view(1, 3, 3), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="one scale per fitted location"):
        bank.calibrate(torch.ones(4))
    with pytest.raises(ValueError, match="positive"):
        bank.calibrate(torch.zeros(9))
    with pytest.raises(ValueError, match="build the bank first"):
        PatchBank(8).calibrate(torch.ones(9))


def test_a_bank_of_several_chunks_gives_the_nearest_patch_of_all(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("anomalib_cfa_ncl.models.focusdist.patch_bank.CHUNK", 100)  # 250 patches: 3 chunks
    bank, embedding, expected = _bank_and_query(size=250, side=10, seed=1)
    assert bank.bank.shape[0] == 250
    torch.testing.assert_close(bank.distance(embedding), expected, atol=1e-4, rtol=1e-4)


def test_a_negative_size_is_refused() -> None:
    with pytest.raises(ValueError, match="0 turns the bank off"):
        FocusDistModel(backbone="resnet18", pre_trained=False, patch_bank=-1)


def _textures(count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, 3, SIZE, SIZE, generator=generator)


def _model(patch_bank: int) -> FocusDistModel:
    torch.manual_seed(0)
    return FocusDistModel(
        backbone="resnet18", pre_trained=False, image_alignment=False, n_features=32, patch_bank=patch_bank
    )


def test_the_gate_keeps_the_bank_only_where_it_separates_better(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bank replaces the chosen Gaussian only where its held-back separation wins in 95 % of the resamples."""
    decisions = {}
    original = gate._decide_patch_bank
    for name, gaussian_separation in (("gaussian perfect", 2.0), ("gaussian at chance", 0.0)):
        model = _model(patch_bank=64)

        def decide(model, scored, bank, frame, pooled, gaussian, value=gaussian_separation):
            return original(model, scored, bank, frame, pooled, torch.full_like(gaussian, value))

        monkeypatch.setattr(gate, "_decide_patch_bank", decide)
        model.fit_statistics([_textures(20, seed=1)])
        decisions[name] = model.patch_bank.is_fitted
    assert decisions == {"gaussian perfect": False, "gaussian at chance": True}


def test_a_chosen_bank_is_built_on_all_images_scores_evaluation_and_survives_a_checkpoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(gate, "_share_better", lambda candidate, simpler: 1.0)  # every less simple choice wins
    model = _model(patch_bank=256).eval()
    model.fit_statistics([_textures(20, seed=1)])
    assert model.patch_bank.bank.shape == (256, 32)  # the final bank: sampled from all 20 images, not the gate's 16
    scale = model.patch_bank.location_scale
    assert scale.shape == (64,) and not bool((scale == 1).all())  # calibrated by the held-back images
    test_images = _textures(3, seed=2)
    with torch.no_grad():
        output = model(test_images)
        embedding, theta = model.embed(test_images)
        expected = model.anomaly_map_generator(model.patch_bank.distance(embedding), theta, test_images.shape[-2:])
    torch.testing.assert_close(output.anomaly_map, expected)

    reloaded = _model(patch_bank=256).eval()
    reloaded.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(test_images).anomaly_map, output.anomaly_map)

    # a checkpoint written before the bank existed scores with its Gaussian
    state = {f"model.{key}": value for key, value in model.state_dict().items() if "patch_bank" not in key}
    checkpoint = {"state_dict": state}
    upgrade_checkpoint(checkpoint)
    old = _model(patch_bank=256).eval()
    old.load_state_dict({key.removeprefix("model."): value for key, value in checkpoint["state_dict"].items()})
    assert not old.patch_bank.is_fitted
    with torch.no_grad():
        gaussian_map = model.anomaly_map_generator(model.gaussian.mahalanobis(embedding), theta, test_images.shape[-2:])
        torch.testing.assert_close(old(test_images).anomaly_map, gaussian_map)


def test_refitting_without_the_bank_empties_it(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(patch_bank=64)
    monkeypatch.setattr(gate, "_share_better", lambda candidate, simpler: 1.0)
    model.fit_statistics([_textures(20, seed=1)])
    assert model.patch_bank.is_fitted
    monkeypatch.setattr(gate, "_share_better", lambda candidate, simpler: 0.0)
    model.fit_statistics([_textures(20, seed=1)])
    assert not model.patch_bank.is_fitted
