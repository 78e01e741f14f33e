"""``gasguard up`` as a user runs it: it starts the whole chain with a private PostgreSQL and
Mosquitto, serves the console, turns a simulated leak into a ticket, and stops cleanly on
Ctrl-C, leaving nothing running."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def processes_under(folder: Path) -> list[str]:
    """Command lines of running processes that mention ``folder`` (ours, started by up)."""
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if str(folder) in line and "ps -eo" not in line]


def test_up_runs_the_chain_serves_the_console_and_stops_cleanly() -> None:
    # not tmp_path: pytest's folders are closed to other users, and as root the private
    # PostgreSQL runs as the 'postgres' user (up refuses such a folder, see the next test)
    var = Path(tempfile.mkdtemp(prefix="gasguard-up-", dir="/tmp")) / "var"
    var.parent.chmod(0o755)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GASGUARD_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "gasguard.cli", "up", "--var", str(var), "--port", str(port),
         "--speed", "5", "--interval", "1s"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    assert process.stdout is not None
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip())
            if line.startswith("Ctrl-C stops everything"):
                break
        text = "\n".join(lines)
        assert "GasGuard is up." in text, text
        assert "private PostgreSQL" in text and "private Mosquitto" in text, "it says what it chose"
        login = re.search(r"sign in as admin / (\S+)\)", text)
        control = re.search(r"--control-port (\d+)", text)
        assert login and control, text
        console = httpx.get(f"http://127.0.0.1:{port}/")
        assert console.status_code == 200 and "text/html" in console.headers["content-type"]
        token = httpx.post(f"http://127.0.0.1:{port}/api/auth/login",
                           json={"username": "admin", "password": login.group(1)}).json()["token"]  # fmt: skip
        api = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"})
        inject = subprocess.run(
            [sys.executable, "-m", "gasguard.cli", "sim", "inject", "D-0001", "gas_leak",
             "--control-port", control.group(1)],
            capture_output=True, text=True, env=env, cwd=ROOT, check=False,
        )  # fmt: skip
        assert inject.returncode == 0, inject.stderr
        ticket = None
        deadline = time.monotonic() + 60
        while ticket is None and time.monotonic() < deadline:
            ticket = next((t for t in api.get("/api/tickets").json() if t["device_id"] == "D-0001"), None)
            time.sleep(0.5)
        assert ticket is not None, "the simulated leak reached the hotline as a ticket"
        assert (ticket["category"], ticket["cause"], ticket["household_id"]) == ("emergency_repair", "gas_leak", "H-0001")
        assert processes_under(var), "the private services run under var/"
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=90)
    assert process.returncode == 0, rest
    for name in ("hotline", "ingest", "gateway", "simulator", "Mosquitto", "PostgreSQL"):
        assert f"stopping   {name}" in rest
    time.sleep(0.5)
    assert processes_under(var) == [], "nothing is left running"
    shutil.rmtree(var.parent, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs the private PostgreSQL as another user")
def test_up_as_root_refuses_a_folder_the_postgres_user_cannot_enter(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GASGUARD_")}
    result = subprocess.run(
        [sys.executable, "-m", "gasguard.cli", "up", "--var", str(tmp_path / "var"), "--port", str(free_port())],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "cannot enter" in errors[0] and "Traceback" not in result.stderr, result.stderr
    assert oct(tmp_path.parent.parent.stat().st_mode & 0o777) == "0o700", "permissions untouched"
