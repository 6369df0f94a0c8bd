"""The page of `mpad serve` in a real headless browser (Debian's chromium and chromium-driver, driven by
selenium): a person picks an image, the page shows predict's score and decision, and the overlay."""

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
         "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1200,760")  # fmt: skip


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


def test_page_shows_predicts_score_and_decision(browser, tmp_path_factory, tiny_clip, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    model = tiny_export(tmp_path_factory.getbasetemp(), tiny_clip)
    images = sorted((model.parent / "ds/disc/test").glob("*/*.png"))
    threshold = mid_gap([row["image_score"] for row in predict_rows(model, images, tmp_path / "probe", 0.5)])
    rows = predict_rows(model, images, tmp_path / "predict", threshold)
    with running(create_app(load_model(model, threshold))) as url:
        browser.get(url + "/")
        WebDriverWait(browser, 30).until(lambda d: "disc" in d.find_element(By.ID, "model").text)
        for i in (1, -1):  # a good part (good/001.png) and a defect one (stain/000.png): two names
            path, row = images[i], rows[i]
            browser.find_element(By.ID, "file").send_keys(str(path))
            WebDriverWait(browser, 30).until(
                lambda d, p=path: d.find_element(By.ID, "status").text == f"{p.name}: scored"
            )
            assert float(browser.find_element(By.ID, "score").get_attribute("data-value")) == row["image_score"]
            assert browser.find_element(By.ID, "decision").text == row["decision"]
            overlay = browser.find_element(By.ID, "overlay")
            assert overlay.get_attribute("src").startswith("data:image/png;base64,")
            assert browser.execute_script("return arguments[0].naturalWidth", overlay) == 96
        browser.find_element(By.ID, "file").send_keys(str(write(tmp_path / "note.png", b"not a picture")))
        WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "error").text)
        assert "note.png: the body is not an image" in browser.find_element(By.ID, "error").text
        assert "(HTTP 400)" in browser.find_element(By.ID, "error").text
        assert browser.get_screenshot_as_png().startswith(b"\x89PNG")


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
