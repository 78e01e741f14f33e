"""A gateway box: the systemd unit and the example gateway config (deploy/systemd/)."""

from __future__ import annotations

import configparser
from pathlib import Path

from tests.deploy.compose_file import DEPLOY


def test_the_gateway_unit_runs_the_gateway_hardened_and_restarts_it() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(DEPLOY / "systemd/gasguard-gateway.service")
    service = unit["Service"]
    assert service["ExecStart"].split()[1:] == [
        "gateway", "run", "--config", "/etc/gasguard/gateway.toml"]  # fmt: skip
    assert service["ExecStart"].split()[0].endswith("/gasguard")
    assert service["User"] and service["User"] != "root"
    assert service["Restart"] == "always" and service["RestartSec"]
    assert service["StateDirectory"] == "gasguard"
    assert service["ReadWritePaths"] == "/var/lib/gasguard"
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict",
                       "ProtectHome": "yes", "PrivateTmp": "yes"}.items():  # fmt: skip
        assert service[key] == value, key
    assert "network-online.target" in unit["Unit"]["After"]
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_the_gateway_example_config_loads_and_keeps_its_spool_in_the_state_directory(
    tmp_path: Path,
) -> None:
    from gateway.config import SerialDevice, TcpDevice, load_config

    example = DEPLOY / "systemd/gateway.example.toml"
    config, profiles = load_config(example)
    assert config.state_path == Path("/var/lib/gasguard")  # StateDirectory=gasguard
    assert config.broker.tls and config.broker.port == 8883
    assert config.broker.username == config.gateway_id  # the ACL's %u
    kinds = {(type(d), d.kind) for d in config.devices}
    assert kinds == {(TcpDevice, "detector"), (TcpDevice, "meter")}
    assert set(profiles) == {d.id for d in config.devices}
    # the commented RTU example is valid too, once uncommented
    text = example.read_text()
    block = text.split("# --- RTU example: uncomment to use ---\n")[1]
    block = block.split("# --- end of RTU example ---")[0]
    uncommented = "\n".join(line.removeprefix("# ") for line in block.splitlines())
    (tmp_path / "gw.toml").write_text(text + "\n" + uncommented + "\n")
    config, _ = load_config(tmp_path / "gw.toml")
    assert any(isinstance(d, SerialDevice) for d in config.devices)
