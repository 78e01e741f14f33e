"""MQTT device profiles: shipped files load, topics round-trip, messages decode, bad files
are named."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from gasguard.fields import FIELDS
from gasguard.profiles import ProfileError
from gasguard.profiles.mqtt import (
    MessageError,
    MqttProfile,
    builtin_mqtt_profile,
    builtin_mqtt_profile_names,
    decode_message,
    load_mqtt_profile,
)

RECEIVED_MS = 1_800_000_000_123
T_2026_11_27_02Z_MS = 1_795_744_800_000  # 2026-11-27T10:00:00+08:00

DETECTOR_MESSAGE = {
    "time": "2026-11-27T10:00:00+08:00",
    "gas": {"lel": 3.5, "alarm": "OFF", "fault": "OFF"},
    "temperature": 21.5,
    "valve": "OPEN",
}
METER_MESSAGE = {
    "ts": 1764211200000,
    "volume": 123.456,
    "flow": 0.35,
    "pressure": 2.01,
    "battery": 87,
    "valve": 0,
    "tamper": False,
}

HEAD = 'name = "t"\nkind = "detector"\ntransport = "mqtt"\ntopic = "tele/{device}/SENSOR"\n'
REQUIRED = (
    '[[fields]]\nname = "ch4_lel"\njson = "lel"\n[[fields]]\nname = "alarm"\njson = "alarm"\n'
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    return path


def profile_of(tmp_path: Path, text: str) -> MqttProfile:
    return load_mqtt_profile(write(tmp_path, text))


def decode(profile: MqttProfile, message: object) -> tuple[int, dict[str, float | bool]]:
    return decode_message(profile, orjson.dumps(message), RECEIVED_MS)


# --- shipped profiles -------------------------------------------------------------------------


def test_builtin_mqtt_profile_names() -> None:
    assert builtin_mqtt_profile_names() == ["mqtt-smart-meter", "mqtt-wifi-detector"]


@pytest.mark.parametrize(
    ("name", "kind"), [("mqtt-wifi-detector", "detector"), ("mqtt-smart-meter", "meter")]
)
def test_builtin_mqtt_profile_loads(name: str, kind: str) -> None:
    profile = builtin_mqtt_profile(name)
    assert (profile.name, profile.kind, profile.transport) == (name, kind, "mqtt")
    assert profile.source.endswith(f"{name}.toml")
    assert {f.name for f in profile.fields} <= set(FIELDS[profile.kind])
    assert load_mqtt_profile(profile.source) == profile
    assert hash(load_mqtt_profile(profile.source)) == hash(profile)


def test_unknown_builtin_mqtt_profile() -> None:
    with pytest.raises(ProfileError, match="known: mqtt-smart-meter, mqtt-wifi-detector"):
        builtin_mqtt_profile("detector-generic")


# --- topics -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "device", "topic", "subscription"),
    [
        ("mqtt-wifi-detector", "det-0042", "tele/det-0042/SENSOR", "tele/+/SENSOR"),
        ("mqtt-smart-meter", "GM4-7781", "meter/GM4-7781/state", "meter/+/state"),
    ],
)
def test_topic_round_trip(name: str, device: str, topic: str, subscription: str) -> None:
    profile = builtin_mqtt_profile(name)
    assert profile.topic_for(device) == topic
    assert profile.device_from_topic(topic) == device
    assert profile.subscription() == subscription


@pytest.mark.parametrize(
    "topic",
    ["tele/det-1/STATE", "tele/det-1", "tele/det-1/SENSOR/x", "tele//SENSOR", "x/det-1/SENSOR"],
)
def test_device_from_a_foreign_topic_is_none(topic: str) -> None:
    assert builtin_mqtt_profile("mqtt-wifi-detector").device_from_topic(topic) is None


@pytest.mark.parametrize("device", ["", "a/b", "+", "dev#1"])
def test_topic_for_refuses_a_device_id_that_is_not_one_level(device: str) -> None:
    with pytest.raises(ValueError, match="device id"):
        builtin_mqtt_profile("mqtt-wifi-detector").topic_for(device)


def test_device_level_first_or_last(tmp_path: Path) -> None:
    first = profile_of(tmp_path, HEAD.replace("tele/{device}/SENSOR", "{device}") + REQUIRED)
    assert (first.topic_for("d1"), first.subscription(), first.device_from_topic("d1")) == (
        "d1",
        "+",
        "d1",
    )
    last = profile_of(
        tmp_path, HEAD.replace("tele/{device}/SENSOR", "home/gas/{device}") + REQUIRED
    )
    assert last.device_from_topic(last.topic_for("kitchen")) == "kitchen"
    assert last.device_from_topic("home/gas") is None


# --- decoding -----------------------------------------------------------------------------------


def test_decode_wifi_detector() -> None:
    profile = builtin_mqtt_profile("mqtt-wifi-detector")
    assert decode(profile, DETECTOR_MESSAGE) == (
        T_2026_11_27_02Z_MS,
        {"ch4_lel": 3.5, "alarm": False, "fault": False, "temp_c": 21.5, "valve_closed": False},
    )
    alarming = {**DETECTOR_MESSAGE, "gas": {"lel": "27.5", "alarm": "ALARM"}, "valve": "CLOSED"}
    del alarming["temperature"]
    assert decode(profile, alarming)[1] == {"ch4_lel": 27.5, "alarm": True, "valve_closed": True}
    for true_value in ("ON", "ALARM", True, 1, 1.0):
        message = {**DETECTOR_MESSAGE, "gas": {"lel": 12, "alarm": true_value}}
        assert decode(profile, message)[1]["alarm"] is True


def test_decode_smart_meter() -> None:
    profile = builtin_mqtt_profile("mqtt-smart-meter")
    values = {"volume_m3": 123.456, "flow_m3h": 0.35, "pressure_kpa": 2.01, "battery_pct": 87.0,
              "valve_closed": False, "tamper": False}  # fmt: skip
    assert decode(profile, METER_MESSAGE) == (1764211200000, values)
    closed = {**METER_MESSAGE, "valve": 1, "tamper": "true", "battery": None}
    expected = {**values, "valve_closed": True, "tamper": True}
    del expected["battery_pct"]
    assert decode(profile, closed)[1] == expected
    assert isinstance(decode(profile, METER_MESSAGE)[1]["battery_pct"], float)


@pytest.mark.parametrize(
    ("stamp", "expected_ms"),
    [
        (1764211200, 1764211200000),  # epoch seconds
        (1764211200.25, 1764211200250),
        (1764211200123, 1764211200123),  # epoch milliseconds
        ("1764211200", 1764211200000),
        ("2026-11-27T10:00:00+08:00", T_2026_11_27_02Z_MS),
        ("2026-11-27T02:00:00.5Z", T_2026_11_27_02Z_MS + 500),
    ],
)
def test_timestamp_forms(stamp: object, expected_ms: int) -> None:
    profile = builtin_mqtt_profile("mqtt-smart-meter")
    assert decode(profile, {**METER_MESSAGE, "ts": stamp})[0] == expected_ms


def test_missing_timestamp_uses_the_receive_time(tmp_path: Path) -> None:
    meter = builtin_mqtt_profile("mqtt-smart-meter")
    without = {k: v for k, v in METER_MESSAGE.items() if k != "ts"}
    assert decode(meter, without)[0] == RECEIVED_MS
    assert decode(meter, {**METER_MESSAGE, "ts": None})[0] == RECEIVED_MS
    no_clock = profile_of(tmp_path, HEAD + REQUIRED)
    assert no_clock.timestamp is None
    assert decode(no_clock, {"lel": 1, "alarm": 0, "time": 5}) == (
        RECEIVED_MS,
        {"ch4_lel": 1.0, "alarm": False},
    )


def test_nested_paths_list_index_scale_and_offset(tmp_path: Path) -> None:
    text = HEAD + (
        'timestamp = "meta.clock.0"\n'
        '[[fields]]\nname = "ch4_lel"\njson = "sensors.0.value"\nscale = 0.1\n'
        '[[fields]]\nname = "temp_c"\njson = "sensors.1.value"\nscale = 0.5\noffset = -40\n'
        '[[fields]]\nname = "alarm"\njson = "state.flags.2"\n'
        '[[fields]]\nname = "eol"\njson = "state.by_slot.0"\n'
    )
    profile = profile_of(tmp_path, text)
    message = {
        "meta": {"clock": [1764211200, "local"]},
        "sensors": [{"value": 125}, {"value": " 121.0 "}],
        "state": {"flags": [0, 0, "on"], "by_slot": {"0": "off"}},
    }
    assert decode(profile, message) == (
        1764211200000,
        {"ch4_lel": 12.5, "temp_c": 20.5, "alarm": True, "eol": False},
    )


def test_json_true_is_not_the_number_one(tmp_path: Path) -> None:
    inverted = 'true_values = [0, "0"]\nfalse_values = [1, "1"]\n'  # a normally-closed contact
    text = HEAD + REQUIRED + inverted + '[[fields]]\nname = "fault"\njson = "fault"\n'
    profile = profile_of(tmp_path, text)
    assert profile.fields[1].true_values == (0, "0")
    assert profile.fields[2].true_values == (True, 1, "ON", "on", "true", "1")
    flags = [decode(profile, {"lel": 0, "alarm": a, "fault": a})[1] for a in (0, 1.0, "0")]
    assert flags == [
        {"ch4_lel": 0.0, "alarm": True, "fault": False},
        {"ch4_lel": 0.0, "alarm": False, "fault": True},
        {"ch4_lel": 0.0, "alarm": True, "fault": False},
    ]
    with pytest.raises(MessageError, match="value false is neither") as caught:
        decode(profile, {"lel": 0, "alarm": False})
    assert caught.value.field == "alarm"


# --- bad messages -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"gas": {"alarm": "OFF"}}, "ch4_lel", "field 'ch4_lel' (json 'gas.lel'): missing in"),
        ({"gas": {"lel": None, "alarm": 0}}, "ch4_lel", "'gas.lel'): missing in the message"),
        ({"gas": "broken"}, "ch4_lel", "field 'ch4_lel' (json 'gas.lel'): missing in"),
        ({"gas": {"lel": 3}}, "alarm", "field 'alarm' (json 'gas.alarm'): missing in"),
        ({"gas": {"lel": "abc", "alarm": 0}}, "ch4_lel", "not a finite number: 'abc'"),
        ({"gas": {"lel": "nan", "alarm": 0}}, "ch4_lel", "not a finite number: 'nan'"),
        ({"gas": {"lel": "1e999", "alarm": 0}}, "ch4_lel", "not a finite number: '1e999'"),
        ({"gas": {"lel": True, "alarm": 0}}, "ch4_lel", "not a finite number: true"),
        ({"gas": {"lel": [1], "alarm": 0}}, "ch4_lel", "not a finite number: [1]"),
        ({"temperature": "21,5"}, "temp_c", "field 'temp_c' (json 'temperature'): not a finite"),
        ({"gas": {"lel": 1, "alarm": 2}}, "alarm", "value 2 is neither a true nor a false value"),
        ({"gas": {"lel": 1, "alarm": "on"}}, "alarm", "value 'on' is neither a true nor a false"),
        ({"gas": {"lel": 1, "alarm": 0, "fault": "YES"}}, "fault", "'gas.fault'): value 'YES'"),
        ({"valve": True}, "valve_closed", "(json 'valve'): value true is neither a true nor"),
        ({"time": "yesterday"}, "timestamp", "timestamp (json 'time'): not a timestamp"),
        ({"time": "2026-11-27T10:00:00"}, "timestamp", "ISO-8601 with zone): '2026-11-27T10:00"),
        ({"time": -5}, "timestamp", "with zone): -5"),
        ({"time": False}, "timestamp", "with zone): false"),
    ],
)
def test_bad_message_names_the_field(change: dict[str, object], field: str, message: str) -> None:
    profile = builtin_mqtt_profile("mqtt-wifi-detector")
    with pytest.raises(MessageError) as caught:
        decode(profile, {**DETECTOR_MESSAGE, **change})
    assert caught.value.field == field
    assert message in str(caught.value)


def test_flow_scaled_past_the_float_range_is_refused(tmp_path: Path) -> None:
    profile = profile_of(
        tmp_path, HEAD + REQUIRED.replace('json = "lel"', 'json = "lel"\nscale=1e300')
    )
    with pytest.raises(MessageError, match="not a finite number: 1e\\+300") as caught:
        decode(profile, {"lel": 1e300, "alarm": 0})
    assert caught.value.field == "ch4_lel"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"[1, 2]", "payload is not a JSON object"),
        (b'"ON"', "payload is not a JSON object"),
        (b"{not json", "payload is not JSON"),
        (b'{"gas": {"lel": NaN}}', "payload is not JSON"),
        (b'{"gas": {"lel": 1e400}}', "payload is not JSON"),
    ],
)
def test_bad_payload(payload: bytes, reason: str) -> None:
    with pytest.raises(MessageError, match=reason) as caught:
        decode_message(builtin_mqtt_profile("mqtt-wifi-detector"), payload, RECEIVED_MS)
    assert caught.value.field is None
    assert str(caught.value).startswith(reason)


# --- bad profiles -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (HEAD + REQUIRED + 'colour = "red"\n', "field 'alarm': unknown key 'colour'"),
        (
            HEAD.replace('kind = "detector"', 'kind = "detector"\nmodel = 1') + REQUIRED,
            "unknown key 'model'",
        ),
        (HEAD.replace('transport = "mqtt"\n', "") + REQUIRED, "missing key 'transport'"),
        (HEAD.replace('"mqtt"', '"modbus"') + REQUIRED, "transport: Input should be 'mqtt'"),
        (
            HEAD + REQUIRED + '[[fields]]\nname = "co_ppm"\njson = "co"\n',
            "field 'co_ppm': not a detector field (known: ch4_lel, alarm, fault,",
        ),
        (
            HEAD + REQUIRED + '[[fields]]\nname = "flow_m3h"\njson = "f"\n',
            "field 'flow_m3h': not a detector field",
        ),
        (
            HEAD + REQUIRED + '[[fields]]\nname = "comm_lost"\njson = "lost"\n',
            "field 'comm_lost': set by the gateway",
        ),
        (
            HEAD + REQUIRED + '[[fields]]\nname = "alarm"\njson = "alarm2"\n',
            "field 'alarm': defined twice",
        ),
        (
            HEAD + REQUIRED.split('[[fields]]\nname = "alarm"', maxsplit=1)[0],
            "field 'alarm': missing, and every detector profile needs it",
        ),
        (HEAD + REQUIRED + '[[fields]]\nname = "fault"\n', "field 'fault': missing key 'json'"),
        (
            HEAD + REQUIRED + '[[fields]]\nname = "fault"\njson = "gas..fault"\n',
            "field 'fault': json: empty segment in json path 'gas..fault'",
        ),
        (
            HEAD + REQUIRED + '[[fields]]\nname = "fault"\njson = ""\n',
            "field 'fault': json: empty segment",
        ),
        (
            HEAD + REQUIRED + '[[fields]]\nname = "fault"\njson = "f"\nscale = 2.0\n',
            "field 'fault': is a flag; scale and offset are for numbers",
        ),
        (
            HEAD + REQUIRED + '[[fields]]\nname = "fault"\njson = "f"\noffset = 1\n',
            "field 'fault': is a flag; scale and offset",
        ),
        (
            HEAD + REQUIRED + '[[fields]]\nname = "temp_c"\njson = "t"\ntrue_values = ["HOT"]\n',
            "field 'temp_c': is a number; true_values and false_values are for flags",
        ),
        (
            HEAD + REQUIRED + '[[fields]]\nname = "temp_c"\njson = "t"\nfalse_values = [0]\n',
            "field 'temp_c': is a number; true_values",
        ),
        (
            HEAD + REQUIRED + '[[fields]]\nname = "temp_c"\njson = "t"\nscale = 0\n',
            "field 'temp_c': scale: must not be zero",
        ),
        (
            HEAD + REQUIRED + '[[fields]]\nname = "temp_c"\njson = "t"\nscale = nan\n',
            "field 'temp_c': scale: ",
        ),
        (
            HEAD + REQUIRED + '[[fields]]\nname = "fault"\njson = "f"\ntrue_values = []\n',
            "field 'fault': true_values: ",
        ),
        (
            HEAD + REQUIRED + '[[fields]]\nname = "fault"\njson = "f"\ntrue_values = [[1]]\n',
            "field 'fault': true_values: each value must be a string, number or boolean",
        ),
        (
            HEAD + REQUIRED + '[[fields]]\nname = "fault"\njson = "f"\ntrue_values = ["0"]\n',
            "field 'fault': '0' in both true_values and false_values "
            "(false_values is the default; set it too)",
        ),
        (
            HEAD
            + REQUIRED
            + '[[fields]]\nname = "fault"\njson = "f"\ntrue_values = [1]\nfalse_values = [1.0]\n',
            "field 'fault': 1 in both true_values and false_values",
        ),
        (HEAD + 'timestamp = "meta."\n' + REQUIRED, "timestamp: empty segment"),
        (HEAD + "fields = [1]\n", "field #1: "),
        (
            'name = "t"\nkind = "oven"\ntransport = "mqtt"\ntopic = "{device}"\n' + REQUIRED,
            "kind: Input should be 'detector' or 'meter'",
        ),
        (HEAD + 'source = "x"\n' + REQUIRED, "unknown key 'source' (the loader sets it)"),
        (HEAD + "[[fields]\n", "TOML syntax error"),
    ],
)
def test_bad_profile_names_file_field_and_problem(tmp_path: Path, text: str, problem: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ProfileError) as caught:
        load_mqtt_profile(path)
    lines = str(caught.value).splitlines()
    assert any(line.startswith(f"profile {path}: {problem}") for line in lines), lines


ONCE = "must contain {device} exactly once, as a whole level"


@pytest.mark.parametrize(
    ("topic", "problem"),
    [
        ("tele/SENSOR", ONCE),
        ("tele/{device}/{device}", ONCE),
        ("tele/dev-{device}/SENSOR", ONCE),
        ("tele/{Device}/x", ONCE),
        ("", ONCE),
        ("tele/{device}/+", "MQTT wildcards + and # (and NUL) are not allowed"),
        ("tele/{device}/#", "MQTT wildcards + and # (and NUL) are not allowed"),
        ("tele/{device}/{id}", "only {device} may appear in braces"),
    ],
)
def test_bad_topic_template(tmp_path: Path, topic: str, problem: str) -> None:
    path = write(tmp_path, HEAD.replace("tele/{device}/SENSOR", topic) + REQUIRED)
    with pytest.raises(ProfileError) as caught:
        load_mqtt_profile(path)
    assert str(caught.value) == f"profile {path}: topic: {problem} (got {topic!r})"


def test_every_problem_in_a_file_is_reported(tmp_path: Path) -> None:
    text = HEAD + (
        '[[fields]]\nname = "ch4_lel"\njson = "x"\ntrue_values = [1]\n'
        '[[fields]]\nname = "valve"\njson = "v"\n'
    )
    path = write(tmp_path, text)
    with pytest.raises(ProfileError) as caught:
        load_mqtt_profile(path)
    assert caught.value.problems == (
        "field 'ch4_lel': is a number; true_values and false_values are for flags",
        "field 'valve': not a detector field (known: ch4_lel, alarm, fault, valve_closed, eol, "
        "temp_c)",
        "field 'alarm': missing, and every detector profile needs it",
    )


def test_unreadable_profile(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="cannot read"):
        load_mqtt_profile(tmp_path / "absent.toml")
    (tmp_path / "latin1.toml").write_bytes(b'name = "\xe9"\n')
    with pytest.raises(ProfileError, match="not UTF-8 text"):
        load_mqtt_profile(tmp_path / "latin1.toml")
