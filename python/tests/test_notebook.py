"""examples/federation.ipynb executed headless (nbclient): any cell error fails the test. Prints
the notebook's measurement (first cell to three provisioned sites training)."""

import json
import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "federation.ipynb"


def test_the_federation_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    monkeypatch.setenv("COSILO_NOTEBOOK_DIR", str(tmp_path / "work"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    m = json.loads((tmp_path / "work" / "measurement.json").read_text())
    print("notebook measurement:", json.dumps(m))
    out = os.environ.get("COSILO_NOTEBOOK_MEASUREMENT")
    if out:
        Path(out).write_text(json.dumps(m, indent=1) + "\n")
    assert m["seconds_first_cell_to_three_sites_training"] is not None
    assert (tmp_path / "work" / "result-seg.dcm").exists()
