"""anomalib_cfa_ncl: the FocusDist anomaly detection model for anomalib.

Importing the package registers ``FocusDist`` as ``anomalib.models.FocusDist``, so ``get_model("FocusDist")``
and ``anomalib benchmark`` find it like a built-in model, and adds the dataset checks to every FocusDist run
(the model folder itself imports nothing else of this package).
"""

import anomalib.models

from .data.checks import DatasetChecks
from .models import FocusDist, FocusDistModel

anomalib.models.FocusDist = FocusDist
if DatasetChecks not in FocusDist.run_callbacks:
    FocusDist.run_callbacks.append(DatasetChecks)

__all__ = ["FocusDist", "FocusDistModel"]
__version__ = "0.5.0"
