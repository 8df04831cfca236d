"""anomalib_cfa_ncl: the FocusDist anomaly detection model for anomalib.

Importing the package registers ``FocusDist`` as ``anomalib.models.FocusDist``, so ``get_model("FocusDist")``
and ``anomalib benchmark`` find it like a built-in model.
"""

import anomalib.models

from .models import FocusDist, FocusDistModel

anomalib.models.FocusDist = FocusDist

__all__ = ["FocusDist", "FocusDistModel"]
__version__ = "0.1.0"
