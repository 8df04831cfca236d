"""FocusDist as an anomalib model: training loop, statistics fit and the anomalib components.

Example:
    >>> from anomalib.data import MVTecAD
    >>> from anomalib.engine import Engine
    >>> from anomalib_cfa_ncl import FocusDist
    >>> model = FocusDist()  # fetches ImageNet weights for its backbone  # doctest: +SKIP
    >>> datamodule = MVTecAD(category="bottle")
    >>> engine = Engine()
    >>> engine.fit(model=model, datamodule=datamodule)  # doctest: +SKIP
    >>> engine.test(model=model, datamodule=datamodule)  # doctest: +SKIP

"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.visualization import Visualizer
from kornia.augmentation import RandomAffine
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms as v1
from torchvision.transforms import v2

from .checkpoint import check_checkpoint, checkpoint_file, upgrade_checkpoint
from .export import ExportChecks, check_input_grid
from .loss import FocusDistLoss
from .post_processor import FocusDistPostProcessor
from .synthetic_defects import PixelNormalization
from .torch_model import FocusDistModel
from .visualization import AlignmentVisualizer

logger = logging.getLogger(__name__)

__all__ = ["FocusDist"]

DEFAULT_MAX_EPOCHS = 5
LIGHTNING_FALLBACK_MAX_EPOCHS = 1000  # what Lightning uses when neither max_epochs nor max_steps is set
# pose augmentation of the training images (RandomAffine), well within the transformer's bounds: degrees, shift, zoom
POSE_DEGREES = 15.0
POSE_SHIFT = 0.05
POSE_ZOOM = (0.95, 1.05)


class FocusDist(ExportChecks, AnomalibModule):
    """FocusDist: coarse-to-fine non-contrastive learning for anomaly detection and localisation.

    By default a spatial transformer learns to align the training images (the paper's ICA loss; no backbone pass
    in training), then a Gaussian per location is fitted on the frozen backbone's features in the frame the
    alignment gate chooses. The paper's feature-level alignment and fine alignment (dense non-contrastive learning
    that fine-tunes the backbone) are switches (``feature_alignment``, ``ncl``). Without
    ``--trainer.max_epochs`` (or ``max_steps``) it trains ``DEFAULT_MAX_EPOCHS`` = 5 epochs (1 when nothing trains).

    Args:
        backbone (str): timm model name. Defaults to ``"resnet18"``.
        layers (list[str]): Feature layers, shallow to deep. Defaults to ``["layer1", "layer2", "layer3"]``.
        pre_trained (bool): Start from ImageNet weights. Defaults to ``True``.
        backbone_weights (str | None): Local weights file (``.safetensors`` or ``.pth``, timm key names) used
            instead of the download, for machines without internet. Defaults to ``None``.
        n_features (int | None): Channels kept for the Gaussian (a fixed random subset; ``None``: all); 176 keeps
            the statistics at 63 MB for a 256x256 input. Defaults to ``176``.
        image_alignment (bool): Image-level coarse alignment. Defaults to ``True``.
        image_alignment_gate (bool): After training, the image alignment is used only if it scores held-back
            training images with synthetic anomalies better than the input frame (textures have no canonical pose;
            the log says which frame was chosen). ``False`` always uses it. Defaults to ``True``.
        feature_alignment (bool): Feature-level coarse alignment (learns only through NCL). Defaults to ``False``.
        ncl (bool): Fine alignment by the non-contrastive loss (off: the backbone stays as pre-trained). Off by
            default: on the development benchmark it did not pay beyond noise (see the model README).
            Defaults to ``False``.
        pose_augmentation (bool): Random similarity transforms of the training images, so the image-level
            alignment has misalignment to undo (used only with ``image_alignment``). Defaults to ``True``.
        ica_weight (float): Weight of the image-alignment loss. Defaults to ``1.0``.
        lr (float): Learning rate of the transformers and NCL heads. Defaults to ``1e-3``.
        backbone_lr (float): Learning rate of the backbone; larger rates collapse the features towards
            invariance. Defaults to ``1e-5``.
        map_stride (int): Stride of the scoring grid. Defaults to ``8``.
        local_aggregation (int): Neighbourhood pooled into each location before scoring. Defaults to ``3``.
        projection_dim (int): Width of the NCL projector. Defaults to ``128``.
        regularization (float): Covariance ridge relative to the mean feature variance. Defaults to ``0.01``.
        statistics_neighbourhood (int): Each location's Gaussian is fitted on the samples of this square of
            neighbouring locations (9x the samples at 3; ``1``: its own only). Defaults to ``3``.
        statistics_dtype (str): Precision matrices stored as ``"float16"`` or ``"float32"``. Defaults to ``"float16"``.
        covariance_shrinkage (float): Weight of the mean covariance over all locations in every location's covariance,
            used only where it scores held-back training images with synthetic anomalies better than each location's
            own (it helps textures, whose positions are exchangeable); ``0`` never shrinks. Defaults to ``0.3``.
        distance_calibration (bool): Divide each location's distance by the mean distance of held-back normal
            training images there, so that the border, where normal images score higher, does not decide the image
            score. Defaults to ``True``.
        blur_sigma (float): Standard deviation of the anomaly-map blur, in input pixels. Defaults to ``4.0``.
        grid_pooling (int): Odd side of a second average pooling of the scoring embedding (a coarser map), used only
            where it scores held-back training images with synthetic anomalies better than none; ``1`` never pools.
            Off by default: it raised pixel AUROC and lowered image AUROC on the development benchmark's textures
            (docs/benchmarks.md). Defaults to ``1``.
        patch_bank (int): Number of k-means centres of training patches (of a bounded uniform sample) whose nearest
            one gives each location's distance, used instead of the Gaussian or joined to it where that scores
            held-back training images with synthetic anomalies better (textures, whose patches have many modes per
            location); ``0`` never builds one (the fit is then faster). Defaults to ``4096``.
        pre_processor (nn.Module | bool): Pre-processor, or ``True`` for the default (resize to 256, normalise).
        post_processor (nn.Module | bool): Post-processor, or ``True`` for the default.
        evaluator (Evaluator | bool): Evaluator, or ``True`` for the default metrics.
        visualizer (Visualizer | bool): Visualizer, or ``True`` for the default.

    Example:
        >>> model = FocusDist(backbone="resnet18", pre_trained=False)
        >>> model.learning_type.value
        'one_class'

    """

    # Callbacks of every FocusDist run, beside anomalib's. anomalib_cfa_ncl appends its dataset checks
    # (anomalib_cfa_ncl.data.checks) when imported, so this folder imports nothing else of the package.
    run_callbacks: ClassVar[list[type[Callback]]] = [AlignmentVisualizer]

    def __init__(
        self,
        backbone: str = "resnet18",
        layers: list[str] = ["layer1", "layer2", "layer3"],  # noqa: B006
        pre_trained: bool = True,
        backbone_weights: str | None = None,
        n_features: int | None = 176,
        image_alignment: bool = True,
        image_alignment_gate: bool = True,
        feature_alignment: bool = False,
        ncl: bool = False,
        pose_augmentation: bool = True,
        ica_weight: float = 1.0,
        lr: float = 1e-3,
        backbone_lr: float = 1e-5,
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
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.model = FocusDistModel(
            backbone=backbone,
            layers=layers,
            pre_trained=pre_trained,
            backbone_weights=backbone_weights,
            n_features=n_features,
            image_alignment=image_alignment,
            image_alignment_gate=image_alignment_gate,
            feature_alignment=feature_alignment,
            ncl=ncl,
            map_stride=map_stride,
            local_aggregation=local_aggregation,
            projection_dim=projection_dim,
            regularization=regularization,
            statistics_neighbourhood=statistics_neighbourhood,
            statistics_dtype=statistics_dtype,
            covariance_shrinkage=covariance_shrinkage,
            distance_calibration=distance_calibration,
            blur_sigma=blur_sigma,
            grid_pooling=grid_pooling,
            patch_bank=patch_bank,
        )
        self.loss = FocusDistLoss(ica_weight=ica_weight)
        self.lr = lr
        self.backbone_lr = backbone_lr
        self.augment = (
            RandomAffine(POSE_DEGREES, (POSE_SHIFT, POSE_SHIFT), POSE_ZOOM, padding_mode="reflection", p=1.0)
            if image_alignment and pose_augmentation
            else None
        )
        self._statistics_stale = False

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """Trainer arguments FocusDist needs: no sanity validation before the statistics exist."""
        return {"num_sanity_val_steps": 0}

    @property
    def learning_type(self) -> LearningType:
        """FocusDist learns from normal images only."""
        return LearningType.ONE_CLASS

    def default_max_epochs(self) -> int:
        """Epochs trained when neither ``max_epochs`` nor ``max_steps`` is given: one when nothing trains."""
        trains = self.model.image_transformer is not None or self.model.ncl_heads is not None
        return DEFAULT_MAX_EPOCHS if trains else 1

    def setup(self, stage: str) -> None:
        """Before any work: check the scoring grid; bound training without a length; validate after the last epoch."""
        check_input_grid(self.model, self.pre_processor)
        trainer = self._trainer
        fallback = trainer and trainer.max_steps == -1 and trainer.max_epochs == LIGHTNING_FALLBACK_MAX_EPOCHS
        if stage == "fit" and fallback:  # the Python API without max_epochs (the CLI sets them before Lightning)
            logger.info("FocusDist: no max_epochs given: training %d epochs.", self.default_max_epochs())
            trainer.fit_loop.max_epochs = self.default_max_epochs()
        if stage == "fit" and trainer and trainer.check_val_every_n_epoch == 1 and trainer.max_epochs not in (None, -1):
            # Every validation refits the statistics (gate and Gaussian: several passes over the training images)
            # and mid-training scores are not the trained model's, so validate once, after the last epoch
            # (a user's --trainer.check_val_every_n_epoch other than 1 is kept).
            trainer.check_val_every_n_epoch = trainer.max_epochs

    def configure_optimizers(self) -> torch.optim.Optimizer | None:
        """Adam with a small learning rate for the backbone and a larger one for the new modules."""
        backbone = [p for p in self.model.feature_extractor.parameters() if p.requires_grad]
        backbone_ids = {id(p) for p in backbone}
        heads = [p for p in self.model.parameters() if p.requires_grad and id(p) not in backbone_ids]
        groups = []
        if self.model.ncl_heads is not None:
            groups.append({"params": backbone, "lr": self.backbone_lr})
        if self.model.image_transformer is not None or self.model.ncl_heads is not None:
            groups.append({"params": heads, "lr": self.lr})
        return torch.optim.Adam(groups) if groups else None

    def configure_callbacks(self) -> list[Callback]:
        """Add the alignment view (each image beside its coarse alignment) and the ``run_callbacks`` to anomalib's."""
        return [*super().configure_callbacks(), *(callback() for callback in self.run_callbacks)]

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Align, extract features and compute the NCL and ICA losses of one batch."""
        del args, kwargs
        self._statistics_stale = True
        images = batch.image
        if self.augment is not None:
            images = self.augment(images)
        loss, parts = self.loss(*self.model(images))
        for name, value in parts.items():
            self.log(f"train_{name}", value, on_step=False, on_epoch=True, batch_size=images.shape[0])
        if loss is None:  # nothing to train: the statistics fit is all there is
            return None
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=images.shape[0])
        return loss

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Score a validation batch (anomalib collects the scores for thresholds and normalisation)."""
        del args, kwargs
        predictions = self.model(batch.image)
        return batch.update(**predictions._asdict())

    def on_validation_start(self) -> None:
        """Fit the statistics with the current weights before scoring."""
        self.fit_statistics_if_stale()

    def on_train_end(self) -> None:
        """Fit the statistics after the last epoch when no validation did."""
        self.fit_statistics_if_stale()

    def fit_statistics_if_stale(self) -> None:
        """Refit the statistics (alignment gate and Gaussian) when the network changed since the last fit."""
        if not self._statistics_stale:
            return
        reduce = None
        if self.trainer.world_size > 1:
            reduce = lambda tensor: self.trainer.strategy.reduce(tensor, reduce_op="sum")  # noqa: E731
        transform = getattr(self.pre_processor, "transform", None)
        images = TrainingImages(statistics_dataloader(self.trainer), transform, self.device)
        self.model.fit_statistics(images, reduce, pixel_normalization(transform))
        self._statistics_stale = False

    def configure_post_processor(self) -> FocusDistPostProcessor:
        """Anomalib's post-processor with thresholds halfway between two validation scores (:mod:`.post_processor`)."""
        return FocusDistPostProcessor()

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | Path, *args, **kwargs) -> FocusDist:  # type: ignore[override]
        """Load a FocusDist checkpoint, with a one-line error for a missing, corrupted or unsafe file.

        ``pre_trained`` defaults to ``False`` and ``backbone_weights`` to ``None``: the checkpoint holds every weight
        (no download, no weights file needed). Other arguments are :meth:`AnomalibModule.load_from_checkpoint`'s.
        """
        kwargs.setdefault("pre_trained", False)
        kwargs.setdefault("backbone_weights", None)
        return super().load_from_checkpoint(checkpoint_file(checkpoint_path), *args, **kwargs)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse another model's checkpoint before its weights are loaded (every way of loading passes here)."""
        check_checkpoint(checkpoint)
        upgrade_checkpoint(checkpoint)
        super().on_load_checkpoint(checkpoint)


class TrainingImages:
    """Pre-processed training images, batch by batch, iterable as often as needed (the statistics fit reads twice)."""

    def __init__(self, loader: DataLoader, transform: nn.Module | None, device: torch.device) -> None:
        self.loader, self.transform, self.device = loader, transform, device

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Yield the images of each batch on the device, through the pre-processor's transform: ``(B, 3, H, W)``."""
        for batch in self.loader:
            images = batch.image.to(self.device)
            yield self.transform(images) if self.transform is not None else images


def pixel_normalization(transform: nn.Module | None) -> PixelNormalization | None:
    """The per-channel mean and std of the ``Normalize`` steps in a pre-processor's transform, composed.

    The gate draws its synthetic defects in pixel values (:func:`.synthetic_defects.anomalous_copies`), so it takes
    the training images back through the normalisation that the pre-processor applied.

    Args:
        transform (nn.Module | None): The pre-processor's transform (a torchvision ``Compose``, nested or not).

    Returns:
        PixelNormalization | None: ``(mean, std)``, each ``(C,)``, such that normalised = (pixels - mean) / std;
        ``None`` when the transform does not normalise.

    Example:
        >>> from torchvision.transforms import v2
        >>> pixel_normalization(v2.Compose([v2.Resize(256), v2.Normalize([0.5] * 3, [0.25] * 3)]))
        (tensor([0.5000, 0.5000, 0.5000]), tensor([0.2500, 0.2500, 0.2500]))

    """
    mean, std = torch.zeros(()), torch.ones(())
    steps = [(torch.as_tensor(step.mean), torch.as_tensor(step.std)) for step in _normalize_steps(transform)]
    for step_mean, step_std in steps:  # (x - M) / S, then (. - m) / s  =  (x - (M + m S)) / (S s)
        mean, std = mean + step_mean * std, std * step_std
    return (mean.float(), std.float()) if steps else None


def _normalize_steps(transform: nn.Module | None) -> Iterator[v1.Normalize | v2.Normalize]:
    """The ``Normalize`` transforms in ``transform``, in the order they are applied.

    anomalib's ``extract_transforms_by_type`` looks one ``Compose`` deep; this also finds a nested one's steps.
    """
    if isinstance(transform, v1.Normalize | v2.Normalize):
        yield transform
    elif isinstance(transform, v1.Compose | v2.Compose):
        for step in transform.transforms:
            yield from _normalize_steps(step)


def statistics_dataloader(trainer: Trainer) -> DataLoader:
    """The training images without shuffling, split across processes without padding (so the sums stay exact)."""
    loader = trainer.train_dataloader
    if loader is None:
        msg = "FocusDist fits its statistics on the training images: call engine.fit with a training set."
        raise RuntimeError(msg)
    if len(loader.dataset) < trainer.world_size:
        msg = f"FocusDist fits its statistics in every process: use at most {len(loader.dataset)} devices."
        raise ValueError(msg)
    sampler = UnrepeatedDistributedSampler(loader.dataset, trainer.world_size, trainer.global_rank, shuffle=False)
    batch_size, workers = loader.batch_size or 1, loader.num_workers
    return DataLoader(loader.dataset, batch_size, sampler=sampler, num_workers=workers, collate_fn=loader.collate_fn)
