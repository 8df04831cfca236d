"""Coarse alignment for FocusDist: spatial transformers that predict bounded similarity transforms.

Transforms are kept as normalised ``(B, 2, 3)`` affine matrices in the convention of
:func:`torch.nn.functional.affine_grid`: an output location ``y`` (normalised to ``[-1, 1]``, pixel edges at
``+-1``, i.e. ``align_corners=False``) samples the input at ``theta @ [y, 1]``. Normalised coordinates do not
depend on the resolution, so the transform predicted on an image applies unchanged to any feature map of that
image, and the transforms of successive stages compose by matrix products. kornia builds, inverts and applies
them (:func:`kornia.geometry.transform.warp_affine` after converting to its pixel convention); its inverses are
closed-form while a graph is exported, which keeps the eval path exportable (ONNX has no matrix inverse).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812
from kornia.filters import gaussian_blur2d
from kornia.geometry.conversions import convert_affinematrix_to_homography, denormalize_homography
from kornia.geometry.transform import get_affine_matrix2d, invert_affine_transform, warp_affine
from torch import nn

from .precision import at_least_float32, full_precision

IMAGE_POOL_SIZE = 32
FEATURE_POOL_SIZE = 16  # feature-level transformers: smaller input, tighter bounds
FEATURE_MAX_ANGLE = math.pi / 8
FEATURE_MAX_SCALE = 1.1
FEATURE_MAX_SHIFT = 0.1
ICA_SIZE = 64  # side of the low-pass copy the ICA loss and the alignment gate compare
ICA_BLUR_KERNEL = 9  # Gaussian blur of that copy: kernel side and standard deviation, in input pixels
ICA_BLUR_SIGMA = 2.0


def low_pass_copy(images: torch.Tensor) -> torch.Tensor:
    """Blurred ``ICA_SIZE x ICA_SIZE`` copy of images, what the ICA loss and the alignment gate compare.

    Args:
        images (torch.Tensor): Images, shape ``(B, C, H, W)``.

    Returns:
        torch.Tensor: Low-pass copy in float32, shape ``(B, C, ICA_SIZE, ICA_SIZE)``.

    """
    with full_precision(images.device.type):  # antialiased resizing has no bfloat16 kernel on the CPU
        images = at_least_float32(images)
        blurred = gaussian_blur2d(images, (ICA_BLUR_KERNEL, ICA_BLUR_KERNEL), (ICA_BLUR_SIGMA, ICA_BLUR_SIGMA))
        return F.interpolate(blurred, size=(ICA_SIZE, ICA_SIZE), mode="bilinear", align_corners=False, antialias=True)


def similarity_theta(params: torch.Tensor, max_angle: float, max_log_scale: float, max_shift: float) -> torch.Tensor:
    """Turn unbounded parameters into a bounded similarity transform.

    Args:
        params (torch.Tensor): Raw parameters ``(angle, log-scale, shift x, shift y)``, shape ``(B, 4)``.
            Zeros give the identity.
        max_angle (float): Largest rotation, in radians.
        max_log_scale (float): Largest ``|log(scale)|``.
        max_shift (float): Largest translation in normalised units (``0.5`` is a quarter of the side).

    Returns:
        torch.Tensor: Affine matrices ``[[s cos a, -s sin a, tx], [s sin a, s cos a, ty]]``, shape ``(B, 2, 3)``,
        in float32 when ``params`` are in half precision.

    """
    with full_precision(params.device.type):
        params = at_least_float32(params)
        angle = max_angle * torch.tanh(params[:, 0])
        scale = torch.exp(max_log_scale * torch.tanh(params[:, 1]))
        shift = max_shift * torch.tanh(params[:, 2:4])
        # about the origin, the centre of the normalised frame; kornia's angle is in degrees
        center = torch.zeros_like(shift)
        matrix = get_affine_matrix2d(shift, center, scale[:, None].expand(-1, 2), torch.rad2deg(angle))
    return matrix[:, :2]


def identity_theta(batch_size: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Identity affine matrices, shape ``(B, 2, 3)``."""
    return torch.eye(2, 3, device=device, dtype=dtype).expand(batch_size, 2, 3)


def compose_theta(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """Compose two warps: warping by ``outer`` and then by ``inner`` equals one warp by the result.

    Warping ``x`` by ``outer`` gives ``u(y) = x(A_o y)``; warping ``u`` by ``inner`` gives
    ``x(A_o A_i y)``, so the composed matrix is ``A_o @ A_i`` in homogeneous form.

    Args:
        outer (torch.Tensor): First warp, shape ``(B, 2, 3)``.
        inner (torch.Tensor): Second warp, shape ``(B, 2, 3)``.

    Returns:
        torch.Tensor: The composed warp, shape ``(B, 2, 3)``.

    """
    with full_precision(outer.device.type):
        outer, inner = at_least_float32(outer), at_least_float32(inner)
        return (convert_affinematrix_to_homography(outer) @ convert_affinematrix_to_homography(inner))[:, :2]


def warp(
    tensor: torch.Tensor,
    theta: torch.Tensor,
    size: tuple[int, int] | None = None,
    padding_mode: str = "border",
    inverse: bool = False,
) -> torch.Tensor:
    """Warp a batch of images or feature maps by normalised affine matrices, with kornia's ``warp_affine``.

    ``theta`` samples the input for each output location (``affine_grid``'s convention), so kornia, which takes
    the source-to-destination matrix, gets its inverse, converted to pixels for this input and output size by
    :func:`~kornia.geometry.conversions.denormalize_homography` (so one call also resamples to another size).

    Args:
        tensor (torch.Tensor): Input, shape ``(B, C, H, W)``.
        theta (torch.Tensor): Affine matrices, shape ``(B, 2, 3)``.
        size (tuple[int, int] | None): Output ``(h, w)``; the input's size when ``None``. Resampling to another
            size in the same call avoids a second interpolation.
        padding_mode (str): ``"border"``, ``"reflection"`` or ``"zeros"``.
        inverse (bool): Warp by the inverse of ``theta`` (back from the aligned frame), without inverting it.

    Returns:
        torch.Tensor: Warped tensor in the input's dtype (computed in float32 at least), shape ``(B, C, h, w)``.

    """
    source = (int(tensor.shape[-2]), int(tensor.shape[-1]))
    size = (int(size[0]), int(size[1])) if size is not None else source
    dtype = tensor.dtype
    with full_precision(tensor.device.type):
        tensor = at_least_float32(tensor)
        theta = theta.to(tensor.dtype)
        forward = theta if inverse else invert_affine_transform(theta)
        pixels = denormalize_homography(convert_affinematrix_to_homography(forward), source, size, align_corners=False)
        warped = warp_affine(
            tensor, pixels[:, :2], size, mode="bilinear", padding_mode=padding_mode, align_corners=False
        )
    return warped if warped.dtype == dtype else warped.to(dtype)


def resize(tensor: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """What :func:`warp` computes for the identity, as one bilinear resize (``align_corners=False``, border held).

    Where nothing was moved the resampling needs no sampling grid: an exported graph then holds one ``Resize``
    instead of kornia's matrix bookkeeping, grid and sampling (about 260 ONNX nodes per warp); the values agree with
    the identity warp to float rounding.

    Args:
        tensor (torch.Tensor): Input, shape ``(B, C, H, W)``.
        size (tuple[int, int]): Output ``(h, w)``.

    Returns:
        torch.Tensor: Resized tensor in the input's dtype (computed in float32 at least), shape ``(B, C, h, w)``.

    """
    dtype = tensor.dtype
    with full_precision(tensor.device.type):
        resized = F.interpolate(at_least_float32(tensor), size=size, mode="bilinear", align_corners=False)
    return resized if resized.dtype == dtype else resized.to(dtype)


class SimilarityTransformer(nn.Module):
    """Spatial transformer that predicts one bounded similarity transform per input.

    The localisation network looks at a fixed-size pooled copy of the input (so its cost does not grow with
    the resolution) and its last layer starts at zero, so the first transform is the identity.

    Poses are centred: in training the batch's mean pose is subtracted from every prediction (and tracked as a
    running mean, subtracted in evaluation, as BatchNorm does). Aligning images to each other cannot need a
    transform shared by all of them, and without centring the losses reach a degenerate optimum by exactly
    that: every image zoomed, turned and shifted to the bounds so that padding fills the frame.

    Args:
        in_channels (int): Channels of the input (3 for images).
        pool_size (int): Side of the pooled copy the localisation network sees.
        hidden (int): Width of the first convolution.
        max_angle (float): Largest rotation, in radians.
        max_scale (float): Largest zoom factor; the scale lies in ``[1 / max_scale, max_scale]``.
        max_shift (float): Largest translation as a fraction of the side.
        momentum (float): Update rate of the running mean pose.

    Example:
        >>> stn = SimilarityTransformer(in_channels=3)
        >>> theta = stn(torch.rand(2, 3, 64, 64))
        >>> theta.shape
        torch.Size([2, 2, 3])

    """

    def __init__(
        self,
        in_channels: int,
        pool_size: int = IMAGE_POOL_SIZE,
        hidden: int = 16,
        max_angle: float = math.pi / 4,
        max_scale: float = 1.25,
        max_shift: float = 0.25,
        momentum: float = 0.1,
    ) -> None:
        super().__init__()
        self.momentum = momentum
        self.max_angle = max_angle
        self.max_log_scale = math.log(max_scale)
        self.max_shift = 2 * max_shift  # normalised coordinates span 2 per side
        flat = 2 * hidden * (pool_size // 4) ** 2
        self.localisation = nn.Sequential(
            nn.AdaptiveAvgPool2d(pool_size),
            nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(hidden, 2 * hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * hidden),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(flat, 64),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(64, 4)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("running_pose", torch.zeros(4))
        self.running_pose: torch.Tensor
        self.last_theta: torch.Tensor | None = None

    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        """Predict the transform that aligns each input.

        Args:
            tensor (torch.Tensor): Images or feature maps, shape ``(B, C, H, W)``.

        Returns:
            torch.Tensor: Affine matrices for :func:`warp`, shape ``(B, 2, 3)``.

        """
        params = self.centre_pose(self.head(self.localisation(tensor)))
        return similarity_theta(params, self.max_angle, self.max_log_scale, self.max_shift)

    def centre_pose(self, params: torch.Tensor) -> torch.Tensor:
        """Subtract the mean pose: the batch's in training (tracking it), the running mean in evaluation.

        Args:
            params (torch.Tensor): Raw pose parameters, shape ``(B, 4)``.

        Returns:
            torch.Tensor: Centred parameters, shape ``(B, 4)``.

        """
        if not self.training:
            return params - self.running_pose.to(params.dtype)
        mean = params.mean(dim=0)
        with torch.no_grad():
            self.running_pose.lerp_(mean.detach().to(self.running_pose.dtype), self.momentum)
        return params - mean

    def warp_output_hook(self, _module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook for a backbone stage: align its output so the next stage consumes aligned features.

        A bound method (not a closure) so that ``copy.deepcopy`` of the model keeps hook and transformer together.
        The transform is kept in ``last_theta`` for :meth:`pop_theta`.
        """
        self.last_theta = self(output)
        return warp(output, self.last_theta, padding_mode="border")

    def pop_theta(self) -> torch.Tensor:
        """Return and forget the transform of the last hooked forward pass, shape ``(B, 2, 3)``."""
        theta, self.last_theta = self.last_theta, None
        if theta is None:
            msg = "The feature transformer's stage did not run: the backbone must compute every selected layer."
            raise RuntimeError(msg)
        return theta


def feature_transformer(channels: int) -> SimilarityTransformer:
    """The smaller, tighter-bounded transformer that aligns one stage's feature map."""
    return SimilarityTransformer(
        channels,
        pool_size=FEATURE_POOL_SIZE,
        max_angle=FEATURE_MAX_ANGLE,
        max_scale=FEATURE_MAX_SCALE,
        max_shift=FEATURE_MAX_SHIFT,
    )


class AlignedFeatures(NamedTuple):
    """What the aligned network computes for a batch (:meth:`FocusDistModel.extract_features`).

    Attributes:
        features: Per layer, shallow to deep, ``(B, C_k, h_k, w_k)``, each in the frame of its own stage.
        image_theta: The image-level transform, input frame to aligned frame, ``(B, 2, 3)``.
        stage_thetas: Per layer, the transform its stage's transformer applied, ``(B, 2, 3)`` (identity when
            feature alignment is off).
        aligned_images: The input after the image-level alignment, ``(B, 3, H, W)``.
        moved: Whether any transform was applied; ``False`` (every transform the identity) lets the scoring
            resample by plain resizes (:func:`resize`).

    """

    features: list[torch.Tensor]
    image_theta: torch.Tensor
    stage_thetas: list[torch.Tensor]
    aligned_images: torch.Tensor
    moved: bool

    def total_theta(self) -> torch.Tensor:
        """Compose the image transform and all stage transforms: deepest frame to input frame, ``(B, 2, 3)``."""
        total = self.image_theta
        for theta in self.stage_thetas:
            total = compose_theta(total, theta)
        return total
