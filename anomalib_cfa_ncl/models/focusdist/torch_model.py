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

from collections.abc import Callable, Iterable, Iterator
from functools import partial

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import InferenceBatch
from torch import nn

from .alignment import (
    AlignedFeatures,
    SimilarityTransformer,
    compose_theta,
    feature_transformer,
    identity_theta,
    resize,
    warp,
)
from .anomaly_map import AnomalyMapGenerator
from .arguments import check_model_arguments
from .backbone import NonFiniteImages, checked_images, create_feature_extractor, feature_module
from .gate import AlignmentGate, Reduce, ScoringChoice, choose_scoring
from .gaussian import StreamingGaussian, channel_subset
from .loss import NCLHead, TrainingOutput, at_most_grid
from .patch_bank import PatchBank
from .pooling import GridPooling
from .synthetic_defects import PixelNormalization


def _layer_key(layer: str) -> str:
    """Module-dict key for a layer name (``ModuleDict`` keys cannot contain dots)."""
    return layer.replace(".", "_")


def _per_layer(layers: list[str], channels: list[int], make: Callable[[int], nn.Module]) -> nn.ModuleDict:
    """One module per layer, made from the layer's number of channels."""
    return nn.ModuleDict({_layer_key(layer): make(dim) for layer, dim in zip(layers, channels, strict=True)})


class FocusDistModel(nn.Module):
    """FocusDist torch model.

    Args:
        backbone (str): timm model name.
        layers (list[str]): Feature layers, shallow to deep.
        pre_trained (bool): Start from ImageNet weights.
        backbone_weights (str | None): Local weights file used instead of the download.
        n_features (int | None): Channels kept for the Gaussian (a fixed random subset); ``None`` keeps all.
        image_alignment (bool): Image-level coarse alignment (spatial transformer on the input).
        image_alignment_gate (bool): Use the image alignment in evaluation only where it scores held-back training
            images with synthetic anomalies better than the input frame (:mod:`.gate`); ``False`` always uses it.
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
        covariance_shrinkage (float): Weight of the mean covariance over all locations in each location's, used
            where it scores held-back training images with synthetic anomalies better than none (:mod:`.gate`);
            ``0`` keeps each location's own covariance.
        distance_calibration (bool): Divide each location's distance by the mean distance of held-back normal
            training images there (:mod:`.gate`), so that the border, where normal images score higher, does not
            decide the image score.
        blur_sigma (float): Standard deviation of the anomaly-map blur, in input pixels.
        grid_pooling (int): Odd side of a second average pooling of the scoring embedding (a coarser map), used
            where it scores held-back training images with synthetic anomalies better than none (:mod:`.gate`);
            ``1`` never pools.
        patch_bank (int): Number of k-means centres of training patches whose nearest one gives each location's
            distance (:mod:`.patch_bank`), used instead of the Gaussian or joined to it where that scores held-back
            training images with synthetic anomalies better (:mod:`.gate`); ``0`` never builds one.

    Example:
        >>> model = FocusDistModel(backbone="resnet18", pre_trained=False, feature_alignment=True, ncl=True)
        >>> output = model(torch.rand(2, 3, 256, 256))  # training mode: what the loss needs
        >>> sorted(output.ncl_pairs), output.aligned_images.shape
        (['layer1', 'layer2', 'layer3'], torch.Size([2, 3, 256, 256]))

    """

    def __init__(
        self,
        backbone: str = "resnet18",
        layers: list[str] | None = None,
        pre_trained: bool = True,
        backbone_weights: str | None = None,
        n_features: int | None = 176,
        image_alignment: bool = True,
        image_alignment_gate: bool = True,
        feature_alignment: bool = False,
        ncl: bool = False,
        map_stride: int = 8,
        local_aggregation: int = 3,
        projection_dim: int = 128,
        regularization: float = 0.01,
        statistics_neighbourhood: int = 3,
        statistics_dtype: str = "float16",
        covariance_shrinkage: float = 0.3,
        distance_calibration: bool = True,
        blur_sigma: float = 4.0,
        grid_pooling: int = 1,
        patch_bank: int = 4096,
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
        check_model_arguments(backbone, map_stride, regularization, n_features, sum(channels), grid_pooling)
        self.min_input_size = max(self.feature_extractor.feature_info.reduction())

        self.image_transformer = SimilarityTransformer(3) if image_alignment else None
        self.alignment_gate = AlignmentGate() if image_alignment and image_alignment_gate else None
        self.feature_transformers = _per_layer(layers, channels, feature_transformer) if feature_alignment else None
        self.ncl_heads = _per_layer(layers, channels, partial(NCLHead, projection_dim=projection_dim)) if ncl else None
        if self.feature_transformers is not None:  # FCA: a forward hook warps each selected stage's output
            for layer in layers:
                hook = self.feature_transformers[_layer_key(layer)].warp_output_hook
                feature_module(self.feature_extractor, layer).register_forward_hook(hook)
        self.register_buffer("feature_index", channel_subset(sum(channels), n_features))
        self.feature_index: torch.Tensor
        self.grid_pooling = GridPooling(grid_pooling)  # the candidate; grid_pooling.enabled is the decision
        self.covariance_shrinkage = covariance_shrinkage  # the candidate; gaussian.shrinkage is the one chosen
        self.distance_calibration = distance_calibration
        statistics = (regularization, statistics_dtype, statistics_neighbourhood, covariance_shrinkage)
        self.gaussian = StreamingGaussian(*statistics)  # checks the numbers now, before any training
        self.patch_bank = PatchBank(patch_bank)  # the candidate; built (non-empty) only where the gate chose it
        self.anomaly_map_generator = AnomalyMapGenerator(blur_sigma)
        NonFiniteImages().attach(self)  # evaluation: an image with NaN/Inf pixels scores as anomalous, alone
        # Lightning 2.6 starts fitting in whatever mode the modules are in, so freeze BatchNorm now, not on .train()
        self.train()

    def train(self, mode: bool = True) -> FocusDistModel:
        """Set the training mode, keeping the backbone's BatchNorm statistics frozen (fine-tuning)."""
        super().train(mode)
        for module in self.feature_extractor.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def align_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image-level coarse alignment.

        Args:
            images (torch.Tensor): Input images, shape ``(B, 3, H, W)``.

        Returns:
            tuple[torch.Tensor, torch.Tensor]: The aligned images ``(B, 3, H, W)`` and the transforms
            ``(B, 2, 3)`` (identity when image alignment is off).

        """
        return self._align_images(images, self._aligns_images())

    def _aligns_images(self) -> bool:
        """Whether this pass predicts and applies an image transform: not in the input frame the gate chose."""
        if self.image_transformer is None or self.alignment_gate is None or self.training:
            return self.image_transformer is not None
        return not self.alignment_gate.chose_input_frame()

    def _align_images(self, images: torch.Tensor, aligns: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`align_images` with the decision ``aligns`` of :meth:`_aligns_images` taken once by the caller."""
        if not aligns:
            return images, identity_theta(images.shape[0], images.device, images.dtype)
        theta = self.image_transformer(images)
        if not self.training and self.alignment_gate is not None:  # the gate's decision (gate.py)
            theta = self.alignment_gate(theta)
        return warp(images, theta, padding_mode="reflection"), theta

    def extract_features(self, images: torch.Tensor) -> AlignedFeatures:
        """Run the image-level alignment, then the backbone with the feature-level alignment of every stage.

        Args:
            images (torch.Tensor): Input images, shape ``(B, 3, H, W)``.

        Returns:
            AlignedFeatures: The features of every layer and the transforms that produced them.

        """
        aligns_images = self._aligns_images()  # read once: on a GPU each read of the gate's decision synchronises
        aligned, image_theta = self._align_images(
            checked_images(images, self.min_input_size, self.map_stride), aligns_images
        )
        # Feature-level alignment runs inside this call: a forward hook on each selected stage warps the stage's
        # output before the next stage consumes it (timm backbones share no stage-by-stage interface, so hooks
        # keep every one of them working). Each transformer keeps the transform it applied, collected below.
        features = self.feature_extractor(aligned.contiguous(memory_format=torch.channels_last))
        if self.feature_transformers is None:
            stage_thetas = [identity_theta(images.shape[0], images.device, images.dtype)] * len(features)
        else:
            stage_thetas = [transformer.pop_theta() for transformer in self.feature_transformers.values()]
        moved = aligns_images or self.feature_transformers is not None
        return AlignedFeatures(features, image_theta, stage_thetas, aligned, moved)

    def scoring_embedding(self, aligned: AlignedFeatures, size: tuple[int, int]) -> torch.Tensor:
        """Resample every layer into the deepest frame on the scoring grid and concatenate the kept channels.

        Args:
            aligned (AlignedFeatures): The features of every layer, each in its own frame, and their transforms.
            size (tuple[int, int]): The scoring grid ``(h, w)``.

        Returns:
            torch.Tensor: Embedding, shape ``(B, n_features, h, w)``, pooled over the grid where that was chosen.

        """
        features = aligned.features
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
            if aligned.moved:
                resampled.insert(0, warp(layer_features, to_deepest, size=size, padding_mode="border"))
            else:  # the identity warp, without the sampling grid (:func:`.alignment.resize`)
                resampled.insert(0, resize(layer_features, size))
            to_deepest = compose_theta(aligned.stage_thetas[index], to_deepest)
        return self.grid_pooling(torch.cat(resampled, dim=1).index_select(1, self.feature_index))

    def grid_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """Return the scoring grid ``(h, w)`` for an input size ``(H, W)``."""
        return (max(image_size[0] // self.map_stride, 1), max(image_size[1] // self.map_stride, 1))

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scoring embedding of images and their total transform.

        Args:
            images (torch.Tensor): Input images, shape ``(B, 3, H, W)``.

        Returns:
            tuple[torch.Tensor, torch.Tensor | None]: Embedding ``(B, n_features, h, w)`` and total transform
            ``(B, 2, 3)``; ``None`` when nothing was moved (the map then returns to the input's pixels by a resize).

        """
        aligned = self.extract_features(images)
        embedding = self.scoring_embedding(aligned, self.grid_size(images.shape[-2:]))
        return embedding, aligned.total_theta() if aligned.moved else None

    def _training_output(self, images: torch.Tensor) -> TrainingOutput:
        """What the losses need. Without NCL nothing trains through the features, so the backbone is not run."""
        if self.ncl_heads is None:
            images = checked_images(images, self.min_input_size, self.map_stride)
            aligned_images = self.align_images(images)[0] if self.image_transformer is not None else None
            return TrainingOutput(ncl_pairs={}, aligned_images=aligned_images)
        aligned = self.extract_features(images)
        grid = self.grid_size(images.shape[-2:])
        pairs = {
            layer: self.ncl_heads[_layer_key(layer)](at_most_grid(feature, grid))
            for layer, feature in zip(self.layers, aligned.features, strict=True)
        }
        images_out = aligned.aligned_images if self.image_transformer is not None else None
        return TrainingOutput(ncl_pairs=pairs, aligned_images=images_out)

    def fit_statistics(
        self,
        batches: Iterable[torch.Tensor],
        reduce: Reduce | None = None,
        normalization: PixelNormalization | None = None,
    ) -> None:
        """Fit what scoring needs from the training images: the alignment gate's decision, then the Gaussian.

        Two passes over ``batches``: the input or the aligned frame, with or without the grid pooling and covariance
        shrinkage, and the Gaussian, the patch bank or both joined, compared on held-back images, which also give the
        distance calibration (:func:`.gate.choose_scoring`); then the Gaussian (and the bank, where chosen) is fitted
        on all images as chosen. One pass when there is nothing to choose or calibrate.
        Runs in evaluation mode without gradients and restores the training mode.

        Args:
            batches (Iterable[torch.Tensor]): Pre-processed training images without augmentation, ``(B, 3, H, W)``
                per batch; iterated twice, so a list or a ``DataLoader``, not a generator.
            reduce (Callable | None): Sums a tensor over processes when each process passes its share of the
                images (distributed training); ``None`` in a single process.
            normalization (PixelNormalization | None): The per-channel mean and std ``(3,)`` the images were
                normalised with, so that the gate draws its synthetic defects in pixel values
                (:func:`.synthetic_defects.anomalous_copies`); ``None`` for images in pixel values.

        Raises:
            TypeError: If ``batches`` can be iterated only once.
            ValueError: If there is no image (in some process, when ``reduce`` is given).

        """
        if isinstance(batches, Iterator):
            msg = "fit_statistics iterates the training images twice: pass a list or a DataLoader, not a generator."
            raise TypeError(msg)
        was_training = self.training
        self.eval()
        # not in inference mode: the fitted buffers must stay ordinary tensors that later training can update
        with torch.inference_mode(False), torch.no_grad():
            choice = choose_scoring(self, batches, reduce, normalization) if self._has_choices() else ScoringChoice()
            self.gaussian.reset()
            self.patch_bank.clear()
            for images in batches:
                embedding = self.embed(images)[0]
                self.gaussian.update(embedding)
                if choice.bank is not None:
                    self.patch_bank.update(embedding)
            _check_every_process_saw_images(self.gaussian.running_sum is not None, reduce)
            self.gaussian.finalize(reduce)
            if choice.gaussian_scale is not None:
                self.gaussian.calibrate(choice.gaussian_scale)
            if choice.bank is not None:
                self.patch_bank.finalize()
                if choice.bank.scale is not None:
                    self.patch_bank.calibrate(choice.bank.scale)
                if choice.bank.joint_weights is not None:
                    self.patch_bank.join(*choice.bank.joint_weights)
        self.train(was_training)

    def _has_choices(self) -> bool:
        """Whether fitting the statistics has something to choose or calibrate on held-back images first."""
        return (
            self.alignment_gate is not None
            or self.grid_pooling.is_candidate
            or self.covariance_shrinkage > 0
            or self.distance_calibration
            or self.patch_bank.is_candidate
        )

    def forward(self, images: torch.Tensor) -> TrainingOutput | InferenceBatch:
        """Training: what the loss needs. Evaluation: anomaly scores and maps.

        Args:
            images (torch.Tensor): Input images, shape ``(B, 3, H, W)``.

        Returns:
            TrainingOutput | InferenceBatch: In training mode the NCL pairs and aligned images; in evaluation
            mode ``pred_score`` ``(B,)`` and ``anomaly_map`` ``(B, 1, H, W)``.

        """
        if self.training:
            return self._training_output(images)

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
        distance = self.distance(embedding)
        anomaly_map = self.anomaly_map_generator(distance, theta, images.shape[-2:])
        pred_score = anomaly_map.amax(dim=(-3, -2, -1))
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)

    def distance(self, embedding: torch.Tensor) -> torch.Tensor:
        """Each location's distance by the scorer the gate chose: the Gaussian, the patch bank, or both joined.

        Python branches on the bank's buffer shapes: an exported graph holds only the chosen scorers.

        Args:
            embedding (torch.Tensor): Scoring embedding, shape ``(B, D, h, w)``.

        Returns:
            torch.Tensor: Distances, shape ``(B, h, w)``.

        """
        if not self.patch_bank.is_fitted:
            return self.gaussian.mahalanobis(embedding)
        if not self.patch_bank.joins_gaussian:
            return self.patch_bank.distance(embedding)
        return self.patch_bank.joined(self.gaussian.mahalanobis(embedding), self.patch_bank.distance(embedding))


def _check_every_process_saw_images(saw_images: bool, reduce: Reduce | None) -> None:
    """Stop before a collective reduce that a process without images could not join."""
    if reduce is not None and not saw_images:
        msg = "Each process needs at least one training image: use fewer devices than training images."
        raise ValueError(msg)
