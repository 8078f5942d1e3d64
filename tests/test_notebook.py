"""experiments/inspect_pruned.ipynb runs from top to bottom against a finished run."""

from pathlib import Path

import nbclient
import nbformat
from train_helpers import tiny_run

NOTEBOOK = Path(__file__).resolve().parents[1] / "experiments" / "inspect_pruned.ipynb"


def test_inspect_pruned_notebook_executes(monkeypatch):
    run_dir, _ = tiny_run()
    monkeypatch.setenv("PALM_JAX_RUN", str(run_dir))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs) + "".join(
        o.get("data", {}).get("text/markdown", "") for o in outputs
    )
    assert "| params/conv0/kernel | (3, 3, 3, 4) |" in text  # the parameter table, before and after
    assert "widths after:" in text and "params:" in text
    assert "top-1: pruned " in text and ", recalibrated " in text  # both accuracies
    assert "| batch | unpruned (ms) | pruned (ms) | speedup |" in text  # the measured latency
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 3  # histograms, channels, curves
