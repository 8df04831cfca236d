"""The patch bank: k-means centres of a bounded uniform sample of training patches, nearest-neighbour distances,
the gate's choice (instead of the Gaussian or joined to it)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from anomalib_cfa_ncl import FocusDistModel
from anomalib_cfa_ncl.models.focusdist import gate
from anomalib_cfa_ncl.models.focusdist.checkpoint import upgrade_checkpoint
from anomalib_cfa_ncl.models.focusdist.patch_bank import PatchBank, kmeans_centres, principal_directions

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


def _sampled(batches: list[torch.Tensor], size: int) -> PatchBank:
    """A bank of ``size`` centres that has seen ``batches``, not yet finalised: its sample is ``pool``."""
    bank = PatchBank(size)
    for batch in batches:
        bank.update(batch)
    return bank


def test_the_sample_is_bounded_and_uniform_over_every_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("anomalib_cfa_ncl.models.focusdist.patch_bank.POOL_PER_CENTRE", 4)
    batches = _numbered_patches(50)  # 3,200 patches
    numbers = _sampled(batches, 64).pool[:, 0]
    assert numbers.shape == (256,) and numbers.unique().numel() == 256  # 4 per centre: real patches, each once
    assert bool((numbers == numbers.round()).all()) and int(numbers.min()) >= 0 and int(numbers.max()) < 3200
    # uniform over the stream, not the first or the last batches: each fifth of the patches holds about a fifth
    fifths = torch.bincount((numbers // 640).long(), minlength=5)
    assert int(fifths.min()) >= 30, fifths
    torch.testing.assert_close(numbers, _sampled(batches, 64).pool[:, 0])  # seeded: the same sample every fit


def test_the_bank_holds_k_means_centres_of_the_sample() -> None:
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 8, 6, 6, generator=generator) for _ in range(10)]  # 1,440 patches
    bank = _sampled(batches, 32)
    pool, keys = bank.pool, bank.pool_keys
    assert pool is not None and keys is not None and pool.shape == (1024, 8)  # 32 patches per centre
    start = pool[keys.argsort()[:32]]
    bank.finalize()
    assert bank.bank.shape == (32, 8) and bank.pool is None  # the sample is let go
    torch.testing.assert_close(bank.bank, kmeans_centres(pool, start))

    def quantisation_error(centres: torch.Tensor) -> float:
        return float(torch.cdist(pool, centres).amin(dim=1).square().mean())

    assert quantisation_error(bank.bank) < 0.9 * quantisation_error(start)  # the centres fit the patches better
    few = _sampled(batches[:1], 256)  # 144 patches, fewer than the size: all of them, as they are
    expected = few.pool
    few.finalize()
    assert expected is not None and few.bank.shape == (144, 8)
    torch.testing.assert_close(few.bank[few.bank[:, 0].argsort()], expected[expected[:, 0].argsort()])


def test_k_means_moves_each_centre_to_the_mean_of_its_patches() -> None:
    patches = torch.tensor([[0.0, 0.0], [0.0, 2.0], [10.0, 0.0], [12.0, 0.0], [11.0, 3.0]])
    centres = kmeans_centres(patches, patches[[0, 2, 4]], iterations=1)
    torch.testing.assert_close(centres, torch.tensor([[0.0, 1.0], [11.0, 0.0], [11.0, 3.0]]))
    lonely = kmeans_centres(patches, torch.tensor([[0.0, 0.0], [100.0, 100.0]]))
    assert lonely[1].tolist() == [100.0, 100.0]  # a centre no patch is nearest to stays where it was


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


def test_the_bank_searches_on_the_samples_principal_directions(monkeypatch: pytest.MonkeyPatch) -> None:
    """Patches of more channels than ``DIMENSIONS`` are projected: the bank, its k-means and its search."""
    monkeypatch.setattr("anomalib_cfa_ncl.models.focusdist.patch_bank.DIMENSIONS", 3)
    generator = torch.Generator().manual_seed(0)
    spread = torch.tensor([5.0, 0.1, 4.0, 0.1, 0.1, 3.0, 0.1, 0.1]).view(1, 8, 1, 1)  # three channels carry it
    bank = _sampled([torch.randn(4, 8, 6, 6, generator=generator) * spread for _ in range(5)], 16)
    pool = bank.pool
    assert pool is not None
    bank.finalize()
    projection = bank.projection
    assert projection.shape == (3, 8) and bank.bank.shape == (16, 3)
    torch.testing.assert_close(projection @ projection.T, torch.eye(3), atol=1e-5, rtol=0)  # orthonormal rows
    assert set(projection.abs().argmax(dim=1).tolist()) == {0, 2, 5}  # the directions of largest variance
    assert float(projection[:, [1, 3, 4, 6, 7]].abs().max()) < 0.1
    torch.testing.assert_close(bank.patch_mean, pool.mean(dim=0))
    # the distance in all channels to the nearest centre lifted back onto the principal subspace through the mean
    lifted = bank.patch_mean + bank.bank @ projection  # (16, 8)
    embedding = torch.randn(2, 8, 6, 6, generator=generator) * spread
    embedding[0, 1, 2, 2] = 50.0  # far off the subspace, in a direction the bank does not search: it still counts
    patches = embedding.permute(0, 2, 3, 1).reshape(2, 36, 8)
    expected = torch.cdist(patches, lifted[None].expand(2, -1, -1)).amin(dim=2).view(2, 6, 6)
    torch.testing.assert_close(bank.distance(embedding), expected, atol=1e-4, rtol=1e-4)
    assert float(bank.distance(embedding)[0, 2, 2]) > 45
    reloaded = PatchBank(16)
    reloaded.load_state_dict(bank.state_dict())
    torch.testing.assert_close(reloaded.distance(embedding), bank.distance(embedding))
    assert all(part.numel() == 0 for part in principal_directions(pool, 8))  # as many as channels: no projection
    bank.clear()
    assert bank.projection.numel() == 0 and bank.patch_mean.numel() == 0


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
    """The bank replaces or joins the chosen Gaussian only where it separates better in 95 % of the resamples."""
    decisions = {}
    original = gate._decide_patch_bank
    for name, gaussian_separation in (("gaussian perfect", 2.0), ("gaussian at chance", 0.0)):
        model = _model(patch_bank=64)

        def decide(model, scored, bank, frame, pooled, gaussian, value=gaussian_separation):
            separations = torch.full_like(gaussian.separations, value)
            return original(model, scored, bank, frame, pooled, dataclasses.replace(gaussian, separations=separations))

        monkeypatch.setattr(gate, "_decide_patch_bank", decide)
        model.fit_statistics([_textures(20, seed=1)])
        decisions[name] = model.patch_bank.is_fitted
    assert decisions == {"gaussian perfect": False, "gaussian at chance": True}


def _prefer_joint(monkeypatch: pytest.MonkeyPatch, joint: bool) -> None:
    """Make every less simple choice win, and the joined distances separate perfectly (``joint``) or at chance."""
    monkeypatch.setattr(gate, "_share_better", lambda candidate, simpler: 1.0)
    original = gate.joined_distances

    def joined(*args: object) -> list[torch.Tensor]:
        normal, *anomalous = original(*args)
        if joint:  # every anomalous copy scores far above every normal image, everywhere
            return [normal, *(distance + 1e6 for distance in anomalous)]
        return [torch.zeros_like(normal), *(torch.zeros_like(distance) for distance in anomalous)]

    monkeypatch.setattr(gate, "joined_distances", joined)


def _fitted_with_bank(monkeypatch: pytest.MonkeyPatch, joint: bool) -> FocusDistModel:
    """A model whose gate chose its bank of 256 centres, alone or joined to the Gaussian."""
    _prefer_joint(monkeypatch, joint)
    model = _model(patch_bank=256).eval()
    model.fit_statistics([_textures(20, seed=1)])
    return model


def _scored(model: FocusDistModel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Three test images, the model's maps of them, their embedding and total transform."""
    test_images = _textures(3, seed=2)
    with torch.no_grad():
        embedding, theta = model.embed(test_images)
        return test_images, model(test_images).anomaly_map, embedding, theta


def _assert_reloads_the_same(model: FocusDistModel, test_images: torch.Tensor, maps: torch.Tensor) -> None:
    reloaded = _model(patch_bank=256).eval()
    reloaded.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(test_images).anomaly_map, maps)


def test_a_chosen_bank_is_built_on_all_images_scores_evaluation_and_survives_a_checkpoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = _fitted_with_bank(monkeypatch, joint=False)
    assert model.patch_bank.bank.shape == (256, 32)  # the final bank: from all 20 images, not the gate's 16
    assert not model.patch_bank.joins_gaussian
    scale = model.patch_bank.location_scale
    assert scale.shape == (64,) and not bool((scale == 1).all())  # calibrated by the held-back images
    test_images, maps, embedding, theta = _scored(model)
    with torch.no_grad():
        expected = model.anomaly_map_generator(model.patch_bank.distance(embedding), theta, test_images.shape[-2:])
    torch.testing.assert_close(maps, expected)
    _assert_reloads_the_same(model, test_images, maps)

    # a checkpoint written before the bank could join the Gaussian or be projected (its 32 channels are fewer than
    # the projection's directions: no projection here either): its bank replaces the Gaussian, in every channel
    assert model.patch_bank.projection.numel() == 0
    dropped = ("joint_weights", "projection", "patch_mean")
    state = {f"model.{key}": value for key, value in model.state_dict().items() if not key.endswith(dropped)}
    checkpoint = {"state_dict": state}
    upgrade_checkpoint(checkpoint)
    older = _model(patch_bank=256).eval()
    older.load_state_dict({key.removeprefix("model."): value for key, value in checkpoint["state_dict"].items()})
    assert older.patch_bank.is_fitted and not older.patch_bank.joins_gaussian
    with torch.no_grad():
        torch.testing.assert_close(older(test_images).anomaly_map, maps)

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


def test_a_bank_that_joins_the_gaussian_adds_both_distances_weighted_by_their_normal_means(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = _fitted_with_bank(monkeypatch, joint=True)
    bank = model.patch_bank
    assert bank.is_fitted and bank.joins_gaussian
    gaussian_weight, bank_weight = bank.joint_weights.tolist()
    assert 0 < gaussian_weight < 1 and bank_weight > 0  # one over a Mahalanobis distance's mean (D=32: about 6)
    test_images, maps, embedding, theta = _scored(model)
    with torch.no_grad():
        gaussian, nearest = model.gaussian.mahalanobis(embedding), bank.distance(embedding)
    joined = gaussian_weight * gaussian + bank_weight * nearest
    torch.testing.assert_close(maps, model.anomaly_map_generator(joined, theta, test_images.shape[-2:]))
    # both weighted distances of normal images are about 1 (the held-back images' means): each counts as much
    assert 0.3 < float((gaussian_weight * gaussian).mean()) < 3 and 0.3 < float((bank_weight * nearest).mean()) < 3
    _assert_reloads_the_same(model, test_images, maps)
    with pytest.raises(ValueError, match="build the bank first"):
        PatchBank(8).join(1.0, 1.0)


def test_refitting_without_the_bank_empties_it(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(patch_bank=64)
    monkeypatch.setattr(gate, "_share_better", lambda candidate, simpler: 1.0)
    model.fit_statistics([_textures(20, seed=1)])
    assert model.patch_bank.is_fitted
    monkeypatch.setattr(gate, "_share_better", lambda candidate, simpler: 0.0)
    model.fit_statistics([_textures(20, seed=1)])
    assert not model.patch_bank.is_fitted
