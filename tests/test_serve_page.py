"""The page of `mpad serve` in a real headless browser (Debian's chromium and chromium-driver, driven by
selenium): a person picks images, the page shows predict's scores and decisions, a row each, and the picked
row's overlay and map; a failed file leaves nothing of another on screen; the layout at 1200 px and at 420 px;
the API key asked for."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from serving import mid_gap, predict_rows, running, tiny_export

from mpad.serve.app import create_app
from mpad.serve.model import load_model

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None, reason="needs a browser: apt-get install chromium chromium-driver"
)
# Headless, and nothing that reaches beyond this machine: no updates, sync, first-run pages or GPU.
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1200,900")  # fmt: skip


@pytest.fixture(scope="module")
def browser(tmp_path_factory, monkeypatch_module):
    from selenium import webdriver

    monkeypatch_module.setenv("SE_OFFLINE", "true")  # selenium's driver manager: never download anything
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_clip):
    """(model, images, predict's rows, threshold) with a threshold that splits the images."""
    model = tiny_export(tmp_path_factory.getbasetemp(), tiny_clip)
    images = sorted((model.parent / "ds/disc/test").glob("*/*.png"))
    work = tmp_path_factory.mktemp("page")
    threshold = mid_gap([row["image_score"] for row in predict_rows(model, images, work / "probe", 0.5)])
    return model, images, predict_rows(model, images, work / "predict", threshold), threshold


def text(browser, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return browser.find_element(By.ID, element_id).text


def wait(browser, condition) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 30).until(lambda d: condition())


def test_page_shows_predicts_scores_a_row_each(browser, served, tmp_path):
    from selenium.webdriver.common.by import By

    model, images, rows, threshold = served
    with running(create_app(load_model(model, threshold), log_format=None)) as url:
        browser.set_window_size(1200, 900)
        browser.get(url + "/")
        wait(browser, lambda: "disc" in text(browser, "model"))
        for i in (1, -1):  # a good part (good/001.png) and a defect one (stain/000.png): two names
            path, row = images[i], rows[i]
            browser.find_element(By.ID, "file").send_keys(str(path))
            wait(browser, lambda p=path: text(browser, "status") == f"{p.name}: scored")
            assert float(browser.find_element(By.ID, "score").get_attribute("data-value")) == row["image_score"]
            assert text(browser, "decision") == row["decision"]
            overlay = browser.find_element(By.ID, "overlay")
            assert overlay.get_attribute("src").startswith("data:image/png;base64,")
            assert browser.execute_script("return arguments[0].naturalWidth", overlay) == 96
        # a failed file: its error, and nothing left of the defect image's verdict, overlay or map
        browser.find_element(By.ID, "file").send_keys(str(write(tmp_path / "note.png", b"not a picture")))
        wait(browser, lambda: text(browser, "status") == "note.png: failed")
        assert "note.png: the body is not an image" in text(browser, "error") and "(HTTP 400)" in text(browser, "error")
        assert not browser.find_element(By.ID, "detail").is_displayed() and text(browser, "decision") != "anomalous"
        assert browser.find_element(By.ID, "overlay").get_attribute("src") in (None, "")
        assert [td.text for td in browser.find_elements(By.CSS_SELECTOR, "#rows td")] == ["note.png", "", "error"]

        # several files at once: a row each, with predict's numbers; the picked row shows its own overlay
        browser.find_element(By.ID, "file").send_keys("\n".join(str(p) for p in images))
        wait(browser, lambda: text(browser, "status") == f"{len(images)} of {len(images)} files scored")
        shown = browser.find_elements(By.CSS_SELECTOR, "#rows tr")
        assert [tr.find_elements(By.TAG_NAME, "td")[0].text for tr in shown] == [p.name for p in images]
        assert [tr.find_elements(By.TAG_NAME, "td")[2].text for tr in shown] == [r["decision"] for r in rows]
        overlays = set()
        for tr, row in zip(shown, rows, strict=True):
            tr.click()
            assert "picked" in tr.get_attribute("class")
            assert float(browser.find_element(By.ID, "score").get_attribute("data-value")) == row["image_score"]
            assert text(browser, "decision") == row["decision"]
            overlays.add(browser.find_element(By.ID, "overlay").get_attribute("src"))
        assert len(overlays) == len(images)  # each row its own overlay
        assert browser.get_screenshot_as_png().startswith(b"\x89PNG")


def test_layout_one_row_at_1200_px_and_fits_420_px(browser, served):
    from selenium.webdriver.common.by import By

    model, images, _, threshold = served
    with running(create_app(load_model(model, threshold), log_format=None)) as url:
        for width in (1200, 420):
            browser.set_window_size(width, 900)
            browser.get(url + "/")
            wait(browser, lambda: "disc" in text(browser, "model"))
            browser.find_element(By.TAG_NAME, "summary").click()  # the identity's long hashes, shown
            browser.find_element(By.ID, "file").send_keys(str(images[-1]))
            wait(browser, lambda p=images[-1]: text(browser, "status") == f"{p.name}: scored")
            wait(browser, lambda: browser.execute_script("return document.getElementById('map').complete"))
            view = browser.execute_script("return document.documentElement.clientWidth")
            overflow = browser.execute_script("return document.documentElement.scrollWidth")
            assert overflow <= view, f"{width} px: the page is {overflow} px wide, the window {view}"
            boxes = {
                name: browser.execute_script(
                    "return arguments[0].getBoundingClientRect().toJSON()", browser.find_element(By.ID, name)
                )  # fmt: skip
                for name in ("original", "overlay", "map", "drop")
            }
            assert all(box["right"] <= view for box in boxes.values()), (width, boxes)
            if width == 1200:  # the three pictures in one row, beside the drop zone, all above the fold
                assert boxes["original"]["top"] == boxes["overlay"]["top"] == boxes["map"]["top"]
                assert boxes["map"]["bottom"] <= 900 and boxes["drop"]["right"] < boxes["original"]["left"]
            for dd in browser.find_elements(By.CSS_SELECTOR, "#identity dd"):
                width_needed, width_had = browser.execute_script(
                    "return [arguments[0].scrollWidth, arguments[0].clientWidth]", dd
                )
                assert width_needed <= width_had, dd.text


def test_page_asks_for_the_api_key(browser, served):
    from selenium.webdriver.common.by import By

    model, images, rows, threshold = served
    app = create_app(load_model(model, threshold), log_format=None, api_key="s3cret")
    with running(app) as url:
        browser.set_window_size(1200, 900)
        browser.get(url + "/")
        browser.execute_script("sessionStorage.clear()")
        browser.get(url + "/")
        wait(browser, lambda: browser.find_element(By.ID, "keyform").is_displayed())
        browser.find_element(By.ID, "key").send_keys("s3cret")
        browser.find_element(By.CSS_SELECTOR, "#keyform button").click()
        wait(browser, lambda: "disc" in text(browser, "model"))
        assert not browser.find_element(By.ID, "keyform").is_displayed()
        browser.find_element(By.ID, "file").send_keys(str(images[0]))
        wait(browser, lambda: text(browser, "status") == f"{images[0].name}: scored")
        assert float(browser.find_element(By.ID, "score").get_attribute("data-value")) == rows[0]["image_score"]
        browser.execute_script("sessionStorage.clear()")


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
