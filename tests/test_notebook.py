"""notebooks/quickstart.ipynb runs from top to bottom (on tiny data), so it cannot rot."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
PROBE = """
import json
print(json.dumps({
    "metrics": sorted(metrics), "pre_trained": pre_trained, "visualised": len(visualised), "aligned": len(aligned),
    "map_shape": list(prediction.anomaly_map.shape),
}))
"""


def test_quickstart_notebook_runs(tmp_path: Path, monkeypatch) -> None:
    # The kernel inherits the environment: tiny data, one epoch, no download.
    for name, value in {
        "QUICKSTART_DIR": str(tmp_path),
        "QUICKSTART_N_TRAIN": "8",
        "QUICKSTART_IMAGE_SIZE": "64",
        "QUICKSTART_MAX_EPOCHS": "1",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
    }.items():
        monkeypatch.setenv(name, value)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # A last cell, in memory only, reports the notebook's own variables: the test reads values, not sentences.
    notebook.cells.append(nbformat.v4.new_code_cell(PROBE))
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}}).execute()

    state = json.loads(notebook.cells[-1].outputs[-1]["text"])
    assert {"image_AUROC", "pixel_AUROC"} <= set(state["metrics"])
    assert state["pre_trained"] is False  # offline, without cached weights: the notebook falls back to random ones
    assert state["visualised"] > 0 and state["aligned"] == state["visualised"]
    assert state["map_shape"][-1] == state["map_shape"][-2] > 0  # a square map per image
    images = [
        output for cell in notebook.cells for output in cell.get("outputs", []) if "image/png" in output.get("data", {})
    ]
    assert len(images) == 2  # an anomaly map and an alignment view
    assert list((tmp_path / "export").rglob("model.xml"))
