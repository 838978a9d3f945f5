"""`lrkit ui` in a real headless Chromium (Debian's chromium and chromium-driver, driven by Selenium), on the toy base.

The page is used as a person uses it: the toy subject's photos are uploaded into the Train tab, a LoRA trains a few
steps, the Generate tab makes two modes for two seeds and the gallery shows the four images, the Concepts tab lists
the bundle, the Evaluate tab shows the toy scores' plots. A screenshot of each tab is saved (in the test's tmp dir,
and in $LRKIT_UI_SCREENSHOTS when set: docs/images/ui-*.png come from there). Without the browser the test fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import pytest  # noqa: E402
from ui_serving import serving  # noqa: E402

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WINDOW = (1280, 900)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui-browser-root")
    with serving(root) as (_, url):
        yield {"root": Path(root), "url": url}


@pytest.fixture(scope="module")
def browser():
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    assert not missing, (f"the browser test needs {' and '.join(missing)}: apt-get install chromium chromium-driver "
                         "(.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={WINDOW[0]},{WINDOW[1]}", "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",  # the page itself WINDOW large, screenshots too
                           {"width": WINDOW[0], "height": WINDOW[1], "deviceScaleFactor": 1, "mobile": False})
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[str]:
    from lrkit.demo import write_photos
    from lrkit.toyworld.subjects import get_subject

    folder = write_photos(get_subject("toy_ball"), tmp_path_factory.mktemp("toy-photos"), n=4)
    return sorted(str(p) for p in folder.glob("photo_*.png"))


class Page:
    """The app's page in the browser: find, type, click, wait, screenshot."""

    def __init__(self, driver, shots: list[Path]):
        self.driver, self.shots = driver, shots

    def find(self, css: str, timeout: float = 30):
        from selenium.webdriver.support import expected_conditions as ec
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, timeout).until(ec.presence_of_element_located(("css selector", css)))

    def wait(self, condition, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(0.25)
        self.screenshot("failure")
        errors = [e.text for e in self.driver.find_elements("css selector", ".toast-body, .error")]
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; page messages: {errors}")

    def text_of(self, css: str) -> str:
        found = self.driver.find_elements("css selector", css)
        return found[0].text if found else ""

    def type(self, elem_id: str, text: str) -> None:
        box = self.find(f"#{elem_id} textarea, #{elem_id} input")
        box.clear()
        box.send_keys(text)

    def number(self, elem_id: str, value: int) -> None:
        from selenium.webdriver.common.keys import Keys

        box = self.find(f"#{elem_id} input[type=number]")
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(str(value))

    def click(self, css_or_element) -> None:
        """Click as a person would, past any toast over the element (a click through script lands where it should)."""
        element = self.find(css_or_element) if isinstance(css_or_element, str) else css_or_element
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'}); arguments[0].click();", element)

    def tab(self, label: str) -> None:
        buttons = [b for b in self.driver.find_elements("css selector", "button[role=tab]") if b.text.strip() == label]
        assert buttons, f"no tab {label!r}"
        self.click(buttons[0])
        time.sleep(0.5)

    def choose(self, elem_id: str, option: str) -> None:
        from selenium.webdriver.common.keys import Keys

        box = self.find(f"#{elem_id} input")
        box.click()
        box.send_keys(option)
        box.send_keys(Keys.ENTER)
        self.wait(lambda: box.get_attribute("value") == option, 10, f"{option!r} chosen in #{elem_id}")

    def close_toasts(self) -> None:
        for button in self.driver.find_elements("css selector", ".toast-close"):
            with contextlib.suppress(Exception):
                button.click()
        time.sleep(0.3)

    def screenshot(self, name: str) -> None:
        """ui-NAME.png in each screenshot folder; the first as the browser gives it, the others (docs/images)
        reduced to a 256-colour palette, which keeps a page's flat colours and makes the file a third the size."""
        import io

        from PIL import Image

        self.close_toasts()
        self.driver.execute_script("window.scrollTo(0, 0);")
        time.sleep(0.3)
        png = self.driver.get_screenshot_as_png()
        for i, folder in enumerate(self.shots):
            folder.mkdir(parents=True, exist_ok=True)
            if i == 0:
                (folder / f"ui-{name}.png").write_bytes(png)
            else:
                with Image.open(io.BytesIO(png)) as image:
                    image.convert("RGB").quantize(256).save(folder / f"ui-{name}.png", optimize=True)


def test_a_person_trains_generates_and_evaluates_in_the_browser(app, browser, photos, tmp_path):
    shots = [tmp_path / "screenshots"] + ([Path(os.environ["LRKIT_UI_SCREENSHOTS"])]
                                          if os.environ.get("LRKIT_UI_SCREENSHOTS") else [])
    page = Page(browser, shots)
    browser.get(app["url"])
    page.find("#train-photos")

    # Train: upload the photos, name the concept, a few steps, a validation image every 2
    page.find("#train-photos input[type=file]").send_keys("\n".join(photos))
    page.wait(lambda: all(Path(p).stem in page.text_of("#train-photos") for p in photos), 30, "the uploaded photos")
    page.type("train-name", "ball")
    page.type("train-class", "red checked ball")
    page.number("train-steps", 4)
    page.number("train-every", 2)
    page.click("#train-button")
    done = page.wait(lambda: "Done" in page.text_of("#train-result") and page.text_of("#train-result"), 150,
                     "the training to finish")
    assert "concepts/ball" in done
    page.wait(lambda: len(browser.find_elements("css selector", "#train-validation img")) >= 2, 20,
              "the validation images")
    page.screenshot("train")

    # Generate: two modes (the default personalized and layout-retouch) for seeds 0 and 1
    page.tab("Generate")
    page.wait(lambda: "ball" in (page.find("#gen-concept input").get_attribute("value") or ""), 20,
              "the new concept in the Generate tab")
    page.type("gen-seeds", "0, 1")
    page.number("gen-steps", 3)
    page.click("#gen-button")
    page.wait(lambda: "4/4 images" in page.text_of("#generate-result"), 90, "the generated images")
    thumbnails = page.wait(lambda: browser.find_elements("css selector", "#gen-gallery .thumbnail-item img")
                           or browser.find_elements("css selector", "#gen-gallery img"), 20, "the gallery")
    assert len(thumbnails) == 4, f"the gallery shows {len(thumbnails)} images, expected 2 modes x 2 seeds"
    page.click(browser.find_elements("css selector", "#gen-gallery .thumbnail-item")[1])  # seed 0, layout-retouch
    page.wait(lambda: "intermediates: layout, mask, reference" in browser.find_element("tag name", "body").text, 20,
              "the layout, mask and reference of the chosen image")
    page.screenshot("generate")

    # Concepts: the bundle is listed with its summary and reference photos
    page.tab("Concepts")
    page.wait(lambda: "ball" in page.text_of("#concepts-table"), 20, "the bundle in the table")
    page.screenshot("concepts")

    # Evaluate: the toy scores' bar charts and centre heatmaps
    page.tab("Evaluate")
    page.wait(lambda: "ball" in (page.find("#eval-concept input").get_attribute("value") or ""), 20,
              "the concept in the Evaluate tab")
    page.choose("eval-subject", "toy_ball")
    page.type("eval-seeds", "3")
    page.number("eval-prompts", 2)
    page.number("eval-steps", 5)
    page.click("#eval-button")
    page.wait(lambda: "Results in" in page.text_of("#eval-result"), 120, "the evaluation")
    page.wait(lambda: len(browser.find_elements("css selector", "#eval-plots img")) >= 4, 20, "the plots")
    page.screenshot("evaluate")

    for name in ("train", "generate", "concepts", "evaluate"):
        assert (shots[0] / f"ui-{name}.png").stat().st_size > 10_000
    assert shutil.which(str(CHROMIUM))
