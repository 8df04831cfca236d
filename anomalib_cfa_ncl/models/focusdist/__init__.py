"""FocusDist: coarse-to-fine alignment with dense non-contrastive learning (arXiv 2110.04538)."""

from .lightning_model import FocusDist
from .torch_model import FocusDistModel

__all__ = ["FocusDist", "FocusDistModel"]
