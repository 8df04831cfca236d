"""Fine alignment: the dense non-contrastive loss."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F  # noqa: N812

from anomalib_cfa_ncl.models.focusdist.loss import FocusDistLoss, NCLHead, ica_loss, ncl_loss


def _all_pairs_reference(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    batch = prediction.shape[0]
    terms = [
        -F.cosine_similarity(prediction[a], target[b], dim=0).mean() for a, b in itertools.permutations(range(batch), 2)
    ]
    return torch.stack(terms).mean()


def test_ncl_loss_equals_the_explicit_all_pairs_loss() -> None:
    prediction, target = torch.randn(5, 8, 3, 4), torch.randn(5, 8, 3, 4)
    assert torch.allclose(ncl_loss(prediction, target), _all_pairs_reference(prediction, target), atol=1e-6)


def test_ncl_gradients_flow_only_through_the_predictor_branch() -> None:
    head = NCLHead(6, 16)
    features = torch.randn(4, 6, 5, 5)
    target = head.projector(features)
    target.retain_grad()
    prediction = head.predictor(target.detach().requires_grad_())
    loss = ncl_loss(prediction, target)
    loss.backward()
    assert target.grad is None or torch.count_nonzero(target.grad) == 0  # stop-gradient holds
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.predictor.parameters())


def test_ncl_loss_is_minus_one_for_identical_predictions_and_targets() -> None:
    same = torch.randn(1, 8, 3, 3).expand(4, -1, -1, -1)
    assert torch.isclose(ncl_loss(same, same), torch.tensor(-1.0), atol=1e-6)


def test_ncl_loss_of_a_single_image_is_zero_with_a_graph() -> None:
    prediction = torch.randn(1, 8, 3, 3, requires_grad=True)
    loss = ncl_loss(prediction, torch.randn(1, 8, 3, 3))
    loss.backward()
    assert loss.item() == 0.0


def test_ica_loss_is_zero_for_identical_images_and_positive_otherwise() -> None:
    image = torch.rand(1, 3, 64, 64)
    assert ica_loss(image.expand(4, -1, -1, -1)).item() < 1e-10
    assert ica_loss(torch.rand(4, 3, 64, 64)).item() > 0


def test_total_loss_combines_the_enabled_parts() -> None:
    pairs = {"layer2": (torch.randn(4, 8, 5, 5), torch.randn(4, 8, 5, 5))}
    total, parts = FocusDistLoss(ica_weight=2.0)(pairs, torch.rand(4, 3, 64, 64))
    assert set(parts) == {"ncl_loss", "ica_loss"}
    assert torch.isclose(total, parts["ncl_loss"] + 2.0 * parts["ica_loss"])
    assert FocusDistLoss()({}, None)[0] is None
