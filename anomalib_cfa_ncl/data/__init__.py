"""Data helpers of anomalib_cfa_ncl."""

from .synthetic import make_mvtec_dataset

__all__ = ["make_mvtec_dataset"]
