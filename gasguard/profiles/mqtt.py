"""MQTT device profiles: which topic a Wi-Fi device publishes on and how its JSON maps to fields.

Many Wi-Fi detectors and meters publish their own JSON to a local broker instead of speaking
Modbus. A profile (a TOML file, ``transport = "mqtt"``) names the topic template and, for each
reading field of the kind (:mod:`gasguard.fields`), a dotted path into the JSON object. Problems
in a file are reported as one :class:`ProfileError` line each, like the Modbus profiles; problems
in a message raise :class:`MessageError` naming the field, so the gateway can count and log them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from gasguard.fields import COMM_LOST, FIELDS, Kind
from gasguard.profiles.model import (
    read_profile_text,
    shipped_names,
    shipped_text,
    validate_toml,
)

JsonScalar = bool | int | float | str
DEFAULT_TRUE: tuple[JsonScalar, ...] = (True, 1, "ON", "on", "true", "1")
DEFAULT_FALSE: tuple[JsonScalar, ...] = (False, 0, "OFF", "off", "false", "0")
PLACEHOLDER = "{device}"
EPOCH_MS_ABOVE = 1e11  # a larger epoch number is milliseconds (1e11 s is the year 5138)

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$", re.ASCII)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class MessageError(ValueError):
    """A device message that cannot be decoded; ``field`` is None for the payload as a whole."""

    def __init__(self, field: str | None, reason: str, json_path: str | None = None) -> None:
        self.field = field
        self.reason = reason
        name = "timestamp" if field == "timestamp" else f"field {field!r}"
        super().__init__(reason if field is None else f"{name} (json {json_path!r}): {reason}")


def _check_path(path: str) -> str:
    if any(not part for part in path.split(".")):
        raise ValueError(f"empty segment in json path {path!r}")
    return path


JsonPath = Annotated[str, AfterValidator(_check_path)]
"""A dotted path into a JSON object, list indices as numbers: ``"sensors.0.value"``."""


def _show(value: object) -> str:
    """A message value: strings quoted as Python does, the rest as JSON (true, null, 3.5)."""
    return repr(value) if isinstance(value, str) else orjson.dumps(value).decode()


def _same(a: object, b: JsonScalar) -> bool:
    """JSON equality: true is not 1, but 1 is 1.0; strings compare exactly."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


class MqttField(BaseModel):
    """One reading field taken from a dotted path in the device's JSON."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    json_path: JsonPath = Field(alias="json")
    scale: float = Field(default=1.0, allow_inf_nan=False)
    offset: float = Field(default=0.0, allow_inf_nan=False)
    true_values: tuple[JsonScalar, ...] = Field(default=DEFAULT_TRUE, min_length=1)
    false_values: tuple[JsonScalar, ...] = Field(default=DEFAULT_FALSE, min_length=1)

    @field_validator("scale")
    @classmethod
    def _scale_not_zero(cls, scale: float) -> float:
        if scale == 0:
            raise ValueError("must not be zero")
        return scale

    @field_validator("true_values", "false_values", mode="before")
    @classmethod
    def _plain_values(cls, values: object) -> object:
        if isinstance(values, list | tuple):
            for v in values:
                if not isinstance(v, JsonScalar):
                    raise ValueError(f"each value must be a string, number or boolean, not {v!r}")
        return values


class MqttProfile(BaseModel):
    """A device's MQTT topic template and the JSON path of each reading field."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    kind: Kind
    transport: Literal["mqtt"]
    description: str = ""
    topic: str
    timestamp: JsonPath | None = None
    fields: tuple[MqttField, ...]
    source: str = ""  # the file it was loaded from; set by the loader

    def topic_for(self, device: str) -> str:
        """The concrete topic that ``device`` (its id on the broker) publishes on."""
        if not device or any(c in device for c in "/+#\0"):
            raise ValueError(f"device id {device!r} must be non-empty without / + # or NUL")
        return self.topic.replace(PLACEHOLDER, device)

    def device_from_topic(self, topic: str) -> str | None:
        """The device id in a concrete ``topic``, or None when the topic is not this profile's."""
        pattern, levels = self.topic.split("/"), topic.split("/")
        if len(levels) != len(pattern):
            return None
        device = None
        for want, got in zip(pattern, levels, strict=True):
            if want == PLACEHOLDER:
                device = got
            elif want != got:
                return None
        if not device or any(c in device for c in "+#\0"):
            return None
        return device

    def subscription(self) -> str:
        """The topic filter that subscribes to every device of this profile."""
        return self.topic.replace(PLACEHOLDER, "+")

    @field_validator("topic")
    @classmethod
    def _topic_template(cls, topic: str) -> str:
        levels = topic.split("/")
        if levels.count(PLACEHOLDER) != 1 or topic.count(PLACEHOLDER) != 1:
            raise ValueError(f"must contain {PLACEHOLDER} exactly once, as a whole level")
        if any(c in topic for c in "+#\0"):
            raise ValueError("MQTT wildcards + and # (and NUL) are not allowed")
        if any(c in level for level in levels if level != PLACEHOLDER for c in "{}"):
            raise ValueError(f"only {PLACEHOLDER} may appear in braces")
        return topic

    @model_validator(mode="after")
    def _check_fields(self) -> MqttProfile:
        kind_fields = FIELDS[self.kind]
        problems: list[str] = []
        seen: set[str] = set()
        for f in self.fields:
            where = f"field {f.name!r}"
            if f.name in seen:
                problems.append(f"{where}: defined twice")
            seen.add(f.name)
            field = kind_fields.get(f.name)
            if f.name == COMM_LOST:
                problems.append(f"{where}: set by the gateway when a device is silent, not read")
            elif field is None:
                known = ", ".join(n for n in kind_fields if n != COMM_LOST)
                problems.append(f"{where}: not a {self.kind} field (known: {known})")
            elif field.type == "float" and {"true_values", "false_values"} & f.model_fields_set:
                problems.append(f"{where}: is a number; true_values and false_values are for flags")
            elif field.type == "bool" and (f.scale != 1.0 or f.offset != 0.0):
                problems.append(f"{where}: is a flag; scale and offset are for numbers")
            elif field.type == "bool":
                both = [v for v in f.true_values if any(_same(v, w) for w in f.false_values)]
                if both:
                    unset = {"true_values", "false_values"} - f.model_fields_set
                    hint = f" ({unset.pop()} is the default; set it too)" if unset else ""
                    shown = ", ".join(_show(v) for v in both)
                    problems.append(f"{where}: {shown} in both true_values and false_values{hint}")
        for field in kind_fields.values():
            if field.required and field.name not in seen:
                problems.append(
                    f"field {field.name!r}: missing, and every {self.kind} profile needs it"
                )
        if problems:
            raise ValueError("\n".join(problems))
        return self


def _lookup(message: object, path: str) -> object:
    """The value at a dotted ``path`` (list indices as numbers), or None when it is absent."""
    node = message
    for part in path.split("."):
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and part.isascii() and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _number(value: object) -> float | None:
    """A finite float from a JSON number or numeric string, else None."""
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        value = float(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
        return number if math.isfinite(number) else None
    return None


def _timestamp_ms(value: object) -> int | None:
    """Epoch milliseconds from epoch seconds, epoch ms or an ISO-8601 string with timezone."""
    number = _number(value)
    if number is not None:
        return round(number if number > EPOCH_MS_ABOVE else number * 1000) if number >= 0 else None
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            return None
        if moment.tzinfo is not None:
            return (moment - _EPOCH) // timedelta(milliseconds=1)
    return None


def decode_message(
    profile: MqttProfile, payload: bytes, received_ms: int
) -> tuple[int, dict[str, float | bool]]:
    """One device message as (timestamp in epoch ms, {field: value}).

    The timestamp is the device's own when the profile names one and the message has it, else
    ``received_ms``. A JSON null counts as absent. Optional fields that are absent are left out;
    a required one that is absent, or any value that cannot be converted, raises
    :class:`MessageError`.
    """
    try:
        message = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise MessageError(None, f"payload is not JSON: {exc}") from exc
    if not isinstance(message, dict):
        raise MessageError(None, "payload is not a JSON object")
    kind_fields = FIELDS[profile.kind]
    values: dict[str, float | bool] = {}
    for f in profile.fields:
        value = _lookup(message, f.json_path)
        if value is None:
            if kind_fields[f.name].required:
                raise MessageError(f.name, "missing in the message", f.json_path)
            continue
        if kind_fields[f.name].type == "bool":
            if any(_same(value, t) for t in f.true_values):
                values[f.name] = True
            elif any(_same(value, t) for t in f.false_values):
                values[f.name] = False
            else:
                reason = f"value {_show(value)} is neither a true nor a false value"
                raise MessageError(f.name, reason, f.json_path)
            continue
        number = _number(value)
        if number is not None:
            number = number * f.scale + f.offset
        if number is None or not math.isfinite(number):
            raise MessageError(f.name, f"not a finite number: {_show(value)}", f.json_path)
        values[f.name] = number
    stamp = received_ms
    if profile.timestamp is not None:
        raw = _lookup(message, profile.timestamp)
        if raw is not None:
            ms = _timestamp_ms(raw)
            if ms is None:
                reason = f"not a timestamp (epoch s, epoch ms, ISO-8601 with zone): {_show(raw)}"
                raise MessageError("timestamp", reason, profile.timestamp)
            stamp = ms
    return stamp, values


def _describe(err: Mapping[str, Any], data: Mapping[str, Any]) -> list[str]:
    """Rephrase one pydantic error: ``fields.2.scale`` becomes ``field 'ch4_lel': scale``."""
    loc: tuple[int | str, ...] = tuple(err["loc"])
    prefix = ""
    if len(loc) >= 2 and loc[0] == "fields" and isinstance(loc[1], int):
        raw_fields = data.get("fields")
        raw = raw_fields[loc[1]] if isinstance(raw_fields, list) else None
        name = raw.get("name") if isinstance(raw, dict) else None
        prefix = f"field {name!r}: " if isinstance(name, str) else f"field #{loc[1] + 1}: "
        loc = loc[2:]
    key = ".".join(str(part) for part in loc)
    if err["type"] in ("missing", "extra_forbidden"):
        return [f"{prefix}{'missing' if err['type'] == 'missing' else 'unknown'} key {key!r}"]
    error = err.get("ctx", {}).get("error")
    message = str(error) if isinstance(error, ValueError) else str(err["msg"])
    given = err.get("input")
    got = f" (got {given!r})" if isinstance(given, str | int | float) and key else ""
    head = f"{prefix}{key}: " if key else prefix
    return [
        line if line.startswith("field ") else f"{head}{line}{got}" for line in message.splitlines()
    ]


def _profile_from_toml(text: str, source: str) -> MqttProfile:
    return validate_toml(text, source, MqttProfile, _describe)


def load_mqtt_profile(path: str | Path) -> MqttProfile:
    """Read and validate an MQTT profile file; raise :class:`ProfileError` naming each problem."""
    return _profile_from_toml(read_profile_text(path), str(path))


def builtin_mqtt_profile_names() -> list[str]:
    """Names of the MQTT profiles shipped in ``gasguard/profiles/data`` (``mqtt-*.toml``)."""
    return shipped_names(mqtt=True)


@cache
def builtin_mqtt_profile(name: str) -> MqttProfile:
    """A shipped MQTT profile by name, e.g. ``"mqtt-wifi-detector"``."""
    return _profile_from_toml(*shipped_text(name, mqtt=True))


__all__ = [
    "DEFAULT_FALSE",
    "DEFAULT_TRUE",
    "MessageError",
    "MqttField",
    "MqttProfile",
    "builtin_mqtt_profile",
    "builtin_mqtt_profile_names",
    "decode_message",
    "load_mqtt_profile",
]
