"""Run notebooks/lenet.ipynb and take a screenshot of its training cell: the live curves.

    python benchmarks/screenshot_notebook.py docs/notebook.png [EPOCHS] [TRAIN_LIMIT]

Runs the notebook in a temporary folder with nbclient (as the tests do), renders it to HTML with
nbconvert, and photographs the cell that trains with ``plot=True`` in headless Chromium. Needs
``pip install 'lenet[test]' nbconvert``, Debian's chromium + chromium-driver (tests/browser.py)
and Fashion-MNIST where lenet finds it.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO / "tests")]

import browser  # noqa: E402


def run_notebook(folder: Path, epochs: int, limit: str) -> Path:
    import nbformat
    from nbclient import NotebookClient
    from nbconvert import HTMLExporter

    nb = nbformat.read(REPO / "notebooks" / "lenet.ipynb", as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params.source = f"EPOCHS = {epochs}\nTRAIN_LIMIT = {limit}\nDATA_ROOT = None"
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(folder)}}).execute()
    html, _ = HTMLExporter().from_notebook_node(nb)
    page = folder / "lenet.html"
    page.write_text(html)
    return page


def main() -> int:
    if len(sys.argv) not in (2, 3, 4):
        raise SystemExit(__doc__)
    out = Path(sys.argv[1]).resolve()
    epochs, limit = int(sys.argv[2]) if len(sys.argv) > 2 else 10, sys.argv[3] if len(sys.argv) > 3 else "None"
    reason = browser.missing_reason()
    if reason:
        raise SystemExit(f"cannot take the screenshot: {reason}")
    from selenium.webdriver.common.by import By

    with tempfile.TemporaryDirectory() as tmp:
        page = run_notebook(Path(tmp), epochs, limit)
        with browser.chromium(width=1150, height=1200) as web:
            web.get(page.as_uri())
            cells = web.find_elements(By.CSS_SELECTOR, ".jp-CodeCell")
            cell = next(c for c in cells if "plot=True" in c.text)
            web.execute_script("arguments[0].scrollIntoView();", cell)
            out.parent.mkdir(parents=True, exist_ok=True)
            cell.screenshot(str(out))
            print(cell.text.splitlines()[-2:])
    print(f"screenshot saved to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
