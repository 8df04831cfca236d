"""FocusDist in pure PyTorch: coarse-to-fine alignment, dense non-contrastive learning, Gaussian scoring.

Implements "Focus Your Distribution: Coarse-to-Fine Non-Contrastive Learning for Anomaly Detection and
Localization" (Zheng et al., arXiv 2110.04538).

Frames: the image transformer maps the input to the *aligned* frame; the transformer after stage ``k``
warps that stage's output, which the next stage then consumes, so stage ``k``'s features live in frame
``k``. For scoring, every layer is resampled into the deepest frame with one warp (so all channels of a
location describe the same input point), a Gaussian per location scores it there, and the distance map is
warped back into the input's coordinates with the inverse of the composed transform.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import InferenceBatch
from torch import nn

from .alignment import (
    FEATURE_POOL_SIZE,
    AlignmentGate,
    SimilarityTransformer,
    compose_theta,
    identity_theta,
    warp,
)
from .anomaly_map import AnomalyMapGenerator
from .backbone import create_feature_extractor, feature_module
from .gaussian import StreamingGaussian

FEATURE_MAX_ANGLE = math.pi / 8
FEATURE_MAX_SCALE = 1.1
FEATURE_MAX_SHIFT = 0.1
SUBSET_SEED = 0
INPUT_LIMIT = 1e3  # normalised images lie within about +-3; clamping far outside keeps every score finite


class NCLHead(nn.Module):
    """Projector ``g`` and predictor ``h`` of the dense non-contrastive loss (1x1 convolutions).

    Args:
        in_channels (int): Channels of the feature map.
        projection_dim (int): Width of the projection.

    Example:
        >>> head = NCLHead(64, 128)
        >>> prediction, target = head(torch.rand(2, 64, 8, 8))
        >>> prediction.shape
        torch.Size([2, 128, 8, 8])

    """

    def __init__(self, in_channels: int, projection_dim: int = 128) -> None:
        super().__init__()
        bottleneck = max(projection_dim // 4, 1)
        self.projector = nn.Sequential(
            nn.Conv2d(in_channels, projection_dim, 1, bias=False),
            nn.BatchNorm2d(projection_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(projection_dim, projection_dim, 1),
        )
        self.predictor = nn.Sequential(
            nn.Conv2d(projection_dim, bottleneck, 1, bias=False),
            nn.BatchNorm2d(bottleneck),
            nn.ReLU(inplace=True),
            nn.Conv2d(bottleneck, projection_dim, 1),
        )

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(h(g(f)), g(f))``, each of shape ``(B, projection_dim, H, W)``."""
        target = self.projector(features)
        return self.predictor(target), target


class TrainingOutput(NamedTuple):
    """What the training forward returns for :class:`~.loss.FocusDistLoss`.

    Attributes:
        ncl_pairs: Per layer, ``(prediction, target)`` of shape ``(B, D, h_k, w_k)``; empty when NCL is off.
        aligned_images: Output of the image transformer ``(B, 3, H, W)``, or ``None`` when it is off.

    """

    ncl_pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    aligned_images: torch.Tensor | None


def _layer_key(layer: str) -> str:
    """Module-dict key for a layer name (``ModuleDict`` keys cannot contain dots)."""
    return layer.replace(".", "_")


class FocusDistModel(nn.Module):
    """FocusDist torch model.

    Args:
        backbone (str): timm model name.
        layers (list[str]): Feature layers, shallow to deep.
        pre_trained (bool): Start from ImageNet weights.
        backbone_weights (str | None): Local weights file used instead of the download.
        n_features (int | None): Channels kept for the Gaussian (a fixed random subset); ``None`` keeps all.
        image_alignment (bool): Image-level coarse alignment (spatial transformer on the input).
        image_alignment_min_gain (float): The image alignment is used in evaluation only if it reduces the spread
            of the training images (their ICA loss) by at least this fraction, see :class:`AlignmentGate`.
        feature_alignment (bool): Feature-level coarse alignment (a transformer after each selected stage).
        ncl (bool): Fine alignment by the dense non-contrastive loss (fine-tunes the backbone).
        map_stride (int): Stride of the scoring grid relative to the input (8 gives 32x32 at 256x256).
        local_aggregation (int): Side of the average pooling that gives each location its neighbourhood's
            context before scoring; 1 disables it.
        projection_dim (int): Width of the NCL projector.
        regularization (float): Covariance ridge, relative to the mean feature variance.
        statistics_neighbourhood (int): Each location's Gaussian is fitted on the samples of this square of
            neighbouring locations (9x the samples at 3; ``1`` uses its own only).
        statistics_dtype (str): ``"float16"`` or ``"float32"``, storage of the precision matrices.
        blur_sigma (float): Standard deviation of the anomaly-map blur, in input pixels.

    Example:
        >>> model = FocusDistModel(backbone="resnet18", pre_trained=False)
        >>> output = model(torch.rand(2, 3, 256, 256))  # training mode: what the loss needs
        >>> sorted(output.ncl_pairs)
        ['layer1', 'layer2', 'layer3']

    """

    def __init__(
        self,
        backbone: str = "resnet18",
        layers: list[str] | None = None,
        pre_trained: bool = True,
        backbone_weights: str | None = None,
        n_features: int | None = 176,
        image_alignment: bool = True,
        image_alignment_min_gain: float = 0.2,
        feature_alignment: bool = True,
        ncl: bool = True,
        map_stride: int = 8,
        local_aggregation: int = 3,
        projection_dim: int = 128,
        regularization: float = 0.01,
        statistics_neighbourhood: int = 3,
        statistics_dtype: str = "float16",
        blur_sigma: float = 4.0,
    ) -> None:
        super().__init__()
        layers = list(layers) if layers is not None else ["layer1", "layer2", "layer3"]
        self.layers = layers
        self.map_stride = map_stride
        self.local_aggregation = local_aggregation
        self.feature_extractor = create_feature_extractor(backbone, layers, pre_trained, backbone_weights)
        # channels-last: on CPU, depthwise convolutions' input gradients are up to 100x faster in this layout
        self.feature_extractor.to(memory_format=torch.channels_last)
        channels = self.feature_extractor.feature_info.channels()
        self.min_input_size = max(self.feature_extractor.feature_info.reduction())

        self.image_transformer = SimilarityTransformer(3) if image_alignment else None
        self.alignment_gate = AlignmentGate(image_alignment_min_gain) if image_alignment else None
        self.feature_transformers = (
            nn.ModuleDict(
                {
                    _layer_key(layer): SimilarityTransformer(
                        dim,
                        pool_size=FEATURE_POOL_SIZE,
                        max_angle=FEATURE_MAX_ANGLE,
                        max_scale=FEATURE_MAX_SCALE,
                        max_shift=FEATURE_MAX_SHIFT,
                    )
                    for layer, dim in zip(layers, channels, strict=True)
                }
            )
            if feature_alignment
            else None
        )
        self.ncl_heads = (
            nn.ModuleDict(
                {_layer_key(layer): NCLHead(dim, projection_dim) for layer, dim in zip(layers, channels, strict=True)}
            )
            if ncl
            else None
        )
        if self.feature_transformers is not None:
            for layer in layers:
                hook = self.feature_transformers[_layer_key(layer)].warp_output_hook
                feature_module(self.feature_extractor, layer).register_forward_hook(hook)

        total = sum(channels)
        if n_features is not None and not n_features > 0:
            msg = f"n_features must be a positive number of channels (or None for all {total}), got {n_features}."
            raise ValueError(msg)
        keep = total if n_features is None else min(n_features, total)
        subset = torch.randperm(total, generator=torch.Generator().manual_seed(SUBSET_SEED))[:keep].sort().values
        self.register_buffer("feature_index", subset)
        self.feature_index: torch.Tensor
        self.gaussian = StreamingGaussian(regularization, statistics_dtype, statistics_neighbourhood)
        self.anomaly_map_generator = AnomalyMapGenerator(blur_sigma)
        # Lightning 2.6 starts fitting in whatever mode the modules are in, so freeze BatchNorm now, not on .train()
        self.train()

    def train(self, mode: bool = True) -> FocusDistModel:
        """Set the training mode, keeping the backbone's BatchNorm statistics frozen (fine-tuning)."""
        super().train(mode)
        for module in self.feature_extractor.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def align_images(self, images: torch.Tensor, gated: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Image-level coarse alignment.

        Args:
            images (torch.Tensor): Input images, shape ``(B, 3, H, W)``.
            gated (bool): In evaluation, apply the :class:`AlignmentGate`'s decision; ``False`` gives the
                transformer's own output, which the gate measures.

        Returns:
            tuple[torch.Tensor, torch.Tensor]: The aligned images ``(B, 3, H, W)`` and the transforms
            ``(B, 2, 3)`` (identity when image alignment is off).

        """
        if self.image_transformer is None:
            return images, identity_theta(images.shape[0], images.device, images.dtype)
        theta = self.image_transformer(images)
        if gated and not self.training and self.alignment_gate is not None:
            theta = self.alignment_gate(theta)
        return warp(images, theta, padding_mode="reflection"), theta

    def measure_alignment(self, images: torch.Tensor) -> None:
        """Add training images to the :class:`AlignmentGate`'s sums (evaluation mode, before the statistics fit).

        Args:
            images (torch.Tensor): Training images without augmentation, shape ``(B, 3, H, W)``.

        """
        if self.alignment_gate is None:
            return
        self._check_input(images)
        images = images.clamp(-INPUT_LIMIT, INPUT_LIMIT)
        self.alignment_gate.update(images, self.align_images(images, gated=False)[0])

    def extract_features(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Run both coarse alignments and the backbone.

        Args:
            images (torch.Tensor): Input images, shape ``(B, 3, H, W)``.

        Returns:
            tuple: ``features`` (per layer, in its own frame, ``(B, C_k, h_k, w_k)``), ``thetas`` (per layer, the
            transform of its stage, ``(B, 2, 3)``, identity when feature alignment is off) and the aligned
            images ``(B, 3, H, W)`` with the image transform appended to ``thetas`` first.

        """
        self._check_input(images)
        aligned, image_theta = self.align_images(images.clamp(-INPUT_LIMIT, INPUT_LIMIT))
        features = self.feature_extractor(aligned.contiguous(memory_format=torch.channels_last))
        if self.feature_transformers is None:
            thetas = [identity_theta(images.shape[0], images.device, images.dtype)] * len(features)
        else:
            thetas = [transformer.pop_theta() for transformer in self.feature_transformers.values()]
        return features, [image_theta, *thetas], aligned

    def _check_input(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            msg = (
                f"FocusDist expects RGB image batches of shape (B, 3, H, W), got {tuple(images.shape)}: convert "
                "grayscale or RGBA images to RGB first (anomalib's datasets read images as RGB)."
            )
            raise ValueError(msg)
        if min(images.shape[-2:]) < self.min_input_size:
            msg = (
                f"Input {tuple(images.shape[-2:])} is smaller than the backbone's stride {self.min_input_size}: "
                f"resize images to at least {self.min_input_size}x{self.min_input_size} "
                "(the default pre-processor resizes to 256)."
            )
            raise ValueError(msg)
        if not torch.compiler.is_exporting() and not torch.isfinite(images).all():
            msg = (
                "The image batch contains NaN or Inf values: check the image files and the pre-processing "
                "(e.g. a Normalize with a zero std)."
            )
            raise ValueError(msg)

    def scoring_embedding(
        self, features: list[torch.Tensor], thetas: list[torch.Tensor], size: tuple[int, int]
    ) -> torch.Tensor:
        """Resample every layer into the deepest frame on the scoring grid and concatenate the kept channels.

        Args:
            features (list[torch.Tensor]): Per layer, ``(B, C_k, h_k, w_k)`` in its own frame.
            thetas (list[torch.Tensor]): The image transform followed by the per-stage transforms, ``(B, 2, 3)``.
            size (tuple[int, int]): The scoring grid ``(h, w)``.

        Returns:
            torch.Tensor: Embedding, shape ``(B, n_features, h, w)``.

        """
        stage_thetas = thetas[1:]
        to_deepest = identity_theta(features[0].shape[0], features[0].device, features[0].dtype)
        resampled: list[torch.Tensor] = []
        for index in range(len(features) - 1, -1, -1):  # deepest first, composing the later stages' warps
            layer_features = features[index]
            if self.local_aggregation > 1:
                layer_features = F.avg_pool2d(
                    layer_features,
                    self.local_aggregation,
                    stride=1,
                    padding=self.local_aggregation // 2,
                    count_include_pad=False,
                )
            resampled.insert(0, warp(layer_features, to_deepest, size=size, padding_mode="border"))
            to_deepest = compose_theta(stage_thetas[index], to_deepest)
        embedding = torch.cat(resampled, dim=1)
        return embedding.index_select(1, self.feature_index)

    @staticmethod
    def _at_most_grid(features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Average-pool maps finer than the scoring grid down to it.

        Locations are only scored on the grid, so aligning finer than it buys nothing, and the 1x1 heads on a
        stride-4 map would cost more than the backbone itself.
        """
        if features.shape[-2] <= grid[0] and features.shape[-1] <= grid[1]:
            return features
        return F.adaptive_avg_pool2d(features, grid)

    def total_theta(self, thetas: list[torch.Tensor]) -> torch.Tensor:
        """Compose the image transform and all stage transforms: deepest frame to input frame, ``(B, 2, 3)``."""
        total = thetas[0]
        for theta in thetas[1:]:
            total = compose_theta(total, theta)
        return total

    def grid_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """Return the scoring grid ``(h, w)`` for an input size ``(H, W)``."""
        return (max(image_size[0] // self.map_stride, 1), max(image_size[1] // self.map_stride, 1))

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scoring embedding of images and their total transform.

        Args:
            images (torch.Tensor): Input images, shape ``(B, 3, H, W)``.

        Returns:
            tuple[torch.Tensor, torch.Tensor]: Embedding ``(B, n_features, h, w)`` and total transform ``(B, 2, 3)``.

        """
        features, thetas, _ = self.extract_features(images)
        return self.scoring_embedding(features, thetas, self.grid_size(images.shape[-2:])), self.total_theta(thetas)

    def forward(self, images: torch.Tensor) -> TrainingOutput | InferenceBatch:
        """Training: what the loss needs. Evaluation: anomaly scores and maps.

        Args:
            images (torch.Tensor): Input images, shape ``(B, 3, H, W)``.

        Returns:
            TrainingOutput | InferenceBatch: In training mode the NCL pairs and aligned images; in evaluation
            mode ``pred_score`` ``(B,)`` and ``anomaly_map`` ``(B, 1, H, W)``.

        """
        if self.training:
            features, _, aligned = self.extract_features(images)
            pairs = {}
            if self.ncl_heads is not None:
                grid = self.grid_size(images.shape[-2:])
                pairs = {
                    layer: self.ncl_heads[_layer_key(layer)](self._at_most_grid(feature, grid))
                    for layer, feature in zip(self.layers, features, strict=True)
                }
            return TrainingOutput(
                ncl_pairs=pairs, aligned_images=aligned if self.image_transformer is not None else None
            )

        if not self.gaussian.is_fitted:
            msg = "FocusDist has no fitted statistics yet: train it (engine.fit) or load a trained checkpoint first."
            raise RuntimeError(msg)
        embedding, theta = self.embed(images)
        expected = self.gaussian.mean.shape[0]
        if embedding.shape[-1] * embedding.shape[-2] != expected:
            msg = (
                f"Input {tuple(images.shape[-2:])} gives a {tuple(embedding.shape[-2:])} scoring grid, but the model "
                f"was fitted on {expected} locations: feed images of the training size (the pre-processor's Resize)."
            )
            raise ValueError(msg)
        distance = self.gaussian.mahalanobis(embedding)
        anomaly_map = self.anomaly_map_generator(distance, theta, images.shape[-2:])
        pred_score = anomaly_map.amax(dim=(-3, -2, -1))
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)
