"""The whole chain on real services, started by ``gasguard up`` (simulated building, Modbus,
gateway, Mosquitto, ingest, PostgreSQL, hotline): a simulated detector leaks and the ticket
appears in the dispatcher console in a real browser with the right household and evidence;
closing the valve from the ticket closes the simulated valve and the flow reads zero. And a
technician's ``gasguard selftest`` passes without sending a crew."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect, sync_playwright

from tests.e2e.system import UpProcess

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def system() -> Iterator[UpProcess]:
    up = UpProcess("--speed", "5", "--interval", "1s")
    try:
        up.wait_up()
        yield up
    finally:
        assert up.stop() == 0, up.rest
        up.remove()


def wait_until(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what} not seen within {timeout} s")


def test_selftest_passes_and_sends_no_crew(system: UpProcess) -> None:
    result = system.gasguard("selftest", "--url", system.url, "--user", "admin", "--control-port",
                             str(system.control_port), "--steps", "leak,burst", "--devices", "D-0019,M-0020",
                             "--timeout", "90", env={"GASGUARD_SELFTEST_PASSWORD": system.password})  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        "all passed" in result.stdout
        and result.stdout.count("ok: test ticket, no crew, no valve") == 2
    )
    api = system.api()
    tickets = [t for t in api.get("/api/tickets", params={"include_closed": True}).json()
               if t["household_id"] in ("H-0019", "H-0020")]  # fmt: skip
    assert tickets and all(t["test_mode"] and t["status"] == "cancelled" for t in tickets), [
        (t["id"], t["cause"], t["test_mode"], t["status"]) for t in tickets]  # fmt: skip
    assert api.get("/api/silences").json() == [], (
        "the devices are out of test mode again:\n" + result.stdout
    )
    # a failing selftest says so: wrong password is a clear one-line error
    wrong = system.gasguard("selftest", "--url", system.url, "--user", "admin", "--control-port",
                            str(system.control_port), env={"GASGUARD_SELFTEST_PASSWORD": "nope-nope"})  # fmt: skip
    assert (
        wrong.returncode == 2
        and "cannot sign in" in wrong.stderr
        and "Traceback" not in wrong.stderr
    )


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"Debian's chromium is not at {CHROMIUM}")
def test_a_leak_reaches_the_console_and_the_valve_closes_from_the_ticket(system: UpProcess) -> None:
    api = system.api()
    flowing = system.gasguard("sim", "inject", "M-0002", "continuous_flow", "--set", "flow_m3h=0.8",
                              "--control-port", str(system.control_port))  # fmt: skip
    assert flowing.returncode == 0, flowing.stderr
    # a moderate leak (gas_low, not critical): no automatic valve, the dispatcher decides
    leak = system.gasguard("sim", "inject", "D-0002", "gas_leak", "--set", "peak_lel=18",
                           "--control-port", str(system.control_port))  # fmt: skip
    assert leak.returncode == 0, leak.stderr
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(system.url)
        page.get_by_test_id("login-username").fill("admin")
        page.get_by_test_id("login-password").fill(system.password)
        page.get_by_test_id("login-submit").click()
        expect(page.get_by_test_id("live-status")).to_contain_text("live", timeout=10_000)
        ticket = wait_until(lambda: next((t for t in api.get("/api/tickets").json()
                                          if t["household_id"] == "H-0002" and t["cause"] == "gas_leak"), None),
                            90, "the leak's ticket")  # fmt: skip
        tid = ticket["id"]
        row = page.get_by_test_id(f"ticket-row-{tid}")
        expect(row).to_be_visible(timeout=10_000)  # arrived live, no reload
        expect(page.get_by_test_id(f"ticket-address-{tid}")).to_contain_text("flat 2")
        page.get_by_test_id(f"open-{tid}").click()
        expect(page.get_by_test_id("detail-household")).to_contain_text("H-0002")
        chart = page.get_by_test_id("detail-chart")
        expect(chart).to_be_visible(timeout=10_000)
        assert int(chart.get_attribute("data-points") or 0) > 0, "the evidence: stored CH4 readings"
        page.once("dialog", lambda dialog: dialog.accept())
        page.get_by_test_id(f"valve-{tid}").click()
        confirm = page.get_by_test_id("dialog-submit")
        if confirm.is_visible():
            confirm.click()
        expect(page.get_by_test_id("detail-valve-state")).to_contain_text("closed", timeout=30_000)
        browser.close()
    detail = api.get(f"/api/tickets/{tid}").json()
    assert [(c["device_id"], c["action"], c["status"], c["requested_by"]) for c in detail["valve_commands"]] == [
        ("M-0002", "close_valve", "done", "admin")]  # fmt: skip

    def flow_reads_zero() -> bool:
        points = api.get(
            f"/api/tickets/{tid}/evidence", params={"device_id": "M-0002", "hours": 1}
        ).json()["points"]
        return bool(points) and points[-1]["value"] == 0.0

    wait_until(flow_reads_zero, 30, "the meter's flow reading zero behind the closed valve")
