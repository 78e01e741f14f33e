"""A technician's two terminals: `gasguard sim run` in one, `list` and `inject` in the other."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pymodbus.client import ModbusTcpClient

from tests.conftest import ROOT, Broker, free_port, wait_for_port

pytestmark = pytest.mark.integration
GASGUARD = [sys.executable, "-m", "gasguard.cli"]


def gasguard(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: PLW1510 - the tests check returncode
        [*GASGUARD, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def running_sim(tmp_path: Path) -> Iterator[tuple[int, int, subprocess.Popen[str]]]:
    port, control = free_port(), free_port()
    proc = subprocess.Popen(
        [
            *GASGUARD,
            "sim",
            "run",
            "--detectors",
            "4",
            "--meters",
            "4",
            "--port",
            str(port),
            "--control-port",
            str(control),
            "--speed",
            "10",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )
    try:
        wait_for_port(control, timeout=20)
        yield port, control, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_start_a_building_and_make_a_detector_leak(
    running_sim: tuple[int, int, subprocess.Popen[str]],
) -> None:
    port, control, proc = running_sim
    listing = gasguard("sim", "list", "--control-port", str(control))
    assert listing.returncode == 0, listing.stderr
    assert f"D-0002     detector  H-0002     district-1   127.0.0.1:{port}" in listing.stdout
    assert "meter-generic" in listing.stdout

    client = ModbusTcpClient("127.0.0.1", port=port, timeout=2)
    client.connect()
    unit = 3  # D-0002: household by household, detector then meter
    before = client.read_input_registers(0, count=3, device_id=unit).registers
    assert before[0] < 30 and before[2] & 1 == 0  # background CH4, no alarm

    done = gasguard(
        "sim",
        "inject",
        "D-0002",
        "gas_leak",
        "--for",
        "10m",
        "--set",
        "rate_lel_per_min=600",
        "--control-port",
        str(control),
    )
    assert done.returncode == 0, done.stderr
    assert "gas_leak started on D-0002 for 10m" in done.stdout
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        regs = client.read_input_registers(0, count=3, device_id=unit).registers
        if regs[2] & 1:
            break
        time.sleep(0.2)
    assert regs[0] >= 100 and regs[2] & 1, f"detector did not alarm: {regs}"
    client.close()

    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0
    assert "simulation stopped." in out


def test_inject_refuses_unknown_devices_and_bad_events(
    running_sim: tuple[int, int, subprocess.Popen[str]],
) -> None:
    _, control, _ = running_sim
    unknown = gasguard("sim", "inject", "D-0999", "gas_leak", "--control-port", str(control))
    assert unknown.returncode == 2
    assert "unknown device 'D-0999': this simulation has D-0001 .. D-0004" in unknown.stderr
    bad_type = gasguard("sim", "inject", "D-0001", "gaz_leak", "--control-port", str(control))
    assert bad_type.returncode == 2 and "unknown event type" in bad_type.stderr
    bad_param = gasguard(
        "sim",
        "inject",
        "D-0001",
        "gas_leak",
        "--set",
        "rate_lel_per_min=-1",
        "--control-port",
        str(control),
    )
    assert (
        bad_param.returncode == 2
        and "rate_lel_per_min: Input should be greater than 0" in bad_param.stderr
    )
    bad_set = gasguard(
        "sim", "inject", "D-0001", "gas_leak", "--set", "oops", "--control-port", str(control)
    )
    assert bad_set.returncode == 2 and "--set 'oops': expected NAME=VALUE" in bad_set.stderr


def test_port_in_use_and_no_running_simulation_are_one_line_errors(
    running_sim: tuple[int, int, subprocess.Popen[str]], tmp_path: Path
) -> None:
    port, control, _ = running_sim
    clash = gasguard(
        "sim", "run", "--port", str(port), "--control-port", str(free_port()), "--duration", "1s"
    )
    assert clash.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in clash.stderr and "Traceback" not in clash.stderr
    clash = gasguard(
        "sim", "run", "--port", str(free_port()), "--control-port", str(control), "--duration", "1s"
    )
    assert clash.returncode == 2 and f"control port 127.0.0.1:{control} is in use" in clash.stderr
    nobody = gasguard("sim", "list", "--control-port", str(free_port()))
    assert nobody.returncode == 2 and "no simulation answers" in nobody.stderr


def test_bad_scenario_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[events]]\ndevice = "D-0001"\ntype = "gas_leak"\nrate_lel_per_min = "fast"\n')
    result = gasguard("sim", "run", "--scenario", str(bad), "--port", str(free_port()))
    assert result.returncode == 2
    assert f"scenario {bad}: event 1 (gas_leak): rate_lel_per_min:" in result.stderr
    assert "Traceback" not in result.stderr


def test_mqtt_native_mode_publishes_to_the_configured_broker(
    mosquitto: Broker, tmp_path: Path
) -> None:
    from paho.mqtt import subscribe

    port, control = free_port(), free_port()
    env = {**os.environ, "GASGUARD_MQTT_PORT": str(mosquitto.port)}
    proc = subprocess.Popen(
        [
            *GASGUARD,
            "sim",
            "run",
            "--detectors",
            "2",
            "--meters",
            "2",
            "--port",
            str(port),
            "--control-port",
            str(control),
            "--mqtt",
            "--gateway-id",
            "GW-CLI",
            "--report-every",
            "1s",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    try:
        msg = subscribe.simple(
            "gasguard/v1/GW-CLI/telemetry", hostname="127.0.0.1", port=mosquitto.port, qos=1
        )
        from gasguard.wire import decode_batch

        batch = decode_batch(msg.payload)  # type: ignore[union-attr]
        assert batch.gw == "GW-CLI" and len(batch) == 2
        assert (tmp_path / "var" / "sim" / "GW-CLI.seq").exists()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=15)
    assert proc.returncode == 0
