"""The quickstart notebook runs top to bottom on CPU (a short run), so it cannot rot."""
import os

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow  # runs the notebook

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("MASA_QUICKSTART_STEPS", "2")
    monkeypatch.setenv("MASA_QUICKSTART_WORKDIR", str(tmp_path / "run"))
    nb = nbformat.read(os.path.join(REPO, "notebooks", "quickstart.ipynb"), as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "CpuDevice" in outputs or "cpu" in outputs.lower()
    assert (tmp_path / "run" / "metrics.jsonl").exists()
    assert any(o.get("output_type") == "display_data" for c in nb.cells for o in c.get("outputs", []))
