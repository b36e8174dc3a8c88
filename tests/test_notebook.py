"""Executes notebooks/quickstart.ipynb on a real Jupyter kernel and checks what it showed."""

from __future__ import annotations

import importlib.metadata
import os
import re
import uuid
from pathlib import Path

import psutil
import pytest

from ray_elastic.testing.procs import kill_and_name, marked_processes, still_running

tomllib = pytest.importorskip("tomllib", reason="reads pyproject.toml (Python 3.11+)")
ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def _kernel_needs() -> list[str]:
    """What executing the notebook needs: the `notebook-kernel` extra (what its cells use), nbclient, nbformat."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    wanted = extras["notebook-kernel"] + ["nbclient", "nbformat"]
    return [re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0] for requirement in wanted]


_missing = []
for _dist in _kernel_needs():
    try:
        importlib.metadata.version(_dist)
    except importlib.metadata.PackageNotFoundError:
        _missing.append(_dist)
if _missing:
    pytest.skip(f"{_missing} not installed: pip install -e '.[dev]'", allow_module_level=True)
import nbclient  # noqa: E402 - checked above
import nbformat  # noqa: E402

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]


def _texts(cell) -> str:
    parts = []
    for output in cell.get("outputs", []):
        if output.get("output_type") == "stream":
            parts.append(output["text"])
        elif "data" in output:
            parts.append(output["data"].get("text/plain", ""))
    return "".join(parts)


def _marked(marker: str) -> list[psutil.Process]:
    """Processes carrying the kernel's marker: the kernel and every Ray process it started."""
    return marked_processes("RAY_ELASTIC_NOTEBOOK_TEST", marker)


def test_quickstart_notebook_shrinks_and_grows_back(tmp_path, no_shared_cluster):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=400, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    marker = uuid.uuid4().hex
    try:
        client.execute(env={**os.environ, "RAY_ELASTIC_NOTEBOOK_TEST": marker})  # raises on any cell's error
    finally:
        nbformat.write(notebook, tmp_path / "executed.ipynb")  # kept by pytest, for a look after a failure
        left = kill_and_name(still_running(lambda: _marked(marker), wait_s=20))
    assert not left, f"the notebook left processes behind: {left}"
    code_cells = [c for c in notebook.cells if c.cell_type == "code"]
    errors = [o for c in code_cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    everything = "\n".join(_texts(c) for c in code_cells)
    assert "restarts spent: 1" in everything, everything[-4000:]
    assert "after the node loss: world size 2" in everything, everything[-4000:]
    assert "after the node joined: world size 3" in everything, everything[-4000:]
    assert "run finished after 1 restart(s)" in everything, everything[-4000:]
    outputs = [o for c in code_cells for o in c.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the loss / world-size plot was not drawn"
    bars = [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert bars or "ray_elastic:" in everything, "no progress bar was shown"
