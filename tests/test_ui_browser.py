"""End to end in a real headless browser: Chromium (Debian's package) driven by Playwright.

The real service (uvicorn) and the real UI (`streamlit run`, as `crossmodal ui` starts it)
run on 127.0.0.1; screenshots of each view are saved to tests/artifacts/.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests.conftest import free_port, wait_until_answers

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
THUMBNAILS = "[data-testid=stImage] img"
# Chromium must not reach for Google's services: this machine has no network beyond loopback.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def find_browser() -> str | None:
    candidates = [os.environ.get("CROSSMODAL_BROWSER"), shutil.which("chromium"), shutil.which("chromium-browser"),
                  shutil.which("google-chrome")]
    return next((c for c in candidates if c and Path(c).is_file()), None)


@pytest.fixture(scope="module")
def browser():
    executable = find_browser()
    if executable is None:
        message = "no Chromium found: install Debian's `chromium` package (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI installs it in .ci/run, so this is a broken install step")
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def ui_url(live_server, indexed):
    from ui.launch import start_ui

    port = free_port()
    process = start_ui(live_server, "127.0.0.1", port, indexed.max_upload_bytes)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_answers(f"{url}/_stcore/health", timeout=90)
        yield url
    finally:
        process.terminate()
        process.wait(10)


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.wait_for_timeout(500)  # let thumbnails paint
    page.screenshot(path=str(ARTIFACTS / f"ui-{name}.png"), full_page=True)


def test_three_flows_in_a_real_browser(browser, ui_url, collection):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    page.goto(ui_url)
    page.get_by_text("Service ready").wait_for()

    # Text -> images: type a query, see thumbnails (real <img> elements that loaded), open one large.
    query = page.get_by_label("Query")
    query.fill("a man with a camera")
    query.press("Enter")
    page.get_by_text("images for “a man with a camera”").wait_for()
    results = page.locator(THUMBNAILS)
    results.nth(11).wait_for()
    assert results.count() == 12
    # The <img> elements appear before their bytes arrive: wait until every one has loaded
    # (a broken image is `complete` with naturalWidth 0, so this times out on one).
    page.wait_for_function(f"""() => {{
        const imgs = [...document.querySelectorAll({THUMBNAILS!r})];
        return imgs.length === 12 && imgs.every(img => img.complete && img.naturalWidth > 0);
    }}""")
    expect(page.locator("code", has_text="camera.png").first).to_be_visible()
    shot(page, "text-to-images")
    page.locator("[class*=st-key-text-open] button").first.click()
    page.get_by_role("button", name="Describe it (captions)").wait_for()
    shot(page, "opened-result")

    # Image -> captions: upload a photo, see its ranked captions and similar images.
    page.get_by_text("Image → captions").click()
    page.locator("input[type=file]").set_input_files(str(collection / "coffee.jpg"))
    page.get_by_text("Captions that describe it").wait_for()
    page.get_by_text("Most similar images").wait_for()
    first_caption = page.locator("[data-testid=stMarkdownContainer] li, [data-testid=stMarkdownContainer] p",
                                 has_text="1. ").first.inner_text()
    assert "coffee" in first_caption or "cup" in first_caption, first_caption
    shot(page, "image-to-captions")

    # Index: stats, a rebuild from the form, its result.
    page.get_by_text("Index", exact=True).click()
    page.get_by_role("button", name="Rebuild index").click()
    page.get_by_text("published: 18 images, 22 captions").wait_for()
    expect(page.get_by_text("No files were skipped.")).to_be_visible()
    shot(page, "index-rebuilt")
    page.close()
