"""Gateway config files: good ones load with their profiles, bad ones say where and why."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import GatewayConfigError, MqttDevice, SerialDevice, TcpDevice, load_config

GOOD = """
gateway_id = "GW-0001"
[broker]
host = "broker.example"
port = 8883
tls = true
username = "GW-0001"
password = "s3cret"
[polling]
interval = "5s"
timeout = "500ms"
[local_broker]
port = 1884
[[devices]]
id = "D-0001"
kind = "detector"
profile = "detector-generic"
transport = "tcp"
host = "10.0.0.5"
unit = 3
interval = "1s"
[[devices]]
id = "M-0001"
kind = "meter"
profile = "meter-generic"
transport = "rtu"
serial = "/dev/ttyUSB0"
baudrate = 19200
unit = 7
[[devices]]
id = "D-WIFI"
kind = "detector"
profile = "mqtt-wifi-detector"
transport = "mqtt"
"""


OK = GOOD.replace('"500ms"', "0.5")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gw.toml"
    path.write_text(text)
    return path


def test_a_good_config_loads_with_its_profiles(tmp_path: Path) -> None:
    config, profiles = load_config(write(tmp_path, OK))
    d1, m1, wifi = config.devices
    assert isinstance(d1, TcpDevice) and d1.port == 502 and d1.unit == 3
    assert isinstance(m1, SerialDevice) and m1.link_key == "rtu:///dev/ttyUSB0"
    assert isinstance(wifi, MqttDevice)
    assert config.setting(d1, "interval") == 1.0 and config.setting(m1, "interval") == 5.0
    assert config.setting(m1, "timeout") == 0.5
    assert profiles["M-0001"].name == "meter-generic"
    assert profiles["D-WIFI"].name == "mqtt-wifi-detector"
    assert config.spool_path == Path("var/gateway/GW-0001/spool.sqlite")

    assert config.warnings() == []


def test_a_broker_user_other_than_the_gateway_id_is_warned_about(tmp_path: Path) -> None:
    config, _ = load_config(write(tmp_path, OK.replace('username = "GW-0001"', 'username = "gw1"')))
    (warning,) = config.warnings()
    assert "username 'gw1' is not the gateway_id 'GW-0001'" in warning and "ACL" in warning


BAD = [
    (OK.replace('transport = "tcp"', 'transport = "zigbee"'),
     "devices[0] (D-0001): unknown transport; use one of tcp, rtu-over-tcp, rtu, mqtt"),
    (OK.replace("unit = 3", "unit = 300"),
     "devices[0] (D-0001): unit: Input should be less than or equal to 255"),
    (OK.replace('id = "M-0001"', 'id = "D-0001"'), "device 'D-0001' is listed twice"),
    (GOOD, "polling.timeout: '500ms' is not a duration"),
    (OK.replace('gateway_id = "GW-0001"', 'gateway_id = "GW/1"'), "gateway_id:"),
    (OK.replace("[local_broker]\nport = 1884\n", ""),
     "device 'D-WIFI' uses MQTT: add a [local_broker] section"),
    (OK.replace('host = "10.0.0.5"\n', ""), "devices[0] (D-0001): host: Field required"),
    (OK.replace("tls = true", "tls = true\ncolour = 1"), "broker.colour: Extra inputs"),
    (OK.replace('profile = "meter-generic"', 'profile = "detector-generic"'),
     "device 'M-0001': profile 'detector-generic' is for a detector, the device is a meter"),
    (OK.replace('profile = "meter-generic"', 'profile = "nope"'),
     "device 'M-0001': "),
    (OK.replace('profile = "meter-generic"', 'profile = "missing.toml"'),
     "device 'M-0001': "),
    ("gateway_id = 'GW-1'\ndevices = []\n", "devices: Tuple should have at least 1 item"),
    ("gateway_id = \n", "not valid TOML"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "message"), BAD)
def test_bad_configs_name_the_file_the_device_and_the_field(
    tmp_path: Path, text: str, message: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(GatewayConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"config {path}: ")
    assert message in str(err.value)


def test_devices_sharing_a_serial_bus_must_agree_on_its_settings(tmp_path: Path) -> None:
    text = OK + (
        '[[devices]]\nid = "M-0002"\nkind = "meter"\nprofile = "meter-generic"\ntransport = "rtu"\n'
        'serial = "/dev/ttyUSB0"\nbaudrate = 9600\nunit = 8\n'
    )
    with pytest.raises(
        GatewayConfigError, match="share serial bus /dev/ttyUSB0 but not its baudrate"
    ):
        load_config(write(tmp_path, text))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(GatewayConfigError, match="no such file"):
        load_config(tmp_path / "nope.toml")
