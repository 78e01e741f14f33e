"""``gasguard up`` as a user runs it: it starts the whole chain with a private PostgreSQL and
Mosquitto, serves the console, turns a simulated leak into a ticket, and stops cleanly on
Ctrl-C, leaving nothing running."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, free_port
from tests.e2e.system import UpProcess, clean_env, processes_under

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_up_runs_the_chain_serves_the_console_and_stops_cleanly() -> None:
    up = UpProcess("--speed", "5", "--interval", "1s")
    try:
        up.wait_up()
        assert "private PostgreSQL" in up.text and "private Mosquitto" in up.text, (
            "it says what it chose"
        )
        console = httpx.get(f"{up.url}/")
        assert console.status_code == 200 and "text/html" in console.headers["content-type"]
        api = up.api()
        inject = up.gasguard(
            "sim", "inject", "D-0001", "gas_leak", "--control-port", str(up.control_port)
        )
        assert inject.returncode == 0, inject.stderr
        ticket = None
        deadline = time.monotonic() + 60
        while ticket is None and time.monotonic() < deadline:
            ticket = next(
                (t for t in api.get("/api/tickets").json() if t["device_id"] == "D-0001"), None
            )
            time.sleep(0.5)
        assert ticket is not None, "the simulated leak reached the hotline as a ticket"
        assert (ticket["category"], ticket["cause"], ticket["household_id"]) == (
            "emergency_repair",
            "gas_leak",
            "H-0001",
        )
        assert processes_under(up.var), "the private services run under var/"
    finally:
        code = up.stop()
    assert code == 0, up.rest
    for name in ("hotline", "ingest", "gateway", "simulator", "Mosquitto", "PostgreSQL"):
        assert f"stopping   {name}" in up.rest
    time.sleep(0.5)
    assert processes_under(up.var) == [], "nothing is left running"
    up.remove()


@pytest.mark.skipif(
    os.geteuid() != 0, reason="only root runs the private PostgreSQL as another user"
)
def test_up_as_root_refuses_a_folder_the_postgres_user_cannot_enter(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gasguard.cli", "up", "--var", str(tmp_path / "var"), "--port", str(free_port())],
        capture_output=True, text=True, env=clean_env(), cwd=ROOT, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "cannot enter" in errors[0] and "Traceback" not in result.stderr, (
        result.stderr
    )
    assert oct(tmp_path.parent.parent.stat().st_mode & 0o777) == "0o700", "permissions untouched"


def test_up_on_the_pure_python_broker_still_turns_a_leak_into_a_ticket_and_closes_a_valve() -> None:
    """For machines without Mosquitto: amqtt speaks MQTT 3.1.1 only, and every service is
    switched to it (telemetry, the alarm, the valve command and its result)."""
    up = UpProcess("--speed", "5", "--interval", "1s", "--broker", "amqtt")
    try:
        up.wait_up()
        assert "pure-Python amqtt" in up.text
        api = up.api()
        inject = up.gasguard("sim", "inject", "D-0003", "gas_leak", "--set", "peak_lel=15",
                             "--control-port", str(up.control_port))  # fmt: skip
        assert inject.returncode == 0, inject.stderr
        ticket = None
        deadline = time.monotonic() + 60
        while ticket is None and time.monotonic() < deadline:
            ticket = next(
                (t for t in api.get("/api/tickets").json() if t["household_id"] == "H-0003"), None
            )
            time.sleep(0.5)
        assert ticket is not None, "the leak reached the hotline over MQTT 3.1.1"
        assert (
            api.post(
                f"/api/tickets/{ticket['id']}/valve", json={"action": "close_valve"}
            ).status_code
            == 202
        )
        deadline = time.monotonic() + 30
        state = None
        while state != "closed" and time.monotonic() < deadline:
            state = api.get(f"/api/tickets/{ticket['id']}").json()["valve_state"]
            time.sleep(0.5)
        assert state == "closed", "the command reached the gateway and its result came back"
    finally:
        code = up.stop()
    assert code == 0, up.rest
    time.sleep(0.5)
    assert processes_under(up.var) == [], "nothing is left running"
    up.remove()
