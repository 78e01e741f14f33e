"""MQTT-native devices publish wire-format batches to a real Mosquitto (our own, on a free
port, with the project's config); a subscriber counts and decodes what arrives."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from firmware_sim.engine import Simulation
from firmware_sim.errors import SimError
from firmware_sim.mqtt_native import MqttFleet, SeqCounter
from firmware_sim.scenario import FleetSpec, Scenario, parse_event
from tests.collector import Collector
from tests.conftest import Broker, free_port


def make_sim(detectors: int, meters: int, *events: dict[str, object]) -> Simulation:
    scenario = Scenario(
        seed=5,
        fleet=FleetSpec(detectors=detectors, meters=meters),
        events=tuple(parse_event(e) for e in events),
    )
    return Simulation(scenario, dt=10.0, start_ms=int(time.time() * 1000) - 86_400_000)


@pytest.mark.integration
def test_fleet_publishes_every_reading_once_with_the_simulated_values(
    mosquitto: Broker, tmp_path: Path
) -> None:
    sim = make_sim(250, 250, {"device": "D-0007", "type": "silent"})
    collector = Collector(mosquitto)
    fleet = MqttFleet(
        sim,
        mosquitto.host,
        mosquitto.port,
        gateway_id="GW-T1",
        batch_size=200,
        seq_file=tmp_path / "seq",
    )
    fleet.connect()
    expected: dict[tuple[str, int], dict[str, np.ndarray]] = {}
    infos = []
    for _ in range(60):  # 10 simulated minutes, 60 snapshots, 240 messages, ~30k readings
        sim.run_for(10)
        for kind in ("detector", "meter"):
            ids, cols = sim.readings(kind)
            expected[(kind, sim.now_ms)] = {"dev": ids, **cols}
        infos += fleet.publish_readings()
    for info in infos:
        info.wait_for_publish(10)
    batches = collector.wait_for(len(infos))
    fleet.close()
    time.sleep(0.2)
    collector.close()

    assert len(batches) == 240
    seqs = [b.seq for _, b in batches]
    assert sorted(seqs) == list(range(1, 241)), "each sequence number once"
    assert all(channel == "telemetry" and b.gw == "GW-T1" for channel, b in batches)
    assert sum(len(b) for _, b in batches) == 60 * (249 + 250)  # the silent detector sends nothing
    assert all("D-0007" not in b.dev for _, b in batches)
    for kind in ("detector", "meter"):
        got = [b for _, b in batches if b.kind == kind]
        for ts in {int(b.ts[0]) for b in got}:
            parts = [b for b in got if b.ts[0] == ts]
            want = expected[(kind, ts)]
            np.testing.assert_array_equal(np.concatenate([b.dev for b in parts]), want["dev"])
            for name, column in want.items():
                if name != "dev":
                    np.testing.assert_array_equal(
                        np.concatenate([b.fields[name] for b in parts]), column
                    )
    assert collector.state["gasguard/v1/GW-T1/state"] == b"offline"
    assert SeqCounter(tmp_path / "seq").take() == 241, "a restarted fleet continues the sequence"


@pytest.mark.integration
def test_alarm_flag_change_is_published_at_once_on_the_alarm_topic(mosquitto: Broker) -> None:
    sim = make_sim(
        5,
        0,
        {
            "at": "30s",
            "device": "D-0002",
            "type": "gas_leak",
            "rate_lel_per_min": 30,
            "duration": "1m",
        },
    )
    collector = Collector(mosquitto)
    fleet = MqttFleet(sim, mosquitto.host, mosquitto.port, gateway_id="GW-T2")
    fleet.connect()
    for _ in range(180):  # 30 minutes: the leak starts, alarms, ends and clears
        sim.step()
        for info in fleet.publish_alarm_changes():
            info.wait_for_publish(5)
    alarms = collector.wait_for(2)
    fleet.close()
    collector.close()
    assert [(c, list(b.dev), bool(b.fields["alarm"][0])) for c, b in alarms] == [
        ("alarm", ["D-0002"], True),
        ("alarm", ["D-0002"], False),
    ]
    assert alarms[0][1].fields["ch4_lel"][0] >= 10.0


@pytest.mark.integration
def test_an_alarm_that_changed_while_the_detector_was_silent_is_published_when_it_answers(
    mosquitto: Broker,
) -> None:
    sim = make_sim(
        3,
        0,
        {"device": "D-0002", "type": "silent", "duration": "5m"},
        {"at": "30s", "device": "D-0002", "type": "gas_leak", "rate_lel_per_min": 60},
    )
    collector = Collector(mosquitto)
    fleet = MqttFleet(sim, mosquitto.host, mosquitto.port, gateway_id="GW-T3")
    fleet.connect()
    try:
        for _ in range(20):  # 200 s: the leak alarms the detector, which says nothing
            sim.step()
            assert fleet.publish_alarm_changes() == []
        assert sim.reported["detector"]["alarm"][1], "D-0002 alarms while silent"
        for _ in range(15):  # the silence ends at 5 min
            sim.step()
            for info in fleet.publish_alarm_changes():
                info.wait_for_publish(5)
        alarms = collector.wait_for(1, timeout=5)
    finally:
        fleet.close()
        collector.close()
    assert [(c, list(b.dev), bool(b.fields["alarm"][0])) for c, b in alarms] == [
        ("alarm", ["D-0002"], True)
    ]
    assert alarms[0][1].ts[0] >= sim.clock.start_ms + 300_000, "sent once it answered again"


def test_seq_file_is_fsynced_before_it_replaces_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    calls: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def spy_fsync(fd: int) -> None:
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def spy_replace(src: str | Path, dst: str | Path) -> None:
        calls.append(("replace", str(src)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    path = tmp_path / "state" / "seq"
    counter = SeqCounter(path)
    assert [counter.take(), counter.take()] == [1, 2]
    tmp = str(path.with_suffix(".tmp"))
    assert calls[:3] == [("fsync", tmp), ("replace", tmp), ("fsync", str(path.parent))]
    assert path.read_text() == "3" and not path.with_suffix(".tmp").exists()
    assert SeqCounter(path).take() == 3


@pytest.mark.integration
def test_unreachable_broker_is_a_clear_error() -> None:
    sim = make_sim(1, 1)
    fleet = MqttFleet(sim, "127.0.0.1", free_port())
    with pytest.raises(SimError, match=r"cannot reach MQTT broker 127.0.0.1:\d+"):
        fleet.connect(timeout=2)
