"""``gasguard up`` in a subprocess, as a user starts it: what it printed, the console's address,
the admin login and the simulator's control port."""

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

from tests.conftest import ROOT, free_port


def clean_env() -> dict[str, str]:
    """No GASGUARD_* settings: up starts its private PostgreSQL and Mosquitto."""
    return {k: v for k, v in os.environ.items() if not k.startswith("GASGUARD_")}


def processes_under(folder: Path) -> list[str]:
    """Command lines of running processes that mention ``folder`` (ours, started by up)."""
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if str(folder) in line and "ps -eo" not in line]


class UpProcess:
    def __init__(self, *args: str) -> None:
        # not pytest's tmp_path: its folders are closed to other users, and as root the
        # private PostgreSQL runs as the 'postgres' user
        self.folder = Path(tempfile.mkdtemp(prefix="gasguard-up-", dir="/tmp"))
        self.folder.chmod(0o755)
        self.var = self.folder / "var"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gasguard.cli", "up", "--var", str(self.var), "--port",
             str(self.port), *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=clean_env(), cwd=ROOT,
        )  # fmt: skip
        self.lines: list[str] = []
        self.password = ""
        self.control_port = 0
        self.rest = ""

    def wait_up(self, timeout: float = 120.0) -> None:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            self.lines.append(line.rstrip())
            if line.startswith("Ctrl-C stops everything"):
                break
        text = self.text
        login = re.search(r"sign in as admin / (\S+)\)", text)
        control = re.search(r"--control-port (\d+)", text)
        assert "GasGuard is up." in text and login and control, text
        self.password, self.control_port = login.group(1), int(control.group(1))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def api(self) -> httpx.Client:
        token = httpx.post(f"{self.url}/api/auth/login",
                           json={"username": "admin", "password": self.password}).json()["token"]  # fmt: skip
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=10
        )

    def gasguard(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gasguard.cli", *args], capture_output=True,
                              text=True, env={**clean_env(), **(env or {})}, cwd=ROOT, check=False)  # fmt: skip

    def stop(self) -> int:
        """Ctrl-C; returns the exit code (what it printed meanwhile is in ``rest``)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        self.rest, _ = self.process.communicate(timeout=90)
        return self.process.returncode

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
