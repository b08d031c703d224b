"""The web console in a real browser (Debian's headless Chromium, driven by Selenium through
Debian's chromium-driver) against a real ``cleave-cloud`` with tokens on and a real ``cleave-edge``:
the page asks for the token and shows nothing before it; then the model and its cuts, two edges'
plans with the cloud's measured stages (one pinned, one planned: its prediction beside what the
cloud measures), and a sweep job progressing to SUCCEEDED with its Pareto plot rendered.

Screenshots: with ``CLEAVE_SCREENSHOTS=1`` they refresh ``docs/console.png`` and
``docs/console-token.png``; otherwise they go to pytest's tmp_path, so a run leaves the tree as it was.

``make browser`` installs the browser (as root: ``apt-get install -y chromium chromium-driver``).
"""

from __future__ import annotations

import os
import re
import shutil
import struct
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

from selenium.common.exceptions import StaleElementReferenceException, TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def daemons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProcess, DaemonProcess, str]]:
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
    # A second edge plans by itself (a baseline that sends the input, planned once), so it tells the
    # cloud its prediction.
    planned_config = {
        "model": TINY,
        "torch_threads": 1,
        "autoplan": {"baseline": "cloud-raw", "check_interval_s": 3600.0, "probe_interval_s": 3600.0},
        "cloud_auth": {"token": TOKEN},
        "request_timeout_s": 20.0,
    }
    (path / "planned.yaml").write_text(yaml.safe_dump(planned_config))
    planned = edge_process(path / "planned.yaml", free_port(), cloud.port, path / "planned.log").start()
    yield edge, planned, f"http://127.0.0.1:{http_port}"
    planned.stop()
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


def screenshot(browser: webdriver.Chrome, name: str, tmp_path: Path) -> Path:
    """Save the viewport as ``name``: under docs/ with CLEAVE_SCREENSHOTS=1, else under ``tmp_path``.

    Asserts it is a PNG of the viewport's size in device pixels."""
    where = ROOT / "docs" if os.environ.get("CLEAVE_SCREENSHOTS") == "1" else tmp_path
    where.mkdir(exist_ok=True)
    path = where / name
    assert browser.save_screenshot(str(path)), path
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    width, height = struct.unpack(">II", data[16:24])
    scale, inner_w, inner_h = browser.execute_script(
        "return [window.devicePixelRatio, window.innerWidth, window.innerHeight]"
    )
    assert (width, height) == (round(inner_w * scale), round(inner_h * scale)), (path, width, height)
    return path


def test_console_shows_models_edges_and_a_job_to_its_plot(
    daemons: tuple[DaemonProcess, DaemonProcess, str], browser: webdriver.Chrome, tmp_path: Path
) -> None:
    edge, planned, url = daemons
    auth = {"Authorization": f"Bearer {TOKEN}"}
    # An edge with a pinned plan sending requests, and one planning.
    client = EdgeClient(edge.address)
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    for _ in range(5):
        assert client.infer(x).placement  # answered (by the split: head here, tail in the cloud)
    planner = EdgeClient(planned.address)
    deadline = time.monotonic() + 120
    while not (status := planner.status()).plan.reason.startswith("planned"):
        assert time.monotonic() < deadline, f"no plan: {status.planner_error}"
        time.sleep(0.3)
    for _ in range(5):
        planner.infer(x)

    # No token, no data: the page asks for one.
    browser.get(url + "/")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: d.find_element(By.ID, "login").is_displayed())
    assert browser.find_element(By.ID, "models").text == "—"
    screenshot(browser, "console-token.png", tmp_path)
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.CSS_SELECTOR, "#token-form button").click()

    # The model and its cuts; the pinned edge's plan (cut 3, int8 features) with the cloud's measured stages.
    # The page redraws each second: the row is found and read in one step, again if a redraw came between.
    model_row = WebDriverWait(browser, 30, ignored_exceptions=[StaleElementReferenceException]).until(
        lambda d: d.find_element(By.CSS_SELECTOR, 'tr[data-model="tiny"]').text
    )
    assert "7 cuts" in model_row

    # The page redraws each second: read each edge row whole (plan cell, prediction cell, text, plots).
    def edge_rows(d: webdriver.Chrome) -> list[dict] | None:
        rows = [
            {
                "plan": r.find_element(By.CSS_SELECTOR, "td.plan").text,
                "predicted": r.find_element(By.CSS_SELECTOR, "td.predicted").text,
                "text": r.text,
                "stages": bool(r.find_elements(By.CSS_SELECTOR, "svg.spark polyline")),
                "predicted_line": bool(r.find_elements(By.CSS_SELECTOR, "svg.spark line.predicted")),
            }
            for r in d.find_elements(By.CSS_SELECTOR, "tr.edge")
        ]
        # Both edges, each with measured cloud stages.
        return rows if len(rows) == 2 and all(r["stages"] for r in rows) else None

    try:
        rows = WebDriverWait(browser, 30, ignored_exceptions=[StaleElementReferenceException]).until(edge_rows)
    except TimeoutException:
        state = httpx.get(url + "/api/v1/console/state", headers=auth, timeout=10).json()["sessions"]
        raise AssertionError(f"the page did not show both edges with measured stages; the cloud has {state}") from None
    pinned = next(r for r in rows if "k=3" in r["plan"])
    assert "8-bit AFFINE" in pinned["text"] and "no prediction" in pinned["predicted"], pinned
    # The planned edge: its prediction (end to end, per stage) and the cloud's part, predicted vs measured.
    planned_row = next(r for r in rows if r is not pinned)
    predicted = status.plan.predicted
    total = re.search(r"([\d.]+) ms end to end", planned_row["predicted"])
    cloud = re.search(r"decode \+ compute: predicted ([\d.]+), measured ([\d.]+)", planned_row["predicted"])
    assert total and cloud, planned_row
    assert float(total[1]) == pytest.approx(predicted.total_ms, abs=0.006), planned_row
    assert float(cloud[1]) == pytest.approx(predicted.decode_ms + predicted.cloud_ms, abs=0.006), planned_row
    assert float(cloud[2]) > 0 and planned_row["predicted_line"], planned_row
    assert "CLOUD_ONLY" in planned_row["plan"], planned_row

    # A sweep job (it draws a Pareto plot), submitted while the page watches, so that the page can see it
    # run: submitted before the edges' checks above, it was at 90% by the time the page was read (seen
    # once in a fresh clone's run, progress {90%, 100%}).
    spec = {
        "engine": "sweep",
        "label": "console",
        "model": {"torchvision": "resnet18", "input_shape": [1, 3, 32, 32], "num_classes": 10},
        "sweep": {"ratios": [0.0, 0.25, 0.5, 0.75], "bits": [32], "parallelism": 1},
    }
    job = httpx.post(url + "/api/v1/jobs", json=spec, headers=auth, timeout=60).json()
    # The job, live: states and progress seen by the page until SUCCEEDED, then its plot drawn.
    row = f'tr.job[data-job="{job["id"]}"]'
    states, progress = set(), set()
    deadline = time.monotonic() + 500
    while time.monotonic() < deadline:
        found = browser.find_elements(By.CSS_SELECTOR, row)
        if found:
            try:
                state = found[0].get_attribute("data-state")
                shown = found[0].find_elements(By.CSS_SELECTOR, "td")[3].text
            except StaleElementReferenceException:  # the page redrew the table between find and read
                continue
            states.add(state)
            progress.add(shown)
            if states & {"SUCCEEDED", "FAILED"}:
                break
        time.sleep(0.3)
    assert "SUCCEEDED" in states, (states, httpx.get(f"{url}/api/v1/jobs/{job['id']}", headers=auth).json())
    assert "RUNNING" in states and len(progress) >= 3, (states, progress)
    # The details may be redrawn meanwhile (when the console state lists the job's plots): find the image anew.
    img = f'img.plot[data-job="{job["id"]}"]'
    WebDriverWait(browser, 60, ignored_exceptions=[StaleElementReferenceException]).until(
        lambda d: d.execute_script("return arguments[0].naturalWidth", d.find_element(By.CSS_SELECTOR, img)) > 100
    )
    assert "pareto" in browser.find_element(By.CSS_SELECTOR, "pre.report").text
    # The caption is the plot's title once the console state lists it (the next poll, if the job finished
    # between the state's fetch and the jobs' fetch).
    details = f'div.details[data-job="{job["id"]}"]'
    WebDriverWait(browser, 30, ignored_exceptions=[StaleElementReferenceException]).until(
        lambda d: "Pareto front" in d.find_element(By.CSS_SELECTOR, details).text
    )
    plots = httpx.get(url + "/api/v1/console/state", headers=auth, timeout=10).json()["plots"]
    assert {"job": job["id"], "name": "sweep.png"}.items() <= next(p for p in plots if p["job"] == job["id"]).items()
    browser.execute_script("arguments[0].scrollIntoView()", browser.find_element(By.ID, "models-section"))
    browser.set_window_size(1280, browser.execute_script("return document.body.scrollHeight") + 100)
    screenshot(browser, "console.png", tmp_path)
