"""Alignment gate of FocusDist: keep the image-level alignment only where scoring in its frame finds anomalies better.

Textures have no canonical pose, and how far the image transformer moves the training images together (their
ICA loss) does not say whether scoring in the aligned frame is better: a blurred, low-frequency texture can be
zoomed and shifted towards a common blotch. The gate therefore asks the question itself, on training images only.
After training, every ``HELD_BACK_EVERY``-th training image (at most ``MAX_HELD_BACK``) is held back, a Gaussian is
fitted on the rest in the input frame and another in the aligned frame, and the held-back images are scored in both
frames, as they are and with synthetic anomalies of two families (:mod:`.synthetic_defects`: anomalib's Perlin
blobs and thin Perlin lines, unlike any test defect). The aligned frame is used in evaluation only if its scores
separate the normal from the anomalous images better (image AUROC plus pixel AUROC, the mean of the two families) in
at least 95 % of bootstrap resamples of the held-back images; with 30 images a margin of a few hundredths is noise.

The same held-back images decide the grid pooling (``grid_pooling``, :mod:`.pooling`): a second average pooling of the
scoring embedding makes the map coarser, which separated both families better on textures and parts under random
pose, and blurred what parts in a fixed pose needed.

The same held-back images decide the covariance shrinkage: each frame's Gaussian is finalised once with each
location's own covariance and once shrunk towards the mean covariance over all locations. On textures, whose
positions are exchangeable, sharing the covariance's shape lends every location the samples of all others; on parts
in a fixed pose each location's own covariance can be the better one.

Last, the same held-back images decide the scorer: where the model has a patch bank (:mod:`.patch_bank`), the
nearest-neighbour distances to k-means centres of the fitting images' patches, in the chosen frame and pooling,
replace the chosen Gaussian or join it (the better of the two on the held-back images) if they separate the held-back
images better than the Gaussian alone in ``CONFIDENCE`` of the resamples. A texture's patches are many modes at
every location, which one Gaussian per location blurs together; where the location matters as well, the two join.

The held-back images also calibrate the distances (``distance_calibration``): each location's distance is divided by
the mean distance of held-back normal images there, relative to all locations (:func:`.gaussian.calibration_scale`).
Normal images score higher at the border, where each location's Gaussian has fewer samples and the backbone's zero
padding changes the features; calibrated, a border location needs the same surprise as an interior one. Being the
correction of a bias every grid has, the calibration is the default, dropped only where the held-back images score
better without it in ``CONFIDENCE`` of the resamples.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from .alignment import identity_theta
from .gaussian import calibration_scale
from .patch_bank import PatchBank
from .pooling import flag_held
from .synthetic_defects import PixelNormalization, anomalous_copies

if TYPE_CHECKING:
    from .torch_model import FocusDistModel

logger = logging.getLogger(__name__)

Reduce = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over processes
HELD_BACK_EVERY = 5  # every fifth training image is held back to choose the frame (20 %)
MAX_HELD_BACK = 32  # bounds the memory of the held-back images, independent of the training set's size
MIN_HELD_BACK = 2  # fewer held-back images say nothing: keep the input frame
RESAMPLES = 100  # bootstrap resamples of the held-back images behind every decision
CONFIDENCE = 0.95  # the less simple candidate must separate better in this share of the resamples
BOOTSTRAP_SEED = 0
MAP_SIDE = 64  # maps are averaged down to at most this side for the pixel AUROCs (their cost)


class AlignmentGate(nn.Module):
    """The decision whether evaluation uses the image transformer or the identity, with what it was based on.

    Example:
        >>> gate = AlignmentGate()
        >>> gate.decide(torch.tensor([1.6, 1.8]), images_held_back=30, wins=0.99)
        >>> bool(gate.enabled)
        True
        >>> gate(torch.zeros(1, 2, 3))[0]
        tensor([[0., 0., 0.],
                [0., 0., 0.]])

    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("enabled", torch.ones((), dtype=torch.bool))
        self.register_buffer("separation", torch.full((2,), float("nan")))  # input frame, aligned frame
        self.enabled: torch.Tensor
        self.separation: torch.Tensor
        self.wins: float | None = None  # share of resamples the aligned frame won (the last decision; not saved)
        self.exported_decision: bool | None = None  # the decision as a Python value while a graph is exported

    def chose_input_frame(self) -> bool:
        """Whether evaluation uses the input frame, so that the image transformer need not run at all.

        While a graph is exported the buffer has no value to branch on: the decision taken into
        :meth:`decision_fixed` is used, so the graph holds only the chosen frame; without it the graph keeps both
        (a select in :meth:`forward`).
        """
        if self.exported_decision is not None:
            return not self.exported_decision
        return False if torch.compiler.is_exporting() else not bool(self.enabled)

    @contextmanager
    def decision_fixed(self) -> Iterator[None]:
        """Hold the decision as a Python value for the duration of the block (an export), then forget it."""
        self.exported_decision = bool(self.enabled)
        try:
            yield
        finally:
            self.exported_decision = None

    def frame(self, aligned: bool) -> AbstractContextManager[None]:
        """Evaluate in the given frame for the duration of the block, whatever was decided."""
        return flag_held(self.enabled, aligned)

    def decide(self, separation: torch.Tensor | None, images_held_back: int, wins: float = 0.0) -> None:
        """Keep the alignment if it separates the held-back images better beyond their noise (else: input frame).

        Args:
            separation (torch.Tensor | None): Image plus pixel AUROC in the input and the aligned frame, ``(2,)``;
                ``None`` when too few images could be held back.
            images_held_back (int): How many training images the separation was measured on (for the log).
            wins (float): Share of the bootstrap resamples of those images in which the aligned frame separated
                better; the alignment is kept from ``CONFIDENCE`` on.

        """
        if separation is None:
            self.separation.fill_(float("nan"))
            self.enabled.fill_(False)
            logger.info(
                "FocusDist: %d training image(s) could be held back, too few to tell whether the image alignment "
                "helps (at least %d are needed, i.e. %d training images): the input frame is used.",
                images_held_back,
                MIN_HELD_BACK,
                MIN_HELD_BACK * HELD_BACK_EVERY,
            )
            return
        self.separation.copy_(separation)
        self.wins = wins
        self.enabled.fill_(wins >= CONFIDENCE)
        logger.info(
            "FocusDist: on %d held-back training images with synthetic anomalies, image + pixel AUROC is %.3f in the "
            "input frame and %.3f in the aligned frame, which was better in %.0f %% of %d resamples of the images "
            "(%.0f %% needed): %s.",
            images_held_back,
            float(separation[0]),
            float(separation[1]),
            100 * wins,
            RESAMPLES,
            100 * CONFIDENCE,
            "image alignment kept" if self.enabled else "input frame used",
        )

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        """The transform when the alignment is kept, else the identity, shape ``(B, 2, 3)``."""
        return torch.where(self.enabled, theta, identity_theta(theta.shape[0], theta.device, theta.dtype))


def held_back_mask(first_index: int, batch_size: int, already_held: int) -> torch.Tensor:
    """Which images of a batch are held back: every ``HELD_BACK_EVERY``-th one, until ``MAX_HELD_BACK``.

    Args:
        first_index (int): Index of the batch's first image among all training images of this process.
        batch_size (int): Images in the batch.
        already_held (int): Images held back from earlier batches.

    Returns:
        torch.Tensor: Boolean mask, shape ``(B,)``.

    """
    mask = (torch.arange(first_index, first_index + batch_size) % HELD_BACK_EVERY) == 0
    room = MAX_HELD_BACK - already_held
    return mask & (mask.cumsum(0) <= room)


def separation(
    normal: tuple[torch.Tensor, torch.Tensor], anomalous: tuple[torch.Tensor, torch.Tensor], masks: torch.Tensor
) -> torch.Tensor:
    """Image AUROC plus pixel AUROC of scores and maps of normal and anomalous images.

    Args:
        normal (tuple[torch.Tensor, torch.Tensor]): Scores ``(B,)`` and maps ``(B, H, W)`` of the normal images.
        anomalous (tuple[torch.Tensor, torch.Tensor]): Scores and maps of the anomalous images.
        masks (torch.Tensor): Anomaly masks of the anomalous images, ``(B, H, W)``.

    Returns:
        torch.Tensor: The sum of both AUROCs, a scalar in ``[0, 2]``.

    """
    no_resample = torch.empty(0, masks.shape[0], dtype=torch.long, device=masks.device)
    return resampled_separations(normal, anomalous, masks, no_resample)[0]


def resampled_separations(
    normal: tuple[torch.Tensor, torch.Tensor],
    anomalous: tuple[torch.Tensor, torch.Tensor],
    masks: torch.Tensor,
    resamples: torch.Tensor,
) -> torch.Tensor:
    """:func:`separation` of all images and of each bootstrap resample of them (normal and anomalous paired).

    Args:
        normal (tuple[torch.Tensor, torch.Tensor]): Scores ``(B,)`` and maps ``(B, H, W)`` of the normal images.
        anomalous (tuple[torch.Tensor, torch.Tensor]): Scores and maps of the same images with an anomaly.
        masks (torch.Tensor): Anomaly masks, ``(B, H, W)``.
        resamples (torch.Tensor): Image indices of each resample, ``(R, B)``.

    Returns:
        torch.Tensor: Separation of all images, then of each resample, ``(R + 1,)``.

    """
    count = masks.shape[0]
    side = (min(masks.shape[-2], MAP_SIDE), min(masks.shape[-1], MAP_SIDE))
    normal_maps, anomalous_maps = (F.adaptive_avg_pool2d(maps, side) for maps in (normal[1], anomalous[1]))
    masks = F.adaptive_avg_pool2d(masks.float(), side) > 0.5
    # a resample is the images weighted by how often it drew each; the first row weighs every image once
    drawn = [torch.bincount(indices, minlength=count) for indices in resamples.cpu()]
    weights = torch.cat([torch.ones(1, count, dtype=torch.long), *(row[None] for row in drawn)])
    weights = weights.to(masks.device, torch.float64)
    images = torch.arange(count, device=masks.device)
    image_labels = torch.cat([torch.zeros(count, dtype=torch.bool), torch.ones(count, dtype=torch.bool)])
    image_part = bootstrap_aurocs(
        torch.cat([normal[0], anomalous[0]]), image_labels.to(masks.device), torch.cat([images, images]), weights
    )
    pixel_images = images.repeat_interleave(masks[0].numel())
    pixel_part = bootstrap_aurocs(
        torch.cat([normal_maps.flatten(), anomalous_maps.flatten()]),
        torch.cat([torch.zeros_like(masks).flatten(), masks.flatten()]),
        torch.cat([pixel_images, pixel_images]),
        weights,
    )
    return (image_part + pixel_part).float()


def bootstrap_aurocs(
    scores: torch.Tensor,
    labels: torch.Tensor,
    image_index: torch.Tensor,
    weights: torch.Tensor,
    undefined: float = 0.0,
) -> torch.Tensor:
    """AUROC of the scores under each row of per-image weights, from one comparison of every pair of images.

    The Mann-Whitney form of the area under the ROC curve (a tie counts half) equals the trapezoidal AUROC of
    torchmetrics, and it is a sum over pairs of images: how many of image ``i``'s positive scores lie above image
    ``j``'s negative ones. A bootstrap resample that draws image ``i`` ``w_i`` times counts that pair ``w_i * w_j``
    times, so every resample's AUROC follows from the ``(I, I)`` pair counts, computed once, instead of a sort of
    its own scores: about 80x faster than scoring each resample, in memory of the order of the scores.

    Args:
        scores (torch.Tensor): Scores, ``(N,)``.
        labels (torch.Tensor): ``True`` for anomalous, ``(N,)``.
        image_index (torch.Tensor): The image each score belongs to, a column of ``weights``, ``(N,)``.
        weights (torch.Tensor): Weight of every image in each row, ``(R, I)``, float64.
        undefined (float): The value where a row weighs only one class (``0``, as torchmetrics).

    Returns:
        torch.Tensor: AUROC per row, ``(R,)`` float64.

    Example:
        >>> scores, labels = torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([False, False, True, True])
        >>> weights = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 1]], dtype=torch.float64)  # all; without image 1
        >>> bootstrap_aurocs(scores, labels, torch.arange(4), weights)
        tensor([0.7500, 1.0000], dtype=torch.float64)

    """
    count = weights.shape[1]
    above, positives, negatives = _pair_counts(scores, labels, image_index, count, weights.dtype)
    ranked = ((weights @ above) * weights).sum(dim=1)
    pairs = (weights @ positives) * (weights @ negatives)
    return torch.where(pairs > 0, ranked / pairs.clamp_min(1.0), torch.full_like(pairs, undefined))


def _pair_counts(
    scores: torch.Tensor, labels: torch.Tensor, image_index: torch.Tensor, count: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mann-Whitney counts per pair of images and the positives and negatives of each image.

    Returns:
        tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ``above[i, j]``, the number of image ``i``'s positive scores
        above image ``j``'s negative ones (ties half), ``(I, I)``; positives and negatives per image, ``(I,)`` each.
    """
    positive_scores, positive_images = scores[labels], image_index[labels]
    above = torch.zeros(count, count, dtype=dtype, device=scores.device)
    negatives = torch.zeros(count, dtype=dtype, device=scores.device)
    for image in range(count):
        negative = scores[~labels & (image_index == image)].sort().values
        below = torch.searchsorted(negative, positive_scores, right=False)  # strictly below each positive
        below_or_tied = torch.searchsorted(negative, positive_scores, right=True)
        above[:, image].index_add_(0, positive_images, (below + below_or_tied).to(dtype) / 2)
        negatives[image] = negative.numel()
    positives = torch.bincount(positive_images, minlength=count).to(dtype)
    return above, positives, negatives


def choose_scoring(
    model: FocusDistModel,
    batches: Iterable[torch.Tensor],
    reduce: Reduce | None = None,
    normalization: PixelNormalization | None = None,
) -> tuple[torch.Tensor | None, bool]:
    """Decide, on its training images, how ``model`` scores: frame, grid pooling, shrinkage, patch bank, calibration.

    The candidates are every frame the gate may choose (the input frame, the aligned frame; only the model's own
    frame without a gate) with and without the grid pooling (where ``model.grid_pooling`` is a candidate) and with
    every shrinkage (none and ``model.covariance_shrinkage``), each calibrated or not (:func:`score_candidates`). A
    less simple choice (the aligned frame, then the pooling and the shrinkage in the chosen frame) is kept only where
    it separates better in at least ``CONFIDENCE`` of ``RESAMPLES`` bootstrap resamples of the held-back images: a
    difference within their noise is no difference. The calibration is kept unless the uncalibrated scores separate
    better in ``CONFIDENCE`` of the resamples. Last, where ``model.patch_bank`` is a candidate (in one process), the
    nearest-neighbour distances to a bank of patch prototypes replace or join the chosen Gaussian if they separate
    better in ``CONFIDENCE`` of the resamples (:func:`_decide_patch_bank`). Each chosen scorer's mean distances over
    all held-back images are its calibration.
    Runs in evaluation mode without gradients (inside :meth:`FocusDistModel.fit_statistics`); sets
    ``model.alignment_gate``, ``model.grid_pooling.enabled`` and ``model.gaussian.shrinkage``.

    Args:
        model (FocusDistModel): The trained model.
        batches (Iterable[torch.Tensor]): Pre-processed training images without augmentation, ``(B, 3, H, W)``.
        reduce (Callable | None): Sums a tensor over processes (distributed training); ``None`` in one process.
        normalization (PixelNormalization | None): The per-channel mean and std the images were normalised with,
            so that the synthetic defects are drawn in pixel values; ``None`` for images in pixel values.

    Returns:
        ScoringChoice: The Gaussian's calibration scale (``None`` without calibration, where it was dropped, or with too
        few images) and, where the bank was chosen, its calibration and whether it joins the Gaussian.

    """
    shrinkages = [0.0, model.covariance_shrinkage] if model.covariance_shrinkage > 0 else [0.0]
    model.grid_pooling.enabled.fill_(False)
    scored = score_candidates(model, batches, shrinkages, reduce, normalization)
    model.gaussian.shrinkage = 0.0
    if scored is None:
        return ScoringChoice()
    chosen_frame = _decide_frame(model.alignment_gate, scored)
    in_frame = scored.separations[:, chosen_frame]  # (R + 1, poolings, shrinkages, calibrations)
    pooled = _decide_pooling(in_frame, model.grid_pooling.side)
    model.grid_pooling.enabled.fill_(pooled)
    in_pooling = in_frame[:, int(pooled)]  # (R + 1, shrinkages, calibrations)
    model.gaussian.shrinkage = _decide_shrinkage(in_pooling, shrinkages)
    shrinkage_index = shrinkages.index(model.gaussian.shrinkage)
    scale = None
    if model.distance_calibration:
        poolings = scored.separations.shape[2]
        scale = scored.scales[(chosen_frame * poolings + int(pooled)) * len(shrinkages) + shrinkage_index]
        scale = _decide_calibration(in_pooling[:, shrinkage_index], scale, scored.grid)
    gaussian = in_pooling[:, shrinkage_index, 0 if scale is not None else -1]  # the chosen Gaussian's separations
    frame = scored.frames[chosen_frame]
    bank = scored.banks.get((frame, pooled))
    if bank is None:
        return ScoringChoice(scale)
    chosen_gaussian = ScoredGaussian(gaussian, scored.gaussian_distances[frame, pooled, shrinkage_index], scale)
    return ScoringChoice(scale, _decide_patch_bank(model, scored, bank, frame, pooled, chosen_gaussian))


@dataclass
class BankChoice:
    """How a chosen patch bank scores.

    Attributes:
        scale (torch.Tensor | None): Its calibration scale per location ``(L,)``; ``None`` without calibration.
        joint_weights (tuple[float, float] | None): The weights of the Gaussian's and the bank's distances where the
            bank joins the Gaussian (one over each one's mean distance of held-back normal images); ``None`` where
            it replaces the Gaussian.

    """

    scale: torch.Tensor | None
    joint_weights: tuple[float, float] | None


@dataclass
class ScoringChoice:
    """What :func:`choose_scoring` decided beyond the flags it sets on the model.

    Attributes:
        gaussian_scale (torch.Tensor | None): The Gaussian's calibration scale per location ``(L,)``; ``None``
            without calibration.
        bank (BankChoice | None): The patch bank's scoring, where it was chosen; ``None``: the Gaussian alone.

    """

    gaussian_scale: torch.Tensor | None = None
    bank: BankChoice | None = None


@dataclass
class ScoredGaussian:
    """The chosen Gaussian on the held-back images: what the patch bank must beat, and what it may join.

    Attributes:
        separations (torch.Tensor): Its separations of all held-back images, then of each resample, ``(R + 1,)``.
        distances (list[torch.Tensor]): Its uncalibrated distances ``(B, h, w)`` of the normal held-back images,
            then of each family's anomalous copies.
        scale (torch.Tensor | None): Its calibration scale ``(L,)``; ``None`` where it scores uncalibrated.

    """

    separations: torch.Tensor
    distances: list[torch.Tensor]
    scale: torch.Tensor | None


@dataclass
class ScoredCandidates:
    """How well every scoring candidate separated the held-back images, and the calibration each one would use.

    Attributes:
        separations (torch.Tensor): Image plus pixel AUROC (the mean of the synthetic families) of all held-back
            images, then of each bootstrap resample, per frame, grid pooling (none first), shrinkage and calibration
            (calibrated first), ``(RESAMPLES + 1, frames, poolings, shrinkages, calibrations)``.
        scales (list[torch.Tensor]): The calibration scale ``(L,)`` of each frame, pooling and shrinkage, in that
            order (frame-major).
        held_back (int): Held-back images, over all processes.
        grid (tuple[int, ...]): The scoring grid ``(h, w)``.
        frames (tuple[bool | None, ...]): The frames compared (``None``: the model's own, without a gate).
        banks (dict): A patch bank per frame and pooling, sampled from the images the candidates were fitted on and
            not yet built; empty where the bank is not a candidate (or in several processes).
        embedded (dict): Per frame, the embeddings and total transforms of the held-back images, then of each family's
            anomalous copies (:meth:`FocusDistModel.embed`, unpooled); kept only where a bank is a candidate.
        gaussian_distances (dict): Per frame, pooling and shrinkage index, each Gaussian's uncalibrated distances
            ``(B, h, w)`` of the held-back images, then of each family's copies; kept only where a bank is a
            candidate (it may join the chosen one).
        families (list[tuple[torch.Tensor, torch.Tensor]]): Each family's anomalous copies and masks ``(B, H, W)``.
        resamples (torch.Tensor): Image indices of each bootstrap resample, ``(R, B)``.

    """

    separations: torch.Tensor
    scales: list[torch.Tensor]
    held_back: int
    grid: tuple[int, ...]
    frames: tuple[bool | None, ...]
    banks: dict[tuple[bool | None, bool], PatchBank]
    embedded: dict[bool | None, list[tuple[torch.Tensor, torch.Tensor]]]
    gaussian_distances: dict[tuple[bool | None, bool, int], list[torch.Tensor]]
    families: list[tuple[torch.Tensor, torch.Tensor]]
    resamples: torch.Tensor


def score_candidates(
    model: FocusDistModel,
    batches: Iterable[torch.Tensor],
    shrinkages: list[float],
    reduce: Reduce | None = None,
    normalization: PixelNormalization | None = None,
) -> ScoredCandidates | None:
    """Score the held-back images, as they are and with synthetic anomalies, under every candidate fitted on the rest.

    One pass over the images fits a Gaussian per frame and grid pooling on all but the held-back ones; its shrinkage
    variants share its sums, and all of a frame's candidates share one backbone pass over the held-back images (the
    pooling is applied to its embedding). With ``model.distance_calibration`` every candidate is also judged
    calibrated, each half of the held-back images by the other half's mean distances (cross-fitting: no image
    calibrates its own score). Each held-back image is scored with an anomaly of each family
    (:mod:`.synthetic_defects`); a candidate's separation is the mean of the two families'.

    Args:
        model (FocusDistModel): The trained model, in evaluation mode.
        batches (Iterable[torch.Tensor]): Pre-processed training images without augmentation, ``(B, 3, H, W)``.
        shrinkages (list[float]): The covariance shrinkages to compare.
        reduce (Callable | None): Sums a tensor over processes (distributed training); ``None`` in one process.
        normalization (PixelNormalization | None): The images' per-channel mean and std (the defects are drawn in
            pixel values); ``None`` for images in pixel values.

    Returns:
        ScoredCandidates | None: The candidates' separations; ``None``, after saying why, when too few images could be
        held back or none was left to fit on.

    """
    gate = model.alignment_gate
    frames = (False, True) if gate is not None else (None,)  # None: the model's own frame, no choice
    poolings = (False, True) if model.grid_pooling.is_candidate else (False,)
    gaussians = {(aligned, pooled): model.gaussian.fresh() for aligned in frames for pooled in poolings}
    # the bank's sample cannot be summed over processes: it is a candidate in one process only
    with_bank = model.patch_bank.is_candidate and reduce is None
    banks = {key: model.patch_bank.fresh() for key in gaussians} if with_bank else {}
    held_back: list[torch.Tensor] = []
    seen = held = 0
    with model.grid_pooling.off():
        for images in batches:
            mask = held_back_mask(seen, images.shape[0], held)
            seen, held = seen + images.shape[0], held + int(mask.sum())
            held_back.append(images[mask])
            if not mask.all():
                for aligned in frames:
                    with _frame(gate, aligned):
                        embedding = model.embed(images[~mask])[0]
                    for pooled in poolings:
                        pooled_embedding = _pooled(model, embedding, pooled)
                        gaussians[aligned, pooled].update(pooled_embedding)
                        if banks:
                            banks[aligned, pooled].update(pooled_embedding)
    # every process takes the same branch: the decision rests on counts summed over processes
    counts = torch.tensor([held, seen - held, float(held == 0 or seen == held)], dtype=torch.float64)
    counts = reduce(counts) if reduce is not None else counts
    if counts[0] < MIN_HELD_BACK or counts[2] > 0:
        if gate is not None:
            gate.decide(None, int(counts[0]))
        elif model.distance_calibration:
            logger.info("FocusDist: too few training images to hold some back: the distances are not calibrated.")
        return None
    normal = torch.cat(held_back)
    families = anomalous_copies(normal, normalization)
    resamples = torch.randint(held, (RESAMPLES, held), generator=torch.Generator().manual_seed(BOOTSTRAP_SEED))
    calibrations = (True, False) if model.distance_calibration else (False,)
    results, scales = [], []
    kept_embeddings = {}  # for the patch bank's decision: no second backbone pass over the held-back images
    kept_distances = {}  # the Gaussians' held-back distances, which the bank may join
    for aligned in frames:
        with _frame(gate, aligned), model.grid_pooling.off():
            embedded = [model.embed(images) for images in (normal, *(anomalous for anomalous, _ in families))]
        if banks:
            kept_embeddings[aligned] = embedded
        thetas = [theta for _, theta in embedded]
        for pooled in poolings:
            pooled_embeddings = [_pooled(model, embedding, pooled) for embedding, _ in embedded]
            variants = gaussians[aligned, pooled].finalize_variants(shrinkages, reduce)
            for shrinkage_index, variant in enumerate(variants):
                distances = [variant.mahalanobis(embedding) for embedding in pooled_embeddings]
                if banks:
                    kept_distances[aligned, pooled, shrinkage_index] = distances
                scales.append(calibration_scale(_summed(distances[0], reduce), float(counts[0])))
                for calibrated in calibrations:
                    separation = _family_mean_separation(
                        model, distances, thetas, families, calibrated, resamples, reduce
                    )
                    results.append(separation * held)
    total = torch.stack(results, dim=1).to(torch.float64)  # (R + 1, candidates), weighted by each process's images
    total = ((reduce(total) if reduce is not None else total) / counts[0]).float()
    total = total.view(RESAMPLES + 1, len(frames), len(poolings), len(shrinkages), len(calibrations))
    grid = tuple(embedded[0][0].shape[-2:])
    return ScoredCandidates(
        total, scales, int(counts[0]), grid, frames, banks, kept_embeddings, kept_distances, families, resamples
    )


def _pooled(model: FocusDistModel, embedding: torch.Tensor, pooled: bool) -> torch.Tensor:
    """The embedding ``(B, D, h, w)`` with the model's grid pooling applied or not."""
    return model.grid_pooling.pool(embedding) if pooled else embedding


def _family_mean_separation(
    model: FocusDistModel,
    distances: list[torch.Tensor],
    thetas: list[torch.Tensor | None],
    families: list[tuple[torch.Tensor, torch.Tensor]],
    calibrated: bool,
    resamples: torch.Tensor,
    reduce: Reduce | None,
) -> torch.Tensor:
    """Separation of the normal held-back images from each family's anomalous copies, the mean of the families.

    Args:
        model (FocusDistModel): The model (its anomaly-map generator).
        distances (list[torch.Tensor]): A candidate's distances ``(B, h, w)`` of the normal images, then of each
            family's anomalous copies.
        thetas (list[torch.Tensor | None]): The total transform ``(B, 2, 3)`` of each (``None``: none), in order.
        families (list[tuple[torch.Tensor, torch.Tensor]]): Each family's anomalous images and masks ``(B, H, W)``.
        calibrated (bool): Judge the distances cross-calibrated (:func:`cross_calibrated`).
        resamples (torch.Tensor): Image indices of each bootstrap resample, ``(R, B)``.
        reduce (Callable | None): Sums a tensor over processes; ``None`` in one process.

    Returns:
        torch.Tensor: Image plus pixel AUROC of all images, then of each resample, ``(R + 1,)``.

    """
    image_size = families[0][1].shape[-2:]
    if calibrated:
        distances = list(cross_calibrated(*distances, reduce=reduce))
    normal_scored = _maps(model, distances[0], thetas[0], image_size)  # the same for every family
    separations = [
        resampled_separations(normal_scored, _maps(model, distance, theta, image_size), masks, resamples)
        for distance, theta, (_, masks) in zip(distances[1:], thetas[1:], families, strict=True)
    ]
    return torch.stack(separations).mean(dim=0)


def _decide_frame(gate: AlignmentGate | None, scored: ScoredCandidates) -> int:
    """The frame scored in (``1``: aligned), judged by the better of each frame's candidates, resample by resample."""
    if gate is None:
        return 0
    best = scored.separations.flatten(2).amax(dim=2)
    gate.decide(best[0], scored.held_back, _share_better(best[1:, 1], best[1:, 0]))
    return int(gate.enabled)


def _decide_pooling(in_frame: torch.Tensor, side: int) -> bool:
    """Whether to pool the grid: where the pooled candidates separate better beyond the noise.

    Args:
        in_frame (torch.Tensor): Separations in the chosen frame, ``(RESAMPLES + 1, poolings, shrinkages,
            calibrations)``, unpooled first.
        side (int): The pooling's side (for the log).

    Returns:
        bool: ``True`` to pool.

    """
    if in_frame.shape[1] == 1:
        return False
    best = in_frame.flatten(2).amax(dim=2)
    wins = _share_better(best[1:, 1], best[1:, 0])
    pooled = wins >= CONFIDENCE
    logger.info(
        "FocusDist: in the chosen frame, image + pixel AUROC of the held-back images is %.3f on the scoring grid and "
        "%.3f with a %dx%d average pooling of it, which was better in %.0f %% of %d resamples (%.0f %% needed): %s.",
        float(best[0, 0]),
        float(best[0, 1]),
        side,
        side,
        100 * wins,
        RESAMPLES,
        100 * CONFIDENCE,
        "pooled" if pooled else "not pooled",
    )
    return pooled


def _decide_shrinkage(in_frame: torch.Tensor, shrinkages: list[float]) -> float:
    """The covariance shrinkage: the candidate's where it separates better beyond the noise, else ``0``.

    Args:
        in_frame (torch.Tensor): Separations in the chosen frame and pooling, ``(RESAMPLES + 1, shrinkages,
            calibrations)``.
        shrinkages (list[float]): The shrinkages compared, ``0`` first.

    Returns:
        float: The shrinkage chosen.

    """
    if len(shrinkages) == 1:
        return 0.0
    best = in_frame.amax(dim=2)
    wins = _share_better(best[1:, 1], best[1:, 0])
    chosen = shrinkages[1] if wins >= CONFIDENCE else 0.0
    logger.info(
        "FocusDist: in the chosen frame, image + pixel AUROC of the held-back images is %.3f with each location's "
        "own covariance and %.3f with covariance shrinkage %g, which was better in %.0f %% of %d resamples "
        "(%.0f %% needed): shrinkage %g used.",
        float(best[0, 0]),
        float(best[0, 1]),
        shrinkages[1],
        100 * wins,
        RESAMPLES,
        100 * CONFIDENCE,
        chosen,
    )
    return chosen


def _decide_patch_bank(
    model: FocusDistModel,
    scored: ScoredCandidates,
    bank: PatchBank,
    frame: bool | None,
    pooled: bool,
    gaussian: ScoredGaussian,
) -> BankChoice | None:
    """Whether the patch bank replaces or joins the chosen Gaussian: where it separates better beyond the noise.

    The bank sampled from the fitting images in the chosen frame and pooling is built and the held-back images (their
    embeddings from :func:`score_candidates`) are scored by it alone and by it joined to the chosen Gaussian
    (:func:`joined_distances`), calibrated as the Gaussian is when ``model.distance_calibration``. The better of the
    two on all held-back images is compared resample by resample with the Gaussian alone.

    Args:
        model (FocusDistModel): The model, in evaluation mode.
        scored (ScoredCandidates): The held-back images, their synthetic anomalies and resamples.
        bank (PatchBank): The bank sampled in the chosen frame and pooling, not yet built.
        frame (bool | None): The chosen frame (``None``: the model's own).
        pooled (bool): Whether the grid pooling was chosen.
        gaussian (ScoredGaussian): The chosen Gaussian on the held-back images.

    Returns:
        BankChoice | None: How the bank scores where it was chosen; ``None``: the Gaussian alone.

    """
    bank.finalize()
    embedded = scored.embedded[frame]
    distances = [bank.distance(_pooled(model, embedding, pooled)) for embedding, _ in embedded]
    thetas = [theta for _, theta in embedded]
    calibrated = model.distance_calibration
    alone = _family_mean_separation(model, distances, thetas, scored.families, calibrated, scored.resamples, None)
    joint_distances = joined_distances(gaussian.distances, gaussian.scale is not None, distances, calibrated)
    joint = _family_mean_separation(model, joint_distances, thetas, scored.families, False, scored.resamples, None)
    joins = bool(joint[0] > alone[0])
    separation = joint if joins else alone
    wins = _share_better(separation[1:], gaussian.separations[1:])
    kept = wins >= CONFIDENCE
    logger.info(
        "FocusDist: image + pixel AUROC of the held-back images is %.3f with the chosen Gaussian, %.3f with the "
        "nearest of %d k-means centres of training patches and %.3f with both joined; the better, %s, was better "
        "than the Gaussian in %.0f %% of %d resamples (%.0f %% needed): %s.",
        float(gaussian.separations[0]),
        float(alone[0]),
        bank.bank.shape[0],
        float(joint[0]),
        "both joined" if joins else "the centres alone",
        100 * wins,
        RESAMPLES,
        100 * CONFIDENCE,
        ("patch bank joined to the Gaussian" if joins else "patch bank used") if kept else "Gaussian used",
    )
    if not kept:
        return None
    scale = calibration_scale(distances[0].sum(dim=0), float(distances[0].shape[0])) if calibrated else None
    if not joins:
        return BankChoice(scale, None)
    gaussian_normal = _calibrated_by(gaussian.distances[0], gaussian.scale)
    bank_normal = _calibrated_by(distances[0], scale)
    return BankChoice(scale, (1 / float(gaussian_normal.mean()), 1 / float(bank_normal.mean())))


def joined_distances(
    gaussian: list[torch.Tensor], gaussian_calibrated: bool, bank: list[torch.Tensor], bank_calibrated: bool
) -> list[torch.Tensor]:
    """Held-back distances of the Gaussian and the bank joined: each divided by its normal images' mean, then summed.

    The two distances have different units (Mahalanobis and Euclidean); divided by their mean over normal images each
    counts as much. Each is first cross-calibrated per location where it is calibrated (:func:`cross_calibrated`);
    the two means are one number each over all held-back normal images.

    Args:
        gaussian (list[torch.Tensor]): The Gaussian's distances ``(B, h, w)`` of the normal held-back images, then of
            each family's anomalous copies.
        gaussian_calibrated (bool): Whether the Gaussian scores calibrated.
        bank (list[torch.Tensor]): The bank's distances, in the same order.
        bank_calibrated (bool): Whether the bank scores calibrated.

    Returns:
        list[torch.Tensor]: The joined distances, in the same order.

    """
    parts = []
    for distances, calibrated in ((gaussian, gaussian_calibrated), (bank, bank_calibrated)):
        distances = list(cross_calibrated(*distances)) if calibrated else distances
        parts.append([distance / distances[0].mean() for distance in distances])
    return [g + b for g, b in zip(*parts, strict=True)]


def _calibrated_by(distance: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Distances ``(B, h, w)`` divided by a per-location scale ``(h * w,)`` (unchanged for ``None``)."""
    return distance if scale is None else distance / scale.view(distance.shape[1:])


def _decide_calibration(separations: torch.Tensor, scale: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor | None:
    """The calibration scale, unless the chosen candidate separates better uncalibrated beyond the noise.

    The calibration corrects a bias every grid has (the border), so it is the default: dropped only where the
    held-back images score better without it in ``CONFIDENCE`` of the resamples.

    Args:
        separations (torch.Tensor): The chosen candidate's separations, calibrated and not, ``(RESAMPLES + 1, 2)``.
        scale (torch.Tensor): Its calibration scale per location, ``(L,)``.
        grid (tuple[int, ...]): The scoring grid ``(h, w)``, for the log.

    Returns:
        torch.Tensor | None: ``scale``, or ``None`` where the calibration is dropped.

    """
    calibrated, uncalibrated = separations.unbind(dim=1)
    wins = _share_better(uncalibrated[1:], calibrated[1:])
    logger.info(
        "FocusDist: image + pixel AUROC of the held-back images is %.3f with distances calibrated per location "
        "(scale %.2f to %.2f, border %.2f on average) and %.3f uncalibrated, which was better in %.0f %% of %d "
        "resamples (%.0f %% needed to drop the calibration): %s.",
        float(calibrated[0]),
        float(scale.min()),
        float(scale.max()),
        float(_border_mean(scale, grid)),
        float(uncalibrated[0]),
        100 * wins,
        RESAMPLES,
        100 * CONFIDENCE,
        "uncalibrated" if wins >= CONFIDENCE else "calibrated",
    )
    return None if wins >= CONFIDENCE else scale


def cross_calibrated(
    normal: torch.Tensor, *anomalous: torch.Tensor, reduce: Reduce | None = None
) -> tuple[torch.Tensor, ...]:
    """Calibrate held-back distances half by half, each half by the other half's normal distances.

    Args:
        normal (torch.Tensor): Distances of the held-back normal images, ``(B, h, w)``.
        *anomalous (torch.Tensor): Distances of the same images with a synthetic anomaly, ``(B, h, w)`` each (one
            per family of anomalies).
        reduce (Callable | None): Sums a tensor over processes; ``None`` in one process.

    Returns:
        tuple[torch.Tensor, ...]: All calibrated, ``normal`` first, same shapes. Image ``i`` (the ``i``-th held back in
        its process) is divided by the scale of the images of the other parity.

    """
    even = (torch.arange(normal.shape[0], device=normal.device) % 2 == 0)[:, None, None]
    count = torch.tensor([float(even.sum()), float((~even).sum())], dtype=torch.float64, device=normal.device)
    count = reduce(count) if reduce is not None else count
    odd_scale, even_scale = (
        calibration_scale(_summed(normal[part], reduce), float(n)).view(normal.shape[1:])
        for part, n in ((~even[:, 0, 0], count[1]), (even[:, 0, 0], count[0]))
    )
    return tuple(torch.where(even, d / odd_scale, d / even_scale) for d in (normal, *anomalous))


def _summed(distance: torch.Tensor, reduce: Reduce | None) -> torch.Tensor:
    """Sum of distance maps ``(B, h, w)`` over the images of every process, ``(h, w)``."""
    total = distance.sum(dim=0).to(torch.float64)
    return (reduce(total) if reduce is not None else total).float()


def _border_mean(scale: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """Mean of a per-location scale ``(L,)`` over the outermost ring of its grid ``(h, w)`` (for the log)."""
    ring = torch.ones(grid, dtype=torch.bool, device=scale.device)
    ring[1:-1, 1:-1] = False
    return scale.view(grid)[ring].mean()


def _share_better(candidate: torch.Tensor, simpler: torch.Tensor) -> float:
    """Share of the resamples in which ``candidate`` separates better than ``simpler``, both ``(R,)``.

    Counted, then divided in Python's float64: a float32 mean gives 95 of 100 as 0.94999999, below ``CONFIDENCE``.
    """
    return int((candidate > simpler).sum()) / candidate.numel()


@contextmanager
def _frame(gate: AlignmentGate | None, aligned: bool | None) -> Iterator[None]:
    """Evaluate in the given frame (``None``: the model's own, without a gate)."""
    if gate is None or aligned is None:
        yield
        return
    with gate.frame(aligned):
        yield


def _maps(
    model: FocusDistModel, distance: torch.Tensor, theta: torch.Tensor | None, image_size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image scores ``(B,)`` and anomaly maps ``(B, H, W)`` of distances on the scoring grid ``(B, h, w)``."""
    anomaly_map = model.anomaly_map_generator(distance, theta, image_size)[:, 0]
    return anomaly_map.amax(dim=(-2, -1)), anomaly_map
