"""Headless Chromium (Debian's ``chromium`` + ``chromium-driver``) driven by Selenium, for UI tests
and the README screenshot. Nothing is downloaded: the driver is /usr/bin/chromedriver."""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars"]


def find_chromium() -> tuple[str, str] | None:
    """(browser, driver) paths, or None if either is not installed."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def missing_reason() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    if find_chromium() is None:
        return ("chromium and chromedriver are not installed "
                "(apt-get update && apt-get install -y chromium chromium-driver)")
    return None


@contextmanager
def chromium(width: int = 1100, height: int = 900):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = find_chromium()
    profile = tempfile.mkdtemp(prefix="lenet-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}", f"--window-size={width},{height}"]:
        options.add_argument(flag)
    web = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    try:
        web.set_page_load_timeout(30)
        yield web
    finally:
        web.quit()
        shutil.rmtree(profile, ignore_errors=True)


# A "7" as pen strokes on the 280x280 pad: (x, y) offsets from the pad's top-left corner.
SEVEN = [[(70, 60), (205, 60), (185, 110), (160, 165), (140, 225)]]


def draw(web, strokes, element_id: str = "pad") -> None:
    """Draw ``strokes`` on the canvas with the mouse (pointer events, as a user would)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    pad = web.find_element(By.ID, element_id)
    rect = pad.rect  # offsets below are from the element's centre
    cx, cy = rect["width"] / 2, rect["height"] / 2
    for stroke in strokes:
        actions = ActionChains(web, duration=20)
        x0, y0 = stroke[0]
        actions.move_to_element_with_offset(pad, int(x0 - cx), int(y0 - cy)).click_and_hold()
        px, py = x0, y0
        for x, y in stroke[1:]:
            steps = 6
            for s in range(1, steps + 1):
                nx, ny = px + (x - px) * s / steps, py + (y - py) * s / steps
                actions.move_to_element_with_offset(pad, int(nx - cx), int(ny - cy))
            px, py = x, y
        actions.release().perform()


def wait_for_prediction(web, previous: str | None = None, timeout: float = 20) -> tuple[str, str]:
    """Wait until the top prediction appears (and the status line changed from ``previous``)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def ready(w):
        if w.find_element(By.TAG_NAME, "body").get_attribute("data-pending") != "0":
            return False  # a request is still on its way: wait for the last answer
        items = w.find_elements(By.CSS_SELECTOR, "#predictions li")
        text = w.find_element(By.ID, "status").text
        if items and text != previous and "%" in text:
            return items[0].get_attribute("data-class"), text
        return False

    return WebDriverWait(web, timeout).until(ready)


def screenshot(web, path: Path) -> None:
    """Save the whole page (the window is grown to the page's height first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    height = web.execute_script("return document.documentElement.scrollHeight")
    chrome = web.get_window_size()["height"] - web.execute_script("return window.innerHeight")
    web.set_window_size(web.get_window_size()["width"], height + chrome)
    web.save_screenshot(str(path))


def wait_for_info(web, timeout: float = 20) -> str:
    """Wait until the page has loaded /api/info (the header names the model)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(web, timeout).until(
        lambda w: (t := w.find_element(By.ID, "model-info").text) and "trained on" in t and t)


def wait_for_error(web, timeout: float = 20):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(web, timeout).until(
        lambda w: (el := w.find_element(By.ID, "status")) and "error" in (el.get_attribute("class") or "") and el)
