"""notebooks/lenet.ipynb runs top to bottom (on a short budget), with its live training curves."""

from __future__ import annotations

import base64
import io

import pytest

from .conftest import REPO, needs_data

NOTEBOOK = REPO / "notebooks" / "lenet.ipynb"


@pytest.mark.slow
@needs_data
def test_notebook_runs_top_to_bottom_with_live_curves(tmp_path):
    import nbformat
    from nbclient import NotebookClient
    from PIL import Image

    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params.source = "EPOCHS = 1\nTRAIN_LIMIT = 3000\nDATA_ROOT = None"
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = {i: c.get("outputs", []) for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    errors = [o for outs in outputs.values() for o in outs if o.output_type == "error"]
    assert not errors, errors
    text = "\n".join(o.get("text", "") for outs in outputs.values() for o in outs if o.output_type == "stream")
    assert "total: 61,706 trainable parameters" in text  # the shape trace
    assert "3,000 training and 10,000 test images" in text
    assert "examples/sec on cpu" in text and "test accuracy" in text
    train_cell = next(c for c in nb.cells if "plot=True, " in c.source or "plot=True)" in c.source)
    images = [o for o in train_cell.outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(images) == 1  # one figure, redrawn in place (not one per point)
    png = Image.open(io.BytesIO(base64.b64decode(images[0].data["image/png"])))
    assert png.size[0] > 400
    assert (tmp_path / "runs" / "notebook" / "model.safetensors").is_file()
    assert "%" in text.splitlines()[-1]  # the drawing's top classes
