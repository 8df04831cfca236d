"""Models of anomalib_cfa_ncl."""

from .focusdist import FocusDist, FocusDistModel

__all__ = ["FocusDist", "FocusDistModel"]
