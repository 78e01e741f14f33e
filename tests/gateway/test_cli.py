"""`gasguard gateway check` and `run` as a technician uses them on site."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.collector import Collector
from tests.conftest import ROOT, Broker, free_port, wait_for_port

pytestmark = pytest.mark.integration
GASGUARD = [sys.executable, "-m", "gasguard.cli"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: PLW1510 - the tests read returncode
        [*GASGUARD, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def test_commission_a_simulated_building_check_it_and_run_the_gateway(
    mosquitto: Broker, tmp_path: Path
) -> None:
    port, control = free_port(), free_port()
    sim = subprocess.Popen(
        [
            *GASGUARD,
            "sim",
            "run",
            "--detectors",
            "3",
            "--meters",
            "3",
            "--port",
            str(port),
            "--control-port",
            str(control),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    try:
        wait_for_port(control, timeout=20)
        env = {"GASGUARD_MQTT_PORT": str(mosquitto.port)}
        made = run(
            "sim",
            "gateway-config",
            "--gateway-id",
            "GW-SITE",
            "--interval",
            "0.5s",
            "--control-port",
            str(control),
            env=env,
        )
        assert made.returncode == 0, made.stderr
        config = tmp_path / "gw.toml"
        config.write_text(f'state_dir = "{tmp_path / "state"}"\n' + made.stdout)

        checked = run("gateway", "check", "--config", str(config))
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert "config" in checked.stdout and "valid; gateway GW-SITE, 6 devices" in checked.stdout
        assert f"D-0001       detector  127.0.0.1:{port} unit 1" in checked.stdout
        assert "ok" in checked.stdout and "6 of 6 devices answered" in checked.stdout

        inject = run("sim", "inject", "M-0002", "silent", "--control-port", str(control))
        assert inject.returncode == 0, inject.stderr
        checked = run("gateway", "check", "--config", str(config))
        assert checked.returncode == 1
        assert "M-0002" in checked.stdout and "lost" in checked.stdout
        assert "5 of 6 devices answered" in checked.stdout

        collector = Collector(mosquitto)
        gateway = subprocess.Popen(
            [*GASGUARD, "gateway", "run", "--config", str(config)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            collector.wait_until(lambda: len({d for _, b in collector.batches for d in b.dev}) >= 5)
            time.sleep(0.5)
        finally:
            gateway.send_signal(signal.SIGINT)
            out, _ = gateway.communicate(timeout=20)
            collector.close()
        assert gateway.returncode == 0, out
        assert "gateway stopped." in out
        assert "M-0002 lost" in out
    finally:
        sim.kill()
        sim.wait()


def test_check_refuses_a_bad_config_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "gw.toml"
    bad.write_text(
        'gateway_id = "GW-1"\n[[devices]]\nid = "D-1"\nkind = "detector"\nprofile = "x"\n'
    )
    result = run("gateway", "check", "--config", str(bad))
    assert result.returncode == 2
    assert result.stderr.startswith(
        f"gasguard: error: config {bad}: devices[0] (D-1): missing 'transport'"
    )
    assert "Traceback" not in result.stderr


CRASHING_GATEWAY = """
import sys, time
from gateway.batcher import Batcher
started = time.monotonic()
flush_due = Batcher.flush_due

def flush_due_with_a_bug(self):
    if time.monotonic() - started > 1.5:
        raise RuntimeError("a bug in the batcher")
    flush_due(self)

Batcher.flush_due = flush_due_with_a_bug
from gasguard.cli import main
sys.exit(main(["gateway", "run", "--config", sys.argv[1]]))
"""


def test_gateway_run_exits_non_zero_after_a_task_fails_so_systemd_restarts_it(
    mosquitto: Broker, tmp_path: Path
) -> None:
    from tests.gateway.conftest import SimServer, gateway_config

    server = SimServer(1, 1, per_device_ports=False)
    try:
        config = gateway_config(tmp_path, mosquitto, server)
        crashed = subprocess.run(  # noqa: PLW1510 - the test reads returncode
            [sys.executable, "-c", CRASHING_GATEWAY, str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    finally:
        server.close()
    assert crashed.returncode == 1, crashed.stderr
    assert "CRITICAL gateway.app: gateway task batcher failed" in crashed.stderr
    assert "RuntimeError: a bug in the batcher" in crashed.stderr, "with the traceback"
    assert crashed.stderr.rstrip().endswith(
        "gateway stopped after a failure: gateway task batcher failed:"
        " RuntimeError('a bug in the batcher')"
    )
    assert "gateway stopped." not in crashed.stdout
