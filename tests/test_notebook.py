"""docs/quickstart.ipynb runs on the venv's own interpreter and shows real detections."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "quickstart.ipynb"


def _kernel_on_this_interpreter(root: Path) -> None:
    """A ``python3`` kernelspec under ``root`` that starts ``sys.executable`` (this venv)."""
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel = {"argv": argv, "display_name": "veil", "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(kernel))


def _stdout(nb: object) -> str:
    return "".join(
        out.get("text", "")
        for cell in nb.cells  # type: ignore[attr-defined]
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.output_type == "stream"
    )


def test_quickstart_notebook_finds_the_face(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _kernel_on_this_interpreter(tmp_path / "jupyter")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    text = _stdout(nb)
    line = next(s for s in text.splitlines() if s.startswith("faces: "))
    faces = json.loads(line.removeprefix("faces: "))
    # The astronaut's face (about x 320-645, y 125-540 in the 960x540 demo frame).
    assert faces["scores"] and faces["scores"][0] >= 0.5, text
    x1, y1, x2, y2 = faces["boxes"][0]
    assert 250 < (x1 + x2) / 2 < 550 and 200 < (y1 + y2) / 2 < 450, faces
    images = [
        out
        for cell in nb.cells
        for out in cell.get("outputs", [])
        if "image/png" in out.get("data", {})
    ]
    assert images, "the notebook displayed no image"
    assert "rMLE: 30 steps" in text
