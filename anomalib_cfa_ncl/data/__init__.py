"""Data helpers of anomalib_cfa_ncl: the ``MVTec`` and ``BTAD`` datamodules and small synthetic datasets."""

from .datamodules import BTAD, MVTec
from .synthetic import make_btad_dataset, make_mvtec_dataset

__all__ = ["BTAD", "MVTec", "make_btad_dataset", "make_mvtec_dataset"]
