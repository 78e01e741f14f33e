"""The gateway's config file (TOML), validated at start-up with messages that name the file,
the device and the field.

    gateway_id = "GW-0001"
    [broker]
    host = "broker.example"
    port = 8883
    tls = true
    username = "GW-0001"
    password = "..."

    [polling]                 # defaults for every device
    interval = "10s"
    timeout = "1s"
    # tcp_client = "pymodbus" # Modbus TCP through pymodbus instead of the built-in client

    [[devices]]
    id = "D-0001"
    kind = "detector"
    profile = "detector-generic"     # a shipped profile, or a path to a profile file
    transport = "tcp"                # tcp | rtu (serial) | rtu-over-tcp | mqtt
    host = "192.168.1.20"
    port = 502
    unit = 1
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gasguard.durations import Duration
from gasguard.fields import Kind
from gasguard.profiles import Profile, ProfileError, builtin_profile, load_profile
from gasguard.profiles.mqtt import MqttProfile, builtin_mqtt_profile, load_mqtt_profile
from gasguard.wire import WireError, topic


class GatewayConfigError(ValueError):
    """The config file is unusable; the message says where and why."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BrokerConfig(_Model):
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    tls: bool = False
    ca_file: str | None = None
    username: str | None = None
    password: str | None = None
    keepalive: int = Field(30, ge=5, le=3600)
    protocol: Literal["5", "3.1.1"] = "5"  # 3.1.1 only for a broker without MQTT 5


class BatchingConfig(_Model):
    max_readings: int = Field(200, ge=1, le=5000)
    max_delay_ms: int = Field(1000, ge=0, le=600_000)


class SpoolConfig(_Model):
    path: str | None = None  # default: <state_dir>/spool.sqlite
    max_mb: float = Field(256.0, gt=0)
    max_age: Duration = 7 * 86400.0


class PollingDefaults(_Model):
    interval: Duration = 10.0
    timeout: Duration = 1.0
    report: Literal["every_poll", "on_change"] = "every_poll"
    heartbeat: Duration = 300.0
    lost_after: int = Field(2, ge=1, le=100, description="failed polls before a device is lost")
    retry_cap: Duration = 60.0
    frame_gap_ms: float = Field(
        5.0, ge=0, le=1000, description="pause between frames on a serial bus"
    )
    tcp_client: Literal["builtin", "pymodbus"] = Field(
        "builtin", description="Modbus TCP client (RTU always goes through pymodbus)"
    )


class _Device(_Model):
    id: str
    kind: Kind
    profile: str
    interval: Duration | None = None
    timeout: Duration | None = None
    report: Literal["every_poll", "on_change"] | None = None
    heartbeat: Duration | None = None


class TcpDevice(_Device):
    transport: Literal["tcp", "rtu-over-tcp"]
    host: str
    port: int = Field(502, ge=1, le=65535)
    unit: int = Field(1, ge=0, le=255)

    @property
    def link_key(self) -> str:
        return f"{self.transport}://{self.host}:{self.port}"


class SerialDevice(_Device):
    transport: Literal["rtu"]
    serial: str
    baudrate: int = Field(9600, ge=300, le=921_600)
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    unit: int = Field(1, ge=1, le=247)

    @property
    def link_key(self) -> str:
        return f"rtu://{self.serial}"


class MqttDevice(_Device):
    transport: Literal["mqtt"]
    mqtt_id: str | None = None  # the device's own id on the local broker (default: id)

    @property
    def link_key(self) -> str:
        return "mqtt://local"


Device = Annotated[TcpDevice | SerialDevice | MqttDevice, Field(discriminator="transport")]


class LocalBrokerConfig(BrokerConfig):
    """The broker in the building that MQTT-native devices publish to."""


class MetricsConfig(_Model):
    port: int = Field(0, ge=0, le=65535, description="0: no metrics endpoint")
    host: str = "127.0.0.1"


class GatewayConfig(_Model):
    gateway_id: str
    state_dir: str | None = None  # default: var/gateway/<gateway_id>
    broker: BrokerConfig = BrokerConfig()
    local_broker: LocalBrokerConfig | None = None
    batching: BatchingConfig = BatchingConfig()
    spool: SpoolConfig = SpoolConfig()
    polling: PollingDefaults = PollingDefaults()
    metrics: MetricsConfig = MetricsConfig()
    devices: tuple[Device, ...] = Field(min_length=1)

    def warnings(self) -> list[str]:
        """What is allowed but probably wrong (printed by ``check``, logged at start)."""
        out = []
        user = self.broker.username
        if user is not None and user != self.gateway_id:
            out.append(
                f"[broker] username {user!r} is not the gateway_id {self.gateway_id!r}: "
                "GasGuard's broker ACL (deploy/mosquitto/acl) lets a gateway publish only "
                "under its own user name, so the broker would refuse every batch (Mosquitto "
                "then drops the connection, and the gateway keeps reconnecting and spooling)"
            )
        return out

    @model_validator(mode="after")
    def _consistent(self) -> GatewayConfig:
        try:
            topic(self.gateway_id, "telemetry")
        except WireError as exc:
            raise ValueError(f"gateway_id: {exc.reason}") from None
        seen: set[str] = set()
        buses: dict[str, SerialDevice] = {}
        for d in self.devices:
            if (
                not d.id
                or len(d.id) > 64
                or not d.id.isprintable()
                or any(c.isspace() for c in d.id)
            ):
                raise ValueError(f"device id {d.id!r}: 1-64 printable characters, no spaces")
            if d.id in seen:
                raise ValueError(f"device {d.id!r} is listed twice")
            seen.add(d.id)
            if isinstance(d, SerialDevice):
                first = buses.setdefault(d.serial, d)
                if (first.baudrate, first.parity, first.stopbits) != (
                    d.baudrate,
                    d.parity,
                    d.stopbits,
                ):
                    raise ValueError(
                        f"devices {first.id!r} and {d.id!r} share serial bus {d.serial} "
                        "but not its baudrate/parity/stopbits"
                    )
            if isinstance(d, MqttDevice) and self.local_broker is None:
                raise ValueError(f"device {d.id!r} uses MQTT: add a [local_broker] section")
        return self

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir or f"var/gateway/{self.gateway_id}")

    @property
    def spool_path(self) -> Path:
        return Path(self.spool.path) if self.spool.path else self.state_path / "spool.sqlite"

    def setting(self, device: Device, name: str) -> float | str:
        """A device's own polling setting, or the default."""
        own = getattr(device, name, None)
        value: float | str = getattr(self.polling, name) if own is None else own
        return value


def load_config(path: str | Path) -> tuple[GatewayConfig, dict[str, Profile | MqttProfile]]:
    """Read and validate a config file and every profile it names (by device id)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GatewayConfigError(f"config {path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise GatewayConfigError(f"config {path}: not valid TOML: {exc}") from None
    try:
        config = GatewayConfig.model_validate(data)
    except ValidationError as exc:
        raise GatewayConfigError(f"config {path}: {_explain(exc, data)}") from None
    profiles: dict[str, Profile | MqttProfile] = {}
    cache: dict[tuple[str, bool], Profile | MqttProfile] = {}
    for device in config.devices:
        mqtt_device = isinstance(device, MqttDevice)
        key = (device.profile, mqtt_device)
        try:
            if key not in cache:
                cache[key] = _profile(device.profile, mqtt_device, path.parent)
        except (ProfileError, OSError) as exc:
            raise GatewayConfigError(f"config {path}: device {device.id!r}: {exc}") from None
        profile = cache[key]
        if profile.kind != device.kind:
            raise GatewayConfigError(
                f"config {path}: device {device.id!r}: profile {profile.name!r} is for a "
                f"{profile.kind}, the device is a {device.kind}"
            )
        profiles[device.id] = profile
    return config, profiles


def _profile(name: str, mqtt_device: bool, base: Path) -> Profile | MqttProfile:
    if name.endswith(".toml"):
        file = Path(name) if Path(name).is_absolute() else base / name
        return load_mqtt_profile(file) if mqtt_device else load_profile(file)
    return builtin_mqtt_profile(name) if mqtt_device else builtin_profile(name)


def _explain(exc: ValidationError, data: object) -> str:
    lines = []
    devices = data.get("devices", []) if isinstance(data, dict) else []
    for err in exc.errors():
        loc = list(err["loc"])
        where = ""
        if len(loc) >= 2 and loc[0] == "devices" and isinstance(loc[1], int):
            entry = devices[loc[1]] if loc[1] < len(devices) else {}
            ident = entry.get("id", "?") if isinstance(entry, dict) else "?"
            where = f"devices[{loc[1]}] ({ident}): "
            loc = (
                loc[3:]
                if len(loc) > 2 and isinstance(loc[2], str) and loc[2] in _TRANSPORTS
                else loc[2:]
            )
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "union_tag_invalid":
            msg = f"unknown transport; use one of {', '.join(_TRANSPORTS)}"
        elif err["type"] == "union_tag_not_found":
            msg = "missing 'transport' (tcp, rtu, rtu-over-tcp or mqtt)"
        field = ".".join(str(p) for p in loc)
        lines.append(f"{where}{field + ': ' if field else ''}{msg}")
    return "; ".join(lines)


_TRANSPORTS = ("tcp", "rtu-over-tcp", "rtu", "mqtt")
