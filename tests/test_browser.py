"""Issue: serve.py's search page in a real browser: Debian's Chromium driven
through chromium-driver with Selenium (headless; `make test` installs both,
tests/apt-packages.txt).  Open the page, upload a CIFAR-10 test image, see
the grid, click a result, see its results, ask for more.

The database: CIFAR-10 training images from the shared JPEG archive when it
is there (../shared/data/cifar10, as on the project's machines and CI),
else generated images; a tiny random net encodes them (the page is under
test here, not the net).
"""
import json
import tarfile

import pytest

from helpers import MEAN, ROOT, Server, make_images, make_tiny_net, run_extract

pytestmark = [pytest.mark.browser]

CIFAR_JPG = ROOT.parent / "shared" / "data" / "cifar10" / "cifar10-jpg.tar.gz"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Chromium as root on a closed network: no sandbox, no GPU, and none of the
# background connections that this machine's network refuses.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-quic", "--window-size=1200,900")
PER_CLASS = 6


def cifar_images(folder):
    """PER_CLASS training images of each class and one test image, from the
    shared archive; (train folder, query image)."""
    taken, query = {}, None
    with tarfile.open(CIFAR_JPG) as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) < 3:
                continue
            split, cls = parts[-3], parts[-2]
            if split == "train" and taken.get(cls, 0) < PER_CLASS:
                taken[cls] = taken.get(cls, 0) + 1
            elif split == "test" and query is None:
                pass
            else:
                continue
            target = folder / split / cls / parts[-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
            if split == "test":
                query = target
            if query is not None and len(taken) == 10 and min(taken.values()) == PER_CLASS:
                break
    return folder / "train", query


@pytest.fixture(scope="module")
def site(caffe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("browser")
    deploy, weights = make_tiny_net(caffe, folder, bits=12, size=32)
    if CIFAR_JPG.exists():
        train, query = cifar_images(folder / "cifar")
    else:
        train = folder / "imgs"
        make_images(train, 60, classes=("a", "b", "c"), size=(32, 32))
        query = make_images(folder / "query", 1, classes=("q",), seed=9, size=(32, 32))[0]
    db = folder / "db.lmdb"
    run_extract([train, "--out", db, "--deploy", deploy, "--weights", weights, "--mean", MEAN])
    # the model's class names (labels: the sorted class folders), as a run folder has them
    (weights.parent / "classes.txt").write_text(
        "".join(f"{p.name}\n" for p in sorted(train.iterdir()) if p.is_dir()))
    server = Server(["--db", db])
    yield {"server": server, "query": query, "folder": folder}
    server.stop()


def chromium(profile):
    """A headless Chromium driven through chromium-driver (profile: its
    user-data folder)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + (f"--user-data-dir={profile}",):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    return driver


@pytest.fixture(scope="module")
def browser(site):
    driver = chromium(site["folder"] / "chromium-profile")
    yield driver
    driver.quit()


def wait(driver, condition, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout).until(condition)


def results(driver):
    from selenium.webdriver.common.by import By
    return driver.find_elements(By.CSS_SELECTOR, "#results .result")


def text(driver, element_id):
    from selenium.webdriver.common.by import By
    return driver.find_element(By.ID, element_id).text


def thumbnails_loaded(driver):
    return driver.execute_script(
        "const imgs = [...document.querySelectorAll('#results .result img')];"
        "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);")


def test_upload_see_results_click_one_see_its_results(site, browser, tmp_path):
    from selenium.webdriver.common.by import By
    browser.get(site["server"].url)
    wait(browser, lambda d: "60 images" in text(d, "db-info"))
    browser.find_element(By.ID, "file-input").send_keys(str(site["query"]))
    wait(browser, lambda d: len(results(d)) == 24)
    assert site["query"].name in text(browser, "query-meta")
    assert "results from" in text(browser, "query-meta")
    wait(browser, thumbnails_loaded)
    first = results(browser)[0]
    assert first.get_attribute("data-rank") == "1"
    caption = first.text
    for field in ("#1", "label", "H", "L2"):
        assert field in caption
    browser.save_screenshot(str(tmp_path / "upload.png"))

    clicked = results(browser)[2]
    clicked_id = clicked.get_attribute("data-id")
    clicked.click()
    wait(browser, lambda d: f"id {clicked_id}:" in text(d, "query-meta"))
    wait(browser, lambda d: len(results(d)) == 24 and thumbnails_loaded(d))
    shown = [r.get_attribute("data-id") for r in results(browser)]
    assert clicked_id not in shown                 # a database query leaves itself out
    api = site["server"].get_json(f"/api/search?id={clicked_id}&top_k=24")[0]["results"]
    assert shown == [str(hit["id"]) for hit in api]
    # class names shown beside the label numbers
    assert api[0]["class_name"] and f"label {api[0]['label']} {api[0]['class_name']}" in \
        results(browser)[0].text
    assert browser.find_element(By.CSS_SELECTOR, "#results .result.same, "
                                                 "#results .result.other")

    browser.find_element(By.ID, "more").click()
    wait(browser, lambda d: len(results(d)) == 48)
    assert not browser.find_element(By.ID, "error").is_displayed()


def test_a_bad_upload_shows_the_servers_reason(site, browser, tmp_path):
    from selenium.webdriver.common.by import By
    browser.get(site["server"].url)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not a JPEG" * 10)
    browser.find_element(By.ID, "file-input").send_keys(str(bad))
    wait(browser, lambda d: d.find_element(By.ID, "error").is_displayed())
    message = text(browser, "error")
    assert message.startswith("400") and "not an image" in message


DROP_AND_PASTE = """
const [kind, done] = arguments;
const blob = await (await fetch('/api/images/7/thumbnail?size=32')).blob();
const file = new File([blob], kind + '.jpg', {type: 'image/jpeg'});
const data = new DataTransfer();
data.items.add(file);
if (kind === 'dropped') {
  document.getElementById('drop-zone').dispatchEvent(
    new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true}));
} else {
  document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: data, bubbles: true}));
}
done();
"""


@pytest.mark.parametrize("kind", ["dropped", "pasted"])
def test_drop_or_paste_an_image(site, browser, kind):
    browser.get(site["server"].url)
    wait(browser, lambda d: "60 images" in text(d, "db-info"))
    browser.execute_async_script(DROP_AND_PASTE, kind)
    wait(browser, lambda d: f"{kind}.jpg" in text(d, "query-meta") and len(results(d)) == 24)
    # the page shows what the API answers for the same image (the thumbnail's bytes)
    server = site["server"]
    _, _, thumbnail = server.get("/api/images/7/thumbnail?size=32")
    _, _, body = server.upload("/api/search?top_k=24", [(f"{kind}.jpg", thumbnail)])
    expected = [str(hit["id"]) for hit in json.loads(body)[0]["results"]]
    assert [r.get_attribute("data-id") for r in results(browser)] == expected
