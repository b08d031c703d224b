"""The web console in a real browser (Debian's headless Chromium, driven by Selenium through
Debian's chromium-driver) against a real ``cleave-cloud`` with tokens on and a real ``cleave-edge``:
the page asks for the token and shows nothing before it; then the model and its cuts, the edge's
plan with the cloud's measured stages, and a sweep job progressing to SUCCEEDED with its Pareto
plot rendered. Screenshots go to docs/ (``docs/console.png``, ``docs/console-token.png``).

``make browser`` installs the browser (as root: ``apt-get install -y chromium chromium-driver``).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from cleave_cli.client import EdgeClient
from cleave_cli.launch import DaemonProcess, cloud_process, edge_process, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "console-token"
TINY = {"name": "tiny", "source": "tests.support.factories:tiny_cnn", "input_shape": [1, 3, 16, 16]}
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the dev extra")
if CHROMIUM is None or DRIVER is None:
    pytest.skip(
        "Debian's chromium and chromium-driver are not installed: run `make browser` as root",
        allow_module_level=True,
    )

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def daemons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProcess, str]]:
    path = tmp_path_factory.mktemp("console")
    http_port = free_port()
    cloud_config = {
        "models": [TINY],
        "torch_threads": 1,
        "auth": {"tokens": [TOKEN]},
        "http": {"listen": f"127.0.0.1:{http_port}"},
        "jobs": {"dir": str(path / "store"), "concurrency": 1, "job_threads": 1},
    }
    (path / "cloud.yaml").write_text(yaml.safe_dump(cloud_config))
    edge_config = {
        "model": TINY,
        "torch_threads": 1,
        "plan": {"cut": "3", "encoding": "int8"},
        "cloud_auth": {"token": TOKEN},
        "request_timeout_s": 20.0,
    }
    (path / "edge.yaml").write_text(yaml.safe_dump(edge_config))
    cloud = cloud_process(path / "cloud.yaml", free_port(), path / "cloud.log").start()
    edge = edge_process(path / "edge.yaml", free_port(), cloud.port, path / "edge.log").start()
    yield edge, f"http://127.0.0.1:{http_port}"
    edge.stop()
    cloud.stop()


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1500"):
        options.add_argument(arg)
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not look for drivers online
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def test_console_shows_models_edges_and_a_job_to_its_plot(
    daemons: tuple[DaemonProcess, str], browser: webdriver.Chrome
) -> None:
    edge, url = daemons
    auth = {"Authorization": f"Bearer {TOKEN}"}
    # A sweep job (it draws a Pareto plot) and an edge with a pinned plan sending requests.
    spec = {
        "engine": "sweep",
        "label": "console",
        "model": {"torchvision": "resnet18", "input_shape": [1, 3, 32, 32], "num_classes": 10},
        "sweep": {"ratios": [0.0, 0.5], "bits": [32], "parallelism": 1},
    }
    job = httpx.post(url + "/api/v1/jobs", json=spec, headers=auth, timeout=60).json()
    client = EdgeClient(edge.address)
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    for _ in range(5):
        assert client.infer(x).placement  # answered (by the split: head here, tail in the cloud)

    # No token, no data: the page asks for one.
    browser.get(url + "/")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: d.find_element(By.ID, "login").is_displayed())
    assert browser.find_element(By.ID, "models").text == "—"
    (ROOT / "docs").mkdir(exist_ok=True)
    browser.save_screenshot(str(ROOT / "docs" / "console-token.png"))
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.CSS_SELECTOR, "#token-form button").click()

    # The model and its cuts; the edge's plan (cut 3, int8 features) with the cloud's measured stages.
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, 'tr[data-model="tiny"]'))
    assert "7 cuts" in browser.find_element(By.CSS_SELECTOR, 'tr[data-model="tiny"]').text
    edge_row = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "tr.edge"))
    wait.until(lambda d: "AFFINE" in d.find_element(By.CSS_SELECTOR, "tr.edge").text)
    edge_row = browser.find_element(By.CSS_SELECTOR, "tr.edge")
    assert "k=3" in edge_row.find_element(By.CSS_SELECTOR, "td.plan").text
    assert "8-bit AFFINE" in edge_row.text and edge_row.find_elements(By.CSS_SELECTOR, "svg.spark polyline")

    # The job, live: states and progress seen by the page until SUCCEEDED, then its plot drawn.
    row = f'tr.job[data-job="{job["id"]}"]'
    states, progress = set(), set()
    deadline = time.monotonic() + 500
    while time.monotonic() < deadline:
        found = browser.find_elements(By.CSS_SELECTOR, row)
        if found:
            states.add(found[0].get_attribute("data-state"))
            progress.add(found[0].find_elements(By.CSS_SELECTOR, "td")[3].text)
            if states & {"SUCCEEDED", "FAILED"}:
                break
        time.sleep(0.3)
    assert "SUCCEEDED" in states, (states, httpx.get(f"{url}/api/v1/jobs/{job['id']}", headers=auth).json())
    assert "RUNNING" in states and len(progress) >= 3, (states, progress)
    plot = WebDriverWait(browser, 60).until(
        lambda d: d.find_element(By.CSS_SELECTOR, f'img.plot[data-job="{job["id"]}"]')
    )
    WebDriverWait(browser, 30).until(lambda d: d.execute_script("return arguments[0].naturalWidth", plot) > 100)
    assert "pareto" in browser.find_element(By.CSS_SELECTOR, "pre.report").text
    browser.execute_script("arguments[0].scrollIntoView()", browser.find_element(By.ID, "models-section"))
    browser.set_window_size(1280, browser.execute_script("return document.body.scrollHeight") + 100)
    browser.save_screenshot(str(ROOT / "docs" / "console.png"))
