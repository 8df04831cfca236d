"""FocusDist as an anomalib model: training loop, statistics fit and the anomalib components.

Example:
    >>> from anomalib.data import MVTecAD
    >>> from anomalib.engine import Engine
    >>> from anomalib_cfa_ncl import FocusDist
    >>> engine = Engine()
    >>> engine.fit(model=FocusDist(), datamodule=MVTecAD(category="bottle"))  # doctest: +SKIP
    >>> engine.test(model=model, datamodule=datamodule)  # doctest: +SKIP

"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import AnomalibDataModule, Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.utils.serialization import anomalib_safe_globals
from anomalib.visualization import Visualizer
from kornia.augmentation import RandomAffine
from lightning.pytorch import Callback
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn
from torch.utils.data import DataLoader, Subset

from anomalib_cfa_ncl.data.convert import check_image_files

from ...visualization import AlignmentVisualizer
from .export import check_export_input_size, quantize_feature_network
from .loss import FocusDistLoss
from .torch_model import FocusDistModel

logger = logging.getLogger(__name__)

__all__ = ["FocusDist"]

# a key only a FocusDist checkpoint has: it tells our checkpoints from other models' ones
SIGNATURE_KEY = "model.gaussian.precision_scale"
DEFAULT_MAX_EPOCHS = 5
LIGHTNING_FALLBACK_MAX_EPOCHS = 1000  # what Lightning uses when neither max_epochs nor max_steps is set


class FocusDist(AnomalibModule):
    """FocusDist: coarse-to-fine non-contrastive learning for anomaly detection and localisation.

    Training fine-tunes the backbone with the dense non-contrastive loss while spatial transformers align the
    images (ICA loss) and the features of each selected stage; afterwards a Gaussian per location is fitted on
    the aligned training features in one streaming pass. Without ``--trainer.max_epochs`` (or ``max_steps``)
    it trains for ``DEFAULT_MAX_EPOCHS`` = 5 epochs, a few minutes per MVTec category on a CPU.

    Args:
        backbone (str): timm model name. Defaults to ``"resnet18"``.
        layers (list[str]): Feature layers, shallow to deep. Defaults to ``["layer1", "layer2", "layer3"]``.
        pre_trained (bool): Start from ImageNet weights. Defaults to ``True``.
        backbone_weights (str | None): Local weights file (``.safetensors`` or ``.pth``, timm key names) used
            instead of the download, for machines without internet. Defaults to ``None``.
        n_features (int | None): Channels kept for the Gaussian (a fixed random subset; ``None`` keeps all).
            The default 176 keeps the statistics at 63 MB for a 256x256 input. Defaults to ``176``.
        image_alignment (bool): Image-level coarse alignment. Defaults to ``True``.
        image_alignment_min_gain (float): After training the image alignment is kept only if it reduces the
            training images' spread (their ICA loss) by at least this fraction; otherwise (textures, images
            already aligned) the identity is used. ``0`` always keeps it. Defaults to ``0.2``.
        feature_alignment (bool): Feature-level coarse alignment. Defaults to ``True``.
        ncl (bool): Fine alignment by the non-contrastive loss. Off, the backbone stays as pre-trained.
            Defaults to ``True``.
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
        statistics_dtype (str): Storage of the precision matrices, ``"float16"`` or ``"float32"``.
            Defaults to ``"float16"``.
        pre_processor (nn.Module | bool): Pre-processor, or ``True`` for the default (resize to 256, ImageNet
            normalisation).
        post_processor (nn.Module | bool): Post-processor, or ``True`` for the default.
        evaluator (Evaluator | bool): Evaluator, or ``True`` for the default metrics.
        visualizer (Visualizer | bool): Visualizer, or ``True`` for the default.

    Example:
        >>> model = FocusDist(backbone="resnet18", pre_trained=False)
        >>> model.learning_type.value
        'one_class'

    """

    def __init__(
        self,
        backbone: str = "resnet18",
        layers: list[str] = ["layer1", "layer2", "layer3"],  # noqa: B006
        pre_trained: bool = True,
        backbone_weights: str | None = None,
        n_features: int | None = 176,
        image_alignment: bool = True,
        image_alignment_min_gain: float = 0.2,
        feature_alignment: bool = True,
        ncl: bool = True,
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
            image_alignment_min_gain=image_alignment_min_gain,
            feature_alignment=feature_alignment,
            ncl=ncl,
            map_stride=map_stride,
            local_aggregation=local_aggregation,
            projection_dim=projection_dim,
            regularization=regularization,
            statistics_neighbourhood=statistics_neighbourhood,
            statistics_dtype=statistics_dtype,
        )
        self.loss = FocusDistLoss(ica_weight=ica_weight)
        self.lr = lr
        self.backbone_lr = backbone_lr
        self.augment = (
            RandomAffine(degrees=15.0, translate=(0.05, 0.05), scale=(0.95, 1.05), padding_mode="reflection", p=1.0)
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

    def setup(self, stage: str) -> None:
        """Refuse image files anomalib would misread, and bound training when no length was given."""
        trainer = self._trainer
        if trainer is None:
            return
        self._check_dataset_images(trainer.datamodule)
        if stage == "fit":
            self._check_training_set(trainer.datamodule)
        unbounded = trainer.max_steps == -1 and trainer.fit_loop.max_epochs == LIGHTNING_FALLBACK_MAX_EPOCHS
        if stage == "fit" and unbounded:
            logger.info("FocusDist: no max_epochs given, training %d epochs.", DEFAULT_MAX_EPOCHS)
            trainer.fit_loop.max_epochs = DEFAULT_MAX_EPOCHS

    @staticmethod
    def _check_training_set(datamodule: object) -> None:
        """Refuse an empty training set before the sampler fails with an obscure message."""
        train_data = getattr(datamodule, "train_data", None)
        if train_data is not None and len(train_data) == 0:
            root = getattr(datamodule, "root", None)
            category = getattr(datamodule, "category", None)
            where = f" in {Path(root) / category / 'train' / 'good'}" if root and category else ""
            msg = (
                f"The training set is empty: no normal image was found{where}. FocusDist learns from defect-free "
                "images only; put at least one (ideally 50 or more) there, or point --data.root/--data.category "
                "at the right folder."
            )
            raise ValueError(msg)

    @staticmethod
    def _check_dataset_images(datamodule: object) -> None:
        """Check the image files of the datamodule's datasets (file headers only, so it is cheap)."""
        for name in ("train_data", "val_data", "test_data"):
            samples = getattr(getattr(datamodule, name, None), "samples", None)
            if samples is not None and "image_path" in samples:
                check_image_files(samples["image_path"])

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
        """Add the alignment view (each image beside its coarse alignment) to anomalib's callbacks."""
        return [*super().configure_callbacks(), AlignmentVisualizer()]

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
        """Refit the Gaussian when the network changed since the last fit."""
        if self._statistics_stale:
            self.fit_statistics()

    def _statistics_dataloader(self) -> DataLoader:
        """Load the training images without shuffling, split across processes without padding (exact sums)."""
        loader = self.trainer.train_dataloader
        if loader is None:
            msg = "FocusDist fits its statistics on the training images: call engine.fit with a training set."
            raise RuntimeError(msg)
        dataset = loader.dataset
        rank, world = self.trainer.global_rank, self.trainer.world_size
        shard = Subset(dataset, range(rank, len(dataset), world))
        return DataLoader(
            shard,
            batch_size=loader.batch_size or 1,
            shuffle=False,
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
        )

    def _training_images(self) -> Iterator[torch.Tensor]:
        """This process's share of the training images, pre-processed, without augmentation."""
        for batch in self._statistics_dataloader():
            images = batch.image.to(self.device)
            if self.pre_processor is not None and getattr(self.pre_processor, "transform", None) is not None:
                images = self.pre_processor.transform(images)
            yield images

    def _check_every_process_saw_images(self, saw_images: bool) -> None:
        """Stop before a collective reduce that a process without images could not join."""
        if self.trainer.world_size > 1 and not saw_images:
            msg = "Each process needs at least one training image: use fewer devices than training images."
            raise ValueError(msg)

    def fit_statistics(self) -> None:
        """One streaming pass over the training images (no augmentation) to fit the per-location Gaussian."""
        was_training = self.model.training
        self.model.eval()
        gaussian = self.model.gaussian
        gaussian.reset()
        reduce = None
        if self.trainer.world_size > 1:
            reduce = lambda tensor: self.trainer.strategy.reduce(tensor, reduce_op="sum")  # noqa: E731
        with torch.inference_mode(False), torch.no_grad():
            gate = self.model.alignment_gate
            if gate is not None:  # the Gaussian is fitted in the frame the gate chooses
                for images in self._training_images():
                    self.model.measure_alignment(images)
                self._check_every_process_saw_images(bool(gate.sums))
                gate.finalize(reduce)
                logger.info(
                    "FocusDist: image alignment lowers the training images' spread by %.1f %% (kept from %.1f %%): %s.",
                    100 * gate.gain.item(),
                    100 * gate.min_gain,
                    "kept" if gate.enabled.item() else "identity used instead",
                )
            for images in self._training_images():
                gaussian.update(self.model.embed(images)[0])
            self._check_every_process_saw_images(gaussian.running_sum is not None)
            gaussian.finalize(reduce)
        self.model.train(was_training)
        self._statistics_stale = False

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | Path, *args, **kwargs) -> FocusDist:  # type: ignore[override]
        """Load a FocusDist checkpoint, with a one-line error for a corrupted file or another model's checkpoint.

        Args:
            checkpoint_path (str | Path): The ``.ckpt`` file.
            *args: Passed to :meth:`AnomalibModule.load_from_checkpoint`.
            **kwargs: Passed to :meth:`AnomalibModule.load_from_checkpoint` (e.g. ``map_location="cpu"``).
                ``pre_trained`` defaults to ``False``: the checkpoint holds every weight, so the ImageNet download
                (or the training machine's ``backbone_weights`` file) is not needed, e.g. on an offline machine.

        Returns:
            FocusDist: The restored model.
        """
        check_checkpoint(read_checkpoint(checkpoint_path), checkpoint_path)
        kwargs.setdefault("pre_trained", False)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse another model's checkpoint before its weights are loaded (``Engine(..., ckpt_path=...)``)."""
        check_checkpoint(checkpoint, "the checkpoint")
        super().on_load_checkpoint(checkpoint)

    def to_onnx(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        **kwargs: Any,
    ) -> Path:
        """Export to ONNX (also the first step of OpenVINO), first checking that ``input_size`` fits the statistics."""
        check_export_input_size(self.model, self.pre_processor, input_size)
        return super().to_onnx(export_root, model_file_name, input_size, **kwargs)

    @staticmethod
    def _post_training_quantization_ov(model: Any, datamodule: AnomalibDataModule | None = None) -> Any:
        """``INT8_PTQ`` on an OpenVINO model: only the feature network is quantised, the scoring stays in float."""
        return quantize_feature_network(model, datamodule)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint on the CPU (``weights_only=True``) with a one-line error for an unreadable file."""
    path = Path(path)
    if not path.is_file():
        msg = f"Checkpoint {str(path)!r} does not exist: give the path of a FocusDist .ckpt file."
        raise FileNotFoundError(msg)
    try:
        with anomalib_safe_globals():
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        msg = (
            f"Could not read checkpoint {str(path)!r} ({type(error).__name__}): the file is corrupted or not a "
            "PyTorch Lightning checkpoint; train again or copy the file again."
        )
        raise ValueError(msg) from error


def check_checkpoint(checkpoint: dict[str, Any], source: str | Path) -> None:
    """Raise a one-line error unless ``checkpoint`` holds a fitted FocusDist."""
    state = checkpoint.get("state_dict", {}) if isinstance(checkpoint, dict) else {}
    if SIGNATURE_KEY not in state:
        msg = (
            f"{source} is not a FocusDist checkpoint (it has no fitted FocusDist statistics): load it with the "
            "model class that wrote it, or train FocusDist first."
        )
        raise ValueError(msg)
