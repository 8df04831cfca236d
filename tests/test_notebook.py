"""notebooks/quickstart.ipynb runs from top to bottom (on tiny data), so it cannot rot."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


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
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}}).execute()

    outputs = "".join(
        output.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
    )
    assert "image_AUROC" in outputs
    assert "not available, starting from random weights" in outputs
    assert "visualised and" in outputs
    images = [
        output for cell in notebook.cells for output in cell.get("outputs", []) if "image/png" in output.get("data", {})
    ]
    assert len(images) == 2  # an anomaly map and an alignment view
    assert list((tmp_path / "export").rglob("model.xml"))
