"""Scenario files: the shipped ones load; bad ones are refused with a message that names the
file, the event and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from firmware_sim.errors import ScenarioError
from firmware_sim.scenario import EVENT_TYPES, load_scenario, parse_event
from gasguard.durations import parse_duration

SCENARIOS = Path(__file__).resolve().parents[2] / "firmware_sim" / "scenarios"


def test_shipped_scenarios_load() -> None:
    files = sorted(SCENARIOS.glob("*.toml"))
    assert files
    for path in files:
        scenario = load_scenario(path)
        assert scenario.events, path


def test_every_event_type_parses_with_its_defaults() -> None:
    for kind in EVENT_TYPES:
        event = parse_event({"type": kind, "device": "D-0001"})
        assert event.type == kind and event.at == 0.0 and event.duration is None


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (90, 90.0),
        (1.5, 1.5),
        ("45s", 45.0),
        ("10m", 600.0),
        ("1h30m", 5400.0),
        ("2d", 172800.0),
        (" 1h 5s ", 3605.0),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "10", "ten minutes", "5x", "-5m", True, [1]])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


BAD = [
    (
        '[[events]]\ndevice = "D-0001"\ntype = "gaz_leak"\n',
        "event 1 (gaz_leak): unknown event type",
    ),
    ('[[events]]\ndevice = "D-0001"\n', "event 1 (?): missing 'type'"),
    ('[[events]]\ntype = "silent"\n', "event 1 (silent): name exactly one target"),
    (
        '[[events]]\ntype = "silent"\ndevice = "D-1"\ndistrict = "district-1"\n',
        "(got device, district)",
    ),
    (
        '[[events]]\ntype = "gas_leak"\ndevice = "D-1"\nrate_lel_per_min = -3\n',
        "event 1 (gas_leak): rate_lel_per_min: Input should be greater than 0",
    ),
    (
        '[[events]]\ntype = "silent"\ndevice = "D-1"\nat = "soon"\n',
        "event 1 (silent): at: 'soon' is not a duration",
    ),
    (
        '[[events]]\ntype = "silent"\ndevice = "D-1"\ncolour = "red"\n',
        "event 1 (silent): colour: Extra inputs are not permitted",
    ),
    (
        '[[events]]\ntype = "modbus_exception"\ndevice = "D-1"\ncode = 99\n',
        "event 1 (modbus_exception): code:",
    ),
    (
        "[fleet]\ndetectors = -1\n",
        "scenario: fleet.detectors: Input should be greater than or equal to 0",
    ),
    ("[fleet]\ndetectors = 0\nmeters = 0\n", "a fleet needs at least one detector or meter"),
    ('seed = "x"\n', "scenario: seed: Input should be a valid integer"),
    ("[[events]\n", "not valid TOML"),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_bad_scenarios_are_refused_with_file_event_and_field(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ScenarioError) as err:
        load_scenario(path)
    assert str(err.value).startswith(f"scenario {path}: ")
    assert message in str(err.value)


def test_the_second_bad_event_is_named_by_its_position(tmp_path: Path) -> None:
    path = tmp_path / "two.toml"
    path.write_text(
        '[[events]]\ntype = "silent"\ndevice = "D-1"\n'
        '[[events]]\ntype = "burst"\ndevice = "M-1"\nflow_m3h = 0\n'
    )
    with pytest.raises(
        ScenarioError, match=r"event 2 \(burst\): flow_m3h: Input should be greater than 0"
    ):
        load_scenario(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="no such file"):
        load_scenario(tmp_path / "nope.toml")
