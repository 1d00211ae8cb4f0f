"""Screenshot of the `lenet serve` page after drawing a "7" with the mouse (headless Chromium).

    python benchmarks/screenshot_serve.py RUN_DIR docs/serve.png

Needs Debian's chromium + chromium-driver and pip selenium (see tests/browser.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO / "tests")]

import browser  # noqa: E402
from lenet.use.serve import make_server, running  # noqa: E402


def main() -> int:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    run_dir, out = sys.argv[1], Path(sys.argv[2])
    reason = browser.missing_reason()
    if reason:
        raise SystemExit(f"cannot take the screenshot: {reason}")
    server = make_server(run_dir, "127.0.0.1", 0)
    with running(server), browser.chromium(width=1100, height=860) as web:
        web.get(server.url)
        browser.wait_for_info(web)
        browser.draw(web, browser.SEVEN)
        label, text = browser.wait_for_prediction(web)
        browser.screenshot(web, out)
    print(f"{text}\nscreenshot saved to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
