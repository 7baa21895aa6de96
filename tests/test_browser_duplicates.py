"""Issue 21: the near-duplicates page in a real browser (Chromium through
chromium-driver, as tests/test_browser.py drives the search page): the
groups the API lists, their thumbnails, exact copies marked, the level
switched."""
import pytest

from helpers import MEAN, Server, make_copied_images, make_tiny_net, run_extract
from test_browser import chromium, text, wait

pytestmark = [pytest.mark.browser]


@pytest.fixture(scope="module")
def dup_site(caffe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("browser_dups")
    deploy, weights = make_tiny_net(caffe, folder, bits=12, size=32)
    make_copied_images(folder / "imgs", 24, copies=3, edits=2)
    db = folder / "db.lmdb"
    run_extract([folder / "imgs", "--out", db, "--deploy", deploy, "--weights", weights,
                 "--mean", MEAN])
    server = Server(["--db", db, "--no-net"])
    yield {"server": server, "folder": folder}
    server.stop()


@pytest.fixture(scope="module")
def dup_browser(dup_site):
    driver = chromium(dup_site["folder"] / "chromium-profile")
    yield driver
    driver.quit()


def shown_groups(driver):
    return driver.execute_script(
        "return [...document.querySelectorAll('#groups .group')].map(g => "
        "[...g.querySelectorAll('.result')].map(r => Number(r.dataset.id)));")


def thumbnails_loaded(driver):
    return driver.execute_script(
        "const imgs = [...document.querySelectorAll('#groups img')];"
        "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);")


def test_the_page_shows_the_apis_groups_and_switches_level(dup_site, dup_browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    server, browser = dup_site["server"], dup_browser
    api = server.get_json("/api/duplicates")
    assert len(api["groups"]) >= 3                 # at least the three exact copies
    browser.get(server.url.rstrip("/") + "/duplicates")
    wait(browser, lambda d: "groups (duplicates" in text(d, "status"))
    assert shown_groups(browser) == [g["ids"] for g in api["groups"]]
    browser.execute_script("document.querySelectorAll('#groups img')"
                           ".forEach(i => i.loading = 'eager');")
    wait(browser, thumbnails_loaded)
    copies = browser.find_elements(By.CSS_SELECTOR, "#groups .result.copy")
    assert len(copies) == sum(len(same) - 1 for g in api["groups"]
                              for same in g["exact_copies"]) >= 3
    assert all("exact copy" in c.text for c in copies)
    browser.save_screenshot(str(tmp_path / "duplicates.png"))

    Select(browser.find_element(By.ID, "level")).select_by_value("similar")
    wait(browser, lambda d: "groups (similar" in text(d, "status"))
    similar = server.get_json("/api/duplicates?level=similar")
    assert shown_groups(browser) == [g["ids"] for g in similar["groups"]]
    assert not browser.find_element(By.ID, "error").is_displayed()
