"""The status page in a real browser: headless Chromium (Debian's `chromium` and
`chromium-driver`, installed by .ci/run) driven by selenium, beside the daemon (the installed
command) and the simulator, all on 127.0.0.1.

The page is opened once and never reloaded: a task added through its own form shows up and
goes to Finished through the event stream. The screenshot it leaves is the README's
(`ENKWATCH_UPDATE_SCREENSHOT=1` writes it to docs/status-page.png).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service as DriverService  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402

from tests.kit import Spawn, StartSim, free_port, sim_task, until, write_config  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
WAIT_S = 40.0
TOKEN = "admin-token-SECRET-browser"  # the daemon's admin token
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "status-page.png"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("chromium and chromium-driver are not installed (.ci/run installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # as root in a container
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1280,640",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=DriverService(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def row_status(driver: WebDriver, key: str) -> str | None:
    """The status cell of a task's row, read in one step (rows are re-rendered live)."""
    status = driver.execute_script(
        "for (const tr of document.querySelectorAll('#rows tr')) {"
        "  if (tr.dataset.key === arguments[0]) return tr.children[2].textContent;"
        "} return null;",
        key,
    )
    return None if status is None else str(status)


async def test_a_task_goes_to_finished_on_the_page_without_a_reload(
    tmp_path: Path, browser: WebDriver, simulate: StartSim, enkwatch: Spawn
) -> None:
    sim = await simulate(
        sim_task("t1", ("Running", 0.3), ("Finished", None)),
        sim_task("t2", ("Running", None)),
        {**sim_task("data-generation-4f1c", ("Queued", 1.0), ("Running", 2.0), ("Finished", None)),
         "dataset": "FinanceQA"},
    )  # fmt: skip
    port = free_port()
    cfg = write_config(
        tmp_path / "enkwatch.yaml",
        sim,
        [{"task_id": "t1", "labels": {"team": "safety"}}, {"task_id": "t2"}],
        state=str(tmp_path / "state.db"),
        admin={"listen": f"127.0.0.1:{port}"},
    )
    run = await enkwatch("run", "--config", cfg, ENKWATCH_ADMIN_TOKEN=TOKEN)
    await run.wait_event("task.transition", task_key="t1", status="Finished")
    await asyncio.to_thread(browser.get, f"http://127.0.0.1:{port}/")
    await until(
        lambda: browser.find_element(By.ID, "live").text == "live",
        "the page live",
        within=WAIT_S,
        every=0.1,
        blocking=True,
    )
    assert row_status(browser, "t1") == "Finished"
    assert row_status(browser, "t2") == "Running"
    browser.execute_script("window.notReloaded = true;")

    # a task added through the page's own form, with the token typed in
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "add-task-id").send_keys("data-generation-4f1c")
    browser.find_element(By.ID, "add-labels").send_keys("team=safety")
    browser.find_element(By.CSS_SELECTOR, "#add-form button").click()
    key = "data-generation-4f1c"
    await until(
        lambda: row_status(browser, key) in ("Queued", "Running"),
        f"{key} on the page",
        within=WAIT_S,
        every=0.1,
        blocking=True,
    )
    await until(
        lambda: row_status(browser, key) == "Finished",
        f"{key} Finished on the page",
        within=WAIT_S,
        every=0.1,
        blocking=True,
    )
    assert browser.execute_script("return window.notReloaded === true;")
    assert "Finished" in browser.find_element(By.ID, "counts").text

    # filter without a reload
    browser.find_element(By.ID, "q").send_keys("safety")
    await until(
        lambda: row_status(browser, "t2") is None,
        "t2 filtered out",
        within=WAIT_S,
        every=0.1,
        blocking=True,
    )
    assert row_status(browser, key) == "Finished" and row_status(browser, "t1")
    browser.find_element(By.ID, "q").clear()
    browser.find_element(By.ID, "token").clear()
    browser.find_element(By.ID, "add-task-id").clear()
    browser.find_element(By.ID, "add-labels").clear()
    browser.execute_script(
        "const q = document.getElementById('q'); q.value = '';q.dispatchEvent(new Event('input'));"
    )
    await until(
        lambda: row_status(browser, "t2") == "Running",
        "t2 back on the page",
        within=WAIT_S,
        every=0.1,
        blocking=True,
    )
    browser.find_element(By.TAG_NAME, "h1").click()  # no focus ring in the picture
    shot = tmp_path / "status-page.png"
    assert browser.save_screenshot(str(shot))
    if os.environ.get("ENKWATCH_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(shot, SCREENSHOT)
    assert shot.stat().st_size > 10_000
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []
    run.send(signal.SIGTERM)
    assert await run.wait_exit() == 0
