"""The simulation's physics and scenario events, on the virtual clock (no sleeping)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from firmware_sim.clock import pace
from firmware_sim.engine import ALARM_OFF_LEL, ALARM_ON_LEL, QMAX_BY_SIZE, Simulation
from firmware_sim.scenario import FleetSpec, Scenario, parse_event

MIDNIGHT_LOCAL_MS = 1_767_196_800_000  # 2026-01-01T00:00+08:00


def sim_with(
    *events: dict[str, object],
    detectors: int = 4,
    meters: int = 4,
    districts: int = 2,
    seed: int = 3,
    dt: float = 1.0,
    start_ms: int = MIDNIGHT_LOCAL_MS,
) -> Simulation:
    scenario = Scenario(
        seed=seed,
        fleet=FleetSpec(detectors=detectors, meters=meters, districts=districts),
        events=tuple(parse_event(e) for e in events),
    )
    return Simulation(scenario, dt=dt, start_ms=start_ms)


def shown(sim: Simulation, device_id: str) -> dict[str, float | bool]:
    return sim.values(sim.device(device_id))


def test_same_seed_same_readings_over_two_days() -> None:
    events = (
        {"at": "3h", "device": "D-0002", "type": "gas_leak", "duration": "1h"},
        {"at": "20h", "district": "district-1", "type": "pressure_drop", "duration": "2h"},
    )
    runs = []
    for _ in range(2):
        sim = sim_with(*events, detectors=30, meters=30, dt=10.0)
        trace = []
        for _ in range(2 * 8640 // 60):
            sim.run_for(600)
            trace.append(
                np.concatenate(
                    [sim.reported["meter"]["volume_m3"], sim.reported["detector"]["ch4_lel"]]
                )
            )
        runs.append(np.array(trace))
    np.testing.assert_array_equal(runs[0], runs[1])
    other = sim_with(*events, detectors=30, meters=30, dt=10.0, seed=4)
    other.run_for(2 * 86400)
    assert not np.array_equal(other.reported["meter"]["volume_m3"], runs[0][-1][:30])


def test_real_time_pacing_gives_the_fast_forward_readings() -> None:
    fast = sim_with({"at": "30s", "device": "D-0001", "type": "gas_leak"}, dt=1.0)
    fast.run_for(600)

    paced = sim_with({"at": "30s", "device": "D-0001", "type": "gas_leak"}, dt=1.0)

    async def run() -> None:
        stop = asyncio.Event()

        def step() -> None:
            paced.step()
            if paced.clock.seconds >= 600:
                stop.set()

        await pace(paced.clock, step, stop, speed=3000.0)

    asyncio.run(run())
    assert paced.clock.tick == fast.clock.tick
    for kind in ("detector", "meter"):
        for name, column in fast.reported[kind].items():
            np.testing.assert_array_equal(paced.reported[kind][name], column, err_msg=name)


def test_households_cook_and_heat_water_by_day_and_use_nothing_at_night() -> None:
    sim = sim_with(detectors=0, meters=50, dt=30.0)
    night, day = [], []
    for _ in range(2 * 86400 // 30):
        sim.step()
        hour = ((sim.now_ms - MIDNIGHT_LOCAL_MS) / 3_600_000) % 24
        (night if 0.5 <= hour < 5.0 else day).append(sim.reported["meter"]["flow_m3h"].copy())
    assert np.all(np.array(night) == 0.0)
    by_household = np.array(day).max(axis=0)
    assert (by_household > 0).all(), "every household uses gas during the day"
    assert (
        by_household <= np.array([QMAX_BY_SIZE[m.meter_size or ""] for m in sim.fleet.meters])
    ).all()


def test_meter_volume_integrates_flow() -> None:
    sim = sim_with({"device": "M-0001", "type": "continuous_flow", "flow_m3h": 0.6}, dt=2.0)
    before = shown(sim, "M-0001")["volume_m3"]
    sim.run_for(3600)
    after = shown(sim, "M-0001")["volume_m3"]
    assert after - before >= 0.6 - 1e-6  # an hour of 0.6 m3/h plus whatever the household drew


def test_reverse_flow_does_not_add_forward_flow_to_the_volume_register() -> None:
    sim = sim_with(
        {"device": "M-0001", "type": "continuous_flow", "flow_m3h": 0.6},
        {"device": "M-0001", "type": "reverse_flow", "flow_m3h": 0.2, "duration": "30m"},
        dt=2.0,
    )
    before = shown(sim, "M-0001")["volume_m3"]
    sim.run_for(1200)  # 20 minutes of demand while the gas runs backwards
    during = shown(sim, "M-0001")
    assert during["reverse_flow"] is True and during["flow_m3h"] == -0.2
    assert during["volume_m3"] == before, "the register stands during a reverse flow"
    sim.run_for(1800)  # the reverse flow ended after 30 minutes: counting resumes
    assert shown(sim, "M-0001")["volume_m3"] >= before + 0.6 * 0.25


def test_detector_background_is_low_and_noisy() -> None:
    sim = sim_with(detectors=20, meters=0)
    samples = []
    for _ in range(300):
        sim.step()
        samples.append(sim.reported["detector"]["ch4_lel"].copy())
    values = np.array(samples)
    assert values.max() < 3.0 and values.std() > 0.05
    assert not sim.reported["detector"]["alarm"].any()


def test_gas_leak_ramps_alarms_then_decays_and_clears() -> None:
    sim = sim_with(
        {
            "at": "60s",
            "device": "D-0002",
            "type": "gas_leak",
            "rate_lel_per_min": 6.0,
            "peak_lel": 30.0,
            "duration": "10m",
        }
    )
    sim.run_for(60 + 120)
    ch4 = shown(sim, "D-0002")["ch4_lel"]
    assert 11.0 <= ch4 <= 14.0  # 2 min at 6 %LEL/min over a background below 2
    assert shown(sim, "D-0002")["alarm"] is True
    assert shown(sim, "D-0001")["alarm"] is False
    assert shown(sim, "M-0002")["flow_m3h"] >= 0.05  # the escaping gas goes through the meter
    sim.run_for(480)
    assert 29.0 <= shown(sim, "D-0002")["ch4_lel"] <= 32.0  # capped at the peak
    sim.run_for(1800)  # the leak ended at 11 min; ventilation takes it away
    assert shown(sim, "D-0002")["ch4_lel"] < ALARM_OFF_LEL
    assert shown(sim, "D-0002")["alarm"] is False


def test_clear_ends_a_burst_and_the_gas_decays_unless_the_home_is_vented() -> None:
    sim = sim_with(
        {"device": "M-0002", "type": "burst"},
        {"at": "120s", "device": "M-0002", "type": "clear"},
        {"device": "M-0003", "type": "burst"},
        {"at": "120s", "household": "H-0003", "type": "clear", "vent": True},
    )
    sim.run_for(119)
    assert shown(sim, "D-0002")["ch4_lel"] >= ALARM_ON_LEL
    assert shown(sim, "D-0003")["ch4_lel"] >= ALARM_ON_LEL
    sim.run_for(2)
    qmax = QMAX_BY_SIZE[sim.device("M-0002").meter_size or ""]
    assert shown(sim, "M-0002")["flow_m3h"] < qmax and shown(sim, "M-0003")["flow_m3h"] < qmax
    assert shown(sim, "D-0002")["ch4_lel"] >= ALARM_ON_LEL  # still in the air: ventilation
    assert shown(sim, "D-0003")["ch4_lel"] < 3.0  # aired at once


def test_closing_the_meter_valve_stops_flow_and_lets_the_leak_decay() -> None:
    sim = sim_with({"device": "D-0001", "type": "gas_leak", "rate_lel_per_min": 20.0})
    sim.run_for(120)
    assert shown(sim, "D-0001")["ch4_lel"] >= ALARM_ON_LEL
    sim.write_point(sim.device("M-0001"), "valve_closed", True)
    sim.run_for(1)
    assert shown(sim, "M-0001")["flow_m3h"] == 0.0
    assert shown(sim, "M-0001")["valve_closed"] is True
    peak = shown(sim, "D-0001")["ch4_lel"]
    sim.run_for(900)
    assert shown(sim, "D-0001")["ch4_lel"] < peak / 4


def test_burst_exceeds_qmax() -> None:
    sim = sim_with({"device": "M-0003", "type": "burst"})
    sim.run_for(10)
    qmax = QMAX_BY_SIZE[sim.device("M-0003").meter_size or ""]
    assert shown(sim, "M-0003")["flow_m3h"] > qmax


def test_micro_leak_and_continuous_flow_never_return_to_zero_at_night() -> None:
    sim = sim_with(
        {"device": "M-0001", "type": "micro_leak", "flow_m3h": 0.01},
        {"device": "M-0002", "type": "continuous_flow"},
        dt=10.0,
    )
    flows = []
    for _ in range(4 * 360):  # 00:00 .. 04:00 local
        sim.step()
        flows.append(sim.reported["meter"]["flow_m3h"][:3].copy())
    f = np.array(flows)
    assert np.allclose(f[:, 0], 0.01) and np.allclose(f[:, 1], 0.3) and (f[:, 2] == 0).all()


def test_pressure_drop_across_a_district() -> None:
    sim = sim_with(
        {
            "at": "10s",
            "district": "district-2",
            "type": "pressure_drop",
            "to_kpa": 0.8,
            "duration": "5m",
        },
        meters=6,
        detectors=0,
    )
    sim.run_for(20)
    p = sim.reported["meter"]["pressure_kpa"]
    members = sim.fleet.district_members("district-2")
    others = np.setdiff1d(np.arange(6), members)
    assert np.allclose(p[members], 0.8, atol=0.05)
    assert (p[others] > 1.7).all()
    sim.run_for(300)
    assert (sim.reported["meter"]["pressure_kpa"] > 1.7).all()


def test_device_flags_and_behaviours() -> None:
    sim = sim_with(
        {"device": "D-0001", "type": "sensor_fault"},
        {"device": "D-0002", "type": "end_of_life"},
        {"device": "M-0001", "type": "tamper"},
        {"device": "M-0002", "type": "reverse_flow", "flow_m3h": 0.2},
        {"device": "M-0003", "type": "slow_response", "delay_ms": 1500},
        {"device": "D-0003", "type": "modbus_exception", "code": 6},
        {"device": "D-0004", "type": "silent", "duration": "1m"},
    )
    sim.run_for(5)
    assert shown(sim, "D-0001")["fault"] is True and shown(sim, "D-0001")["ch4_lel"] == 0.0
    assert shown(sim, "D-0002")["eol"] is True
    assert shown(sim, "M-0001")["tamper"] is True
    assert shown(sim, "M-0002")["reverse_flow"] is True and shown(sim, "M-0002")["flow_m3h"] == -0.2
    assert sim.behaviour(sim.device("M-0003")).delay_s == 1.5
    assert sim.behaviour(sim.device("D-0003")).exception_code == 6
    assert sim.behaviour(sim.device("D-0004")).silent
    assert "D-0004" not in sim.readings("detector")[0]
    assert not sim.behaviour(sim.device("M-0004")).silent  # only the named device
    sim.run_for(60)
    assert not sim.behaviour(sim.device("D-0004")).silent
    assert "D-0004" in sim.readings("detector")[0]


def test_stuck_device_repeats_its_values() -> None:
    sim = sim_with(
        {"at": "30s", "device": "M-0001", "type": "continuous_flow", "flow_m3h": 1.0},
        {"at": "10s", "device": "M-0001", "type": "stuck", "duration": "10m"},
    )
    sim.run_for(10)
    frozen = shown(sim, "M-0001")
    sim.run_for(300)
    now = shown(sim, "M-0001")
    assert now["volume_m3"] == frozen["volume_m3"] and now["flow_m3h"] == frozen["flow_m3h"]
    sim.run_for(600)
    assert shown(sim, "M-0001")["volume_m3"] > frozen["volume_m3"]  # unstuck: the real count


def test_valve_event_and_clear() -> None:
    sim = sim_with(
        {"at": "5s", "household": "H-0001", "type": "valve", "closed": True},
        {"device": "M-0002", "type": "burst"},
        {"at": "20s", "device": "M-0002", "type": "clear"},
    )
    sim.run_for(10)
    assert (
        shown(sim, "M-0001")["valve_closed"] is True
        and shown(sim, "D-0001")["valve_closed"] is True
    )
    assert shown(sim, "M-0002")["flow_m3h"] > 2.0
    sim.run_for(15)
    assert sim.active_events() == []
    assert shown(sim, "M-0002")["flow_m3h"] < 2.0


def test_detector_can_close_its_valve_on_alarm() -> None:
    scenario = Scenario(
        fleet=FleetSpec(detectors=1, meters=1, detector_closes_valve_on_alarm=True),
        events=(parse_event({"device": "D-0001", "type": "gas_leak", "rate_lel_per_min": 30}),),
    )
    sim = Simulation(scenario)
    sim.run_for(60)
    assert shown(sim, "D-0001")["valve_closed"] is True
    assert shown(sim, "M-0001")["flow_m3h"] == 0.0


def test_injected_event_starts_now_and_unknown_targets_are_refused() -> None:
    sim = sim_with()
    sim.run_for(100)
    sim.inject(parse_event({"device": "D-0001", "type": "gas_leak", "rate_lel_per_min": 60}))
    sim.run_for(30)
    assert shown(sim, "D-0001")["ch4_lel"] > 20
    with pytest.raises(KeyError, match="unknown device 'D-0099'"):
        sim.inject(parse_event({"device": "D-0099", "type": "silent"}))
    with pytest.raises(KeyError, match="unknown district 'district-9'"):
        sim.inject(parse_event({"district": "district-9", "type": "pressure_drop"}))
