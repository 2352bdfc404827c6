"""`fedge dashboard` in a real headless Chromium, on a real Mosquitto with agent processes.

The browser is Debian's chromium driven by Selenium through Debian's chromedriver, named by
path so Selenium Manager (which would download drivers) is never used. Both are installed
with apt when missing and running as root, as Mosquitto is.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dp_accounting
import pytest
from dp_accounting.rdp import rdp_privacy_accountant
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait

from coordinator.reference import digit_png, load_digits_split
from fedge.dashboard.state import FleetView
from fedge.harness.federation import federation
from protocol.messages.agent import AgentState, AgentStatus
from protocol.messages.codec import encode_message
from protocol.topics import Topics
from tests.brokers import MosquittoProcess, disconnect, free_port, mqtt_client, publish, wait_until

pytestmark = [pytest.mark.broker, pytest.mark.system]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
APT_TIMEOUT_S = 900
SERVER_UP_TIMEOUT_S = 60.0
FLEET_UP_TIMEOUT_S = 240.0
ROUND_TIMEOUT_S = 240.0
STALE_LOOKUPS = 20
OFFLINE_TIMEOUT_S = 10.0  # "within a few seconds": the broker sends the last will at once
SCREENSHOT_ENV = "FEDGE_DASHBOARD_SCREENSHOT"


def _browser_binaries() -> tuple[Path, Path]:
    """Debian's chromium and chromedriver; apt-installed when missing and running as root."""
    missing = not (CHROMIUM.exists() and CHROMEDRIVER.exists())
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for args in (["update"], ["install", "-y", "chromium", "chromium-driver"]):
            command = ["apt-get", *args]
            subprocess.run(
                command, capture_output=True, check=False, timeout=APT_TIMEOUT_S, env=env
            )
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail(
            "CHROMIUM IS NOT INSTALLED: the dashboard test needs a real headless browser "
            "(`apt-get install -y chromium chromium-driver`); it is never skipped",
            pytrace=False,
        )
    return CHROMIUM, CHROMEDRIVER


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WebDriver]:
    chromium, chromedriver = _browser_binaries()
    # Any attempt to run Selenium Manager (a downloader) would fail on this path.
    monkeypatch.setenv("SE_MANAGER_PATH", str(tmp_path / "no-selenium-manager"))
    options = webdriver.ChromeOptions()
    options.binary_location = str(chromium)
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root in a container has no user namespace for the sandbox
        "--disable-dev-shm-usage",
        "--window-size=1400,1500",
    ):
        options.add_argument(argument)
    service = webdriver.ChromeService(
        executable_path=str(chromedriver), log_output=str(tmp_path / "chromedriver.log")
    )
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def dashboard(mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path) -> Iterator[str]:
    """``fedge dashboard`` as a process; yields its URL."""
    port = free_port()
    log = (tmp_path / "dashboard.log").open("wb")
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "fedge", "-v", "dashboard", "--broker", mosquitto.url),
            *("--fleet", topics.fleet, "--root", topics.root, "--port", str(port)),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: _get(url + "/api/state") is not None or process.poll() is not None,
            SERVER_UP_TIMEOUT_S,
            what="the dashboard to serve",
        )
        assert process.poll() is None, (tmp_path / "dashboard.log").read_text()
        yield url
    finally:
        process.terminate()
        process.wait(30)


def _get(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, ConnectionError):
        return None


def _text(driver: WebDriver, selector: str) -> str:
    # The live page re-renders rows as events arrive: an element found a moment ago may be
    # gone by the time its text is read, so look it up again.
    for _ in range(STALE_LOOKUPS):
        found = driver.find_elements(By.CSS_SELECTOR, selector)
        if not found:
            return ""
        try:
            return str(found[0].text)
        except StaleElementReferenceException:
            continue
    return ""


def _wait_text(driver: WebDriver, selector: str, expected: str, timeout_s: float) -> None:
    WebDriverWait(driver, timeout_s, poll_frequency=0.2).until(
        lambda d: _text(d, selector) == expected,
        message=f"{selector} never showed {expected!r} (page: {driver.page_source[-3000:]})",
    )


def _epsilon(rounds: int, noise: float, delta: float) -> float:
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(noise), rounds)
    return float(accountant.get_epsilon(delta))


def _show_dp_rounds(browser: WebDriver, mosquitto: MosquittoProcess, topics: Topics) -> None:
    """Two DP rounds (2 and 3) started with `fedge round start`; a budget that stops the 4th."""
    two = _epsilon(2, 1.0, 1e-5)
    budget = two * 1.0001
    started = subprocess.run(
        [
            *(sys.executable, "-m", "fedge", "round", "start", "--broker", mosquitto.url),
            *("--fleet", topics.fleet, "--root", topics.root, "--rounds", "3"),
            *("--min-agents", "2", "--deadline", "60s", "--dp-noise-multiplier", "1.0"),
            *("--dp-clip-norm", "0.5", "--dp-target-epsilon", repr(budget)),
        ],
        capture_output=True,
        text=True,
        timeout=ROUND_TIMEOUT_S,
        check=False,
    )
    assert started.returncode == 0, started.stderr
    _wait_text(browser, 'tr[data-round="3"] .epsilon', f"{two:.3f} (1e-5)", ROUND_TIMEOUT_S)
    one = _epsilon(1, 1.0, 1e-5)
    assert _text(browser, 'tr[data-round="2"] .epsilon') == f"{one:.3f} (1e-5)"
    assert _text(browser, 'tr[data-round="1"] .epsilon') == "-"
    _wait_text(
        browser,
        "#privacy-spent",
        f"epsilon {two:.3f} at delta 1e-5 of a budget of {budget:.3f} (2 rounds charged)",
        ROUND_TIMEOUT_S,
    )
    bar = browser.find_element(By.ID, "privacy-budget")
    assert bar.is_displayed()
    assert abs(float(bar.get_attribute("value") or "nan") - two) < 1e-9
    assert abs(float(bar.get_attribute("max") or "nan") - budget) < 1e-9
    assert _text(browser, "#privacy-accounting").startswith("rdp, no sampling amplification")
    # The budget stops the plan before a 4th round: the coordinator goes idle without it.
    _wait_text(browser, "#coordinator-state", "idle", ROUND_TIMEOUT_S)
    assert _text(browser, 'tr[data-round="4"] .epsilon') == ""


def test_dashboard_shows_the_fleet_runs_rounds_with_epsilon_and_sees_an_agent_go_offline(
    mosquitto: MosquittoProcess,
    topics: Topics,
    tmp_path: Path,
    dashboard: str,
    browser: WebDriver,
) -> None:
    with federation(tmp_path / "fleet", mosquitto, topics, num_agents=2) as fed:
        coordinator = fed.start_coordinator_process()
        browser.get(dashboard)
        for agent in ("agent-00", "agent-01"):
            _wait_text(browser, f'tr[data-agent="{agent}"] .state', "online", FLEET_UP_TIMEOUT_S)
        _wait_text(browser, "#coordinator-state", "idle", FLEET_UP_TIMEOUT_S)
        assert _text(browser, "#link") == "live"

        # A round started from the page, through the coordinator's command topic.
        field = browser.find_element(By.ID, "in-min-agents")
        field.clear()
        field.send_keys("2")
        Select(browser.find_element(By.ID, "in-encoding")).select_by_visible_text("int8")
        start = browser.find_element(By.ID, "start-rounds")
        start.click()
        answers: list[str] = []

        def accepted(driver: WebDriver) -> bool:
            answer = _text(driver, "#action-result")
            if answer.startswith("waiting"):
                return False
            answers.append(answer)
            if answer.startswith("accepted"):
                return True
            # The coordinator answers `starting` until its first model is out: ask again.
            start.click()
            return False

        WebDriverWait(browser, FLEET_UP_TIMEOUT_S, poll_frequency=0.5).until(
            accepted, message="the coordinator never accepted the page's start"
        )
        assert all("starting" in a for a in answers[:-1]), answers
        WebDriverWait(browser, ROUND_TIMEOUT_S, poll_frequency=0.2).until(
            lambda d: _text(d, 'tr[data-round="1"] .accuracy') not in {"", "-"},
            message=f"round 1 never completed:\n{coordinator.log()[-3000:]}",
        )
        _wait_text(browser, "#coordinator-state", "idle", ROUND_TIMEOUT_S)
        accuracy = float(_text(browser, 'tr[data-round="1"] .accuracy'))
        assert 0.0 <= accuracy <= 1.0
        snapshot = _get(dashboard + "/api/state")
        (first,) = [r for r in snapshot["history"] if r["round"] == 1]
        assert first["updates"] == 2
        assert first["bytes_up"] > 0
        assert first["bytes_down"] > 0

        # The newest result of a camera, once the agents serve the round's model.
        frame = digit_png(load_digits_split().x_test[0, ..., 0])
        client = mqtt_client(mosquitto)
        try:

            def result_shown() -> bool:
                publish(client, topics.camera_frames("door"), frame)
                return _text(browser, 'tr[data-camera="door"] .result') != ""

            wait_until(result_shown, ROUND_TIMEOUT_S, what="a result for camera door")
        finally:
            disconnect(client)
        _show_dp_rounds(browser, mosquitto, topics)
        if os.environ.get(SCREENSHOT_ENV):
            browser.save_screenshot(os.environ[SCREENSHOT_ENV])

        # SIGKILL: only the broker's last will can tell the page.
        fed.agents[1].kill()
        _wait_text(browser, 'tr[data-agent="agent-01"] .state', "offline", OFFLINE_TIMEOUT_S)
        assert _text(browser, 'tr[data-agent="agent-00"] .state') == "online"


def test_actions_are_refused_to_foreign_origins_and_without_json(
    topics: Topics, dashboard: str
) -> None:
    for headers, status in (
        ({"Content-Type": "application/json", "Origin": "http://evil.example"}, 403),
        ({"Content-Type": "text/plain"}, 415),
    ):
        request = urllib.request.Request(
            dashboard + "/api/rounds/start", data=b"{}", headers=headers, method="POST"
        )
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=10)
        assert caught.value.code == status
    assert _get(dashboard + "/api/config")["actions"] is True


def test_the_view_drops_bad_payloads_and_stays_bounded(topics: Topics) -> None:
    view = FleetView(topics)
    view.ingest(topics.agent_status("a"), b"not json")
    view.ingest(topics.coordinator_status(), b'{"kind": "agent_status"}')
    view.ingest("elsewhere/x", b"{}")
    assert view.rejected == 3
    status = AgentStatus(agent="a", state=AgentState.OFFLINE, timestamp=1.0)
    view.ingest(topics.agent_status("a"), encode_message(status))
    view.ingest(topics.agent_status("a"), b"")  # a cleared retained message
    assert [a["state"] for a in view.snapshot()["agents"]] == ["offline"]
