"""End to end in a real headless browser: Chromium (Debian's package) driven by Playwright.

The real service (uvicorn) and the real UI (`streamlit run`, as `crossmodal ui` starts it)
run on 127.0.0.1; screenshots of each view are saved to tests/artifacts/.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect

from tests.conftest import free_port, solid_image, wait_until_answers

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


HOSTILE_CAPTION = "![x](http://127.0.0.1:9/pixel.png) a horse $x^2$ :red[alarm] **bold**"


@pytest.fixture
def collection(collection):
    """The sample collection, one of whose captions is Markdown an attacker wrote."""
    with open(collection / "captions.tsv", "a") as captions:
        captions.write(f"horse.png\t{HOSTILE_CAPTION}\n")
    return collection


@pytest.fixture
def ui_url(live_server, indexed):
    from crossmodal.launch import start_ui
    from crossmodal.ui.settings import UISettings

    port = free_port()
    process = start_ui(UISettings(ui_host="127.0.0.1", ui_port=port, api_url=live_server), indexed.max_upload_bytes,
                       indexed.answered_hosts())
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


def open_ui(browser, url: str, on_request=None):
    """A desktop-sized page on the UI, once the service is ready; `on_request` sees every request it makes."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    if on_request is not None:
        page.on("request", on_request)
    page.goto(url)
    page.get_by_text("Service ready").wait_for()
    return page


def search_text(page, text: str) -> None:
    query = page.get_by_label("Query")
    query.fill(text)
    query.press("Enter")
    page.get_by_text(f"images for “{text}”").wait_for()


def test_three_flows_in_a_real_browser(browser, ui_url, collection, tmp_path):
    page = open_ui(browser, ui_url)

    # Text -> images: type a query, see thumbnails (real <img> elements that loaded), open one large.
    search_text(page, "a man with a camera")
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
    # Relevance feedback: "More like" on the last result refines the query (by role: with a help tooltip,
    # the last element a class selector finds is an invisible one).
    page.get_by_role("button", name="More like").last.click()
    page.get_by_text("refined: more like 1, less like 0").wait_for()
    shot(page, "more-like-this")
    page.locator("[class*=st-key-text-open] button").first.click()
    page.get_by_role("button", name="Describe it (captions)").wait_for()
    expect(page.get_by_role("dialog")).to_be_in_viewport()  # over the page, wherever it was scrolled to
    shot(page, "opened-result")
    page.keyboard.press("Escape")
    expect(page.get_by_role("dialog")).to_have_count(0)

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
    page.get_by_text("Nothing changed: build 1 stays: 18 images, 23 captions").wait_for()
    expect(page.get_by_text("No files were skipped.")).to_be_visible()
    shot(page, "index-rebuilt")

    # A second folder (issue 20 item 5): added from its form, listed with its counts beside the first.
    phone = tmp_path / "phone"
    phone.mkdir()
    for i in range(2):
        solid_image((40, 90 * i, 220)).save(phone / f"p{i}.png")
    page.get_by_role("textbox", name="Add a folder (on the server)").fill(str(phone))
    page.get_by_role("button", name="Add folder").click()
    page.get_by_text("published: 20 images, 23 captions").wait_for()
    expect(page.get_by_text("2 photos · 0 captions")).to_be_visible()
    expect(page.get_by_text("18 photos · 23 captions")).to_be_visible()
    expect(page.get_by_role("button", name="Remove")).to_have_count(2)
    shot(page, "index-two-folders")
    page.close()


def contrast_on_white(css_colour: str) -> float:
    """WCAG contrast ratio of an `rgb(r, g, b)` colour against white."""
    def channel(value: float) -> float:
        value /= 255
        return value / 12.92 if value <= 0.03928 else ((value + 0.055) / 1.055) ** 2.4

    r, g, b = (float(v) for v in css_colour[css_colour.index("(") + 1:css_colour.index(")")].split(",")[:3])
    luminance = 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b)
    return 1.05 / (luminance + 0.05)


def choose(page, label: str, option: str) -> None:
    """Pick an option of a Streamlit selectbox, as a person does: open it, click the option."""
    page.locator("[data-testid=stSelectbox]", has_text=label).click()
    page.get_by_role("option", name=option, exact=True).click()


def test_a_filtered_sorted_query_and_relevance_feedback_in_a_real_browser(browser, ui_url):
    page = open_ui(browser, ui_url)
    choose(page, "Folder", "generated")
    choose(page, "Order", "Newest first")
    search_text(page, "a red square")
    page.get_by_text("2 images for “a red square”").wait_for()
    expect(page.locator(THUMBNAILS)).to_have_count(2)
    expect(page.locator("code", has_text="generated/blue.jpg")).to_be_visible()
    expect(page.get_by_text("taken ").first).to_be_visible()  # a date sort shows each photo's date
    shot(page, "filtered-sorted")
    # Accessibility (issue 20 item 13): captions at AA contrast, thumbnails with alt text.
    colour = page.locator("[data-testid=stCaptionContainer]").first.evaluate("e => getComputedStyle(e).color")
    assert contrast_on_white(colour) >= 4.5, colour
    assert page.locator(THUMBNAILS).first.get_attribute("alt") == "photo generated/blue.jpg"
    page.get_by_role("button", name="Less like").first.click()  # feedback keeps the filters
    page.get_by_text("refined: more like 0, less like 1").wait_for()
    expect(page.locator(THUMBNAILS)).to_have_count(2)
    page.close()


def test_a_refused_upload_says_why_in_words(browser, ui_url, indexed, tmp_path):
    """Issue 20 item 7: a refused upload showed a small red "!" whose reason appeared on hover only."""
    page = open_ui(browser, ui_url)
    page.get_by_text("Image → captions").click()
    notes = tmp_path / "notes.txt"
    notes.write_text("not a photo")
    page.locator("input[type=file]").set_input_files(str(notes))
    expect(page.get_by_text("not a usable image")).to_be_visible()
    big = tmp_path / "big.jpg"  # over the service's limit, under the UI's (twice it)
    big.write_bytes(b"\xff\xd8\xff" + os.urandom(indexed.max_upload_bytes + 1024))
    page.locator("input[type=file]").set_input_files(str(big))
    expect(page.get_by_text("upload larger than the limit")).to_be_visible()
    shot(page, "refused-upload")
    page.close()


def test_a_phone_sized_screen_shows_two_results_a_row_and_the_view_switcher(browser, ui_url):
    """Issue 20 item 12: at 400x800, one card per screen and the views behind the sidebar's "»"."""
    page = browser.new_page(viewport={"width": 400, "height": 800})
    page.set_default_timeout(60_000)
    page.goto(f"{ui_url}/?q=a+man+with+a+camera")  # a shared link: the query comes with it
    page.get_by_text("images for “a man with a camera”").wait_for()
    expect(page.get_by_text("Image → captions")).to_be_in_viewport()  # no sidebar to open first
    # Side by side once the page's stylesheet and the thumbnails are in (both arrive after the caption).
    page.wait_for_function(f"""() => {{
        const [a, b] = [...document.querySelectorAll({THUMBNAILS!r})].map(img => img.getBoundingClientRect());
        return a && b && a.height > 0 && Math.abs(a.top - b.top) < 2 && b.left >= a.right;
    }}""", timeout=30_000)
    shot(page, "phone")
    page.close()


def test_captions_are_shown_as_text_not_rendered_as_markdown(browser, ui_url, live_server):
    results = httpx.get(f"{live_server}/v1/images/search", params={"q": "a black horse silhouette", "k": 18}).json()
    horse = next(r["id"] for r in results["results"] if r["path"] == "horse.png")
    requested: list[str] = []
    page = open_ui(browser, ui_url, on_request=lambda request: requested.append(request.url))
    search_text(page, "a black horse silhouette")
    page.locator(f".st-key-text-open-{horse} button").first.click()  # (a help tooltip adds a second, hidden one)
    page.get_by_role("button", name="Describe it (captions)").wait_for()  # the opened result's panel
    shot(page, "hostile-caption")
    expect(page.get_by_text(HOSTILE_CAPTION)).to_be_visible()  # shown literally, every character of it
    assert not [url for url in requested if "pixel.png" in url]
    assert page.locator("img[src*='pixel.png'], .katex, strong:has-text('bold')").count() == 0
    page.close()


def test_a_dns_rebinding_page_gets_neither_the_ui_nor_the_api(browser, ui_url, live_server):
    """A page on another name that resolves to 127.0.0.1: Chromium maps the name, as a rebinding DNS would."""
    ui_port, api_port = ui_url.rsplit(":", 1)[1], live_server.rsplit(":", 1)[1]
    rebinding = browser.browser_type.launch(executable_path=find_browser(), args=[
        *CHROMIUM_ARGS, "--host-resolver-rules=MAP rebind.example 127.0.0.1"])
    try:
        page = rebinding.new_page()
        api = page.goto(f"http://rebind.example:{api_port}/v1/stats")
        assert api.status == 400 and "CROSSMODAL_ALLOWED_HOSTS" in page.content()
        page.goto(f"http://rebind.example:{ui_port}")
        page.wait_for_timeout(8_000)  # Streamlit's page loads; its session (WebSocket) is refused
        assert page.get_by_text("Service ready").count() == 0
        assert page.get_by_role("button", name="Rebuild index").count() == 0
        page.goto(ui_url)  # the same browser on the real name works
        page.get_by_text("Service ready").wait_for(timeout=60_000)
    finally:
        rebinding.close()
