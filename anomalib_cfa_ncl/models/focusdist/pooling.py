"""A second average pooling of the scoring embedding, which the gate (:mod:`.gate`) uses where it finds defects better.

Pooling the embedding over neighbouring locations makes each location's statistics, and so the map, coarser. On the
held-back images of textures and of parts under random pose that separated both families of synthetic defects (blobs
and thin lines) better; on parts in a fixed pose it blurred detail they needed. So it is a decision per model, made on
its own training images, like the frame and the covariance shrinkage.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn


class GridPooling(nn.Module):
    """Average pooling of ``side`` x ``side`` locations of the scoring embedding, applied where it was chosen.

    Args:
        side (int): Odd side of the pooling window; ``1`` never pools.

    Example:
        >>> pooling = GridPooling(3)
        >>> embedding = torch.arange(9.0).view(1, 1, 3, 3)
        >>> bool((pooling(embedding) == embedding).all())  # not chosen (yet): unchanged
        True
        >>> _ = pooling.enabled.fill_(True)
        >>> pooling(embedding)[0, 0, 1, 1]  # the centre: the mean of all nine
        tensor(4.)

    """

    def __init__(self, side: int) -> None:
        super().__init__()
        self.side = side
        self.register_buffer("enabled", torch.zeros((), dtype=torch.bool))
        self.enabled: torch.Tensor

    def pool(self, embedding: torch.Tensor) -> torch.Tensor:
        """Pooled embedding, same shape ``(B, D, h, w)``; the border averages only the locations inside the grid."""
        return F.avg_pool2d(embedding, self.side, stride=1, padding=self.side // 2, count_include_pad=False)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """The pooled embedding where pooling was chosen, else ``embedding`` itself, ``(B, D, h, w)``."""
        if not self.is_candidate:
            return embedding
        # a tensor condition, not a Python branch: the exported graph follows the decision stored in the buffer
        return torch.where(self.enabled, self.pool(embedding), embedding)

    @property
    def is_candidate(self) -> bool:
        """Whether there is a pooling to choose (``side > 1``)."""
        return self.side > 1

    def off(self) -> AbstractContextManager[None]:
        """Return the unpooled embedding for the duration of the block, whatever was decided."""
        return flag_held(self.enabled, False)


@contextmanager
def flag_held(flag: torch.Tensor, value: bool) -> Iterator[None]:
    """Hold a boolean decision buffer at ``value`` for the duration of the block, then restore what was decided.

    Example:
        >>> flag = torch.ones((), dtype=torch.bool)
        >>> with flag_held(flag, False):
        ...     bool(flag)
        False
        >>> bool(flag)
        True

    """
    decided = flag.clone()
    flag.fill_(value)
    try:
        yield
    finally:
        flag.copy_(decided)
