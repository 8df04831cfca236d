"""The exported OpenVINO graph and non-finite pixels: each broken image scores 1.0 alone (issue 10, item 2).

Uses the session's tiny model and its IR (``conftest.dynamic_ir``), exported as a user would with ``Engine.export``.
"""

from __future__ import annotations

import numpy as np
import pytest

from .test_export import F32, _in_tmp_path  # noqa: F401 - fixture

ov = pytest.importorskip("openvino")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_exported_graph_scores_a_non_finite_image_alone(dynamic_ir, images, value: float) -> None:
    compiled = ov.Core().compile_model(str(dynamic_ir), "CPU", F32)
    clean = np.stack([image.numpy() for image in images[:2]]).astype(np.float32)  # (2, 3, 64, 64) in [0, 1]
    broken = clean.copy()
    broken[1, 0, 3, 3] = value
    expected, actual = compiled(clean), compiled(broken)
    names = {output.get_any_name(): output for output in compiled.outputs}
    score, label, anomaly_map = names["pred_score"], names["pred_label"], names["anomaly_map"]
    for output in (score, label, anomaly_map):  # the clean image beside the broken one is untouched
        np.testing.assert_array_equal(actual[output][0], expected[output][0])
    assert float(actual[score][1]) == 1.0 and bool(actual[label][1])
    assert (actual[anomaly_map][1] == 1.0).all()
