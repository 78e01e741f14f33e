"""Batch boundaries, replays, persistence and growth of the detection state; the small API."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest

from ingest.detect import (
    NO_TS,
    DetectorColumns,
    DetectorParams,
    DetectorState,
    Events,
    MeterColumns,
    MeterParams,
    MeterState,
    Rule,
    Severity,
    detect_detectors,
    detect_meters,
    district_incidents,
    qmax_for_sizes,
)
from tests.ingest.test_detect_model import event_rows
from tests.ingest.test_detect_streams import (
    Columns,
    detector_stream,
    meter_stream,
    split,
    to_columns,
    with_replays,
)

DEVICES = 5
QMAX = np.array([2.5, 4.0, 6.0, np.nan, 2.5])


def kind_setup(kind: str, seed: int, length: int = 600) -> tuple[Columns, Any, Any, Any]:
    rng = np.random.default_rng(seed)
    if kind == "detector":
        stream = detector_stream(rng, DEVICES, length)
        return stream, DetectorParams(), DetectorState, detect_detectors
    stream = meter_stream(rng, DEVICES, length, QMAX)
    return stream, MeterParams(qmax_by_device=QMAX), MeterState, detect_meters


def feed(
    kind: str, parts: list[Columns], params: Any, state: Any, kernel: Any
) -> tuple[list[Any], int]:
    rows: list[Any] = []
    stale = 0
    for part in parts:
        events, state = kernel(to_columns(kind, part), params, state)
        rows += event_rows(events)
        stale += events.stale
    return rows, stale


@pytest.mark.parametrize("kind", ["detector", "meter"])
@pytest.mark.parametrize("seed", [11, 12])
def test_events_do_not_depend_on_batch_boundaries(kind: str, seed: int) -> None:
    stream, params, state_cls, kernel = kind_setup(kind, seed, length=200)
    stream = with_replays(np.random.default_rng(seed), stream, 0.05)
    whole, whole_stale = feed(kind, [stream], params, state_cls(DEVICES), kernel)
    assert whole and whole_stale > 0
    rng = np.random.default_rng(seed + 1)
    for mean in (1, 4, 60):
        one_state = state_cls(DEVICES)
        got, stale = feed(kind, list(split(rng, stream, mean)), params, one_state, kernel)
        assert (got, stale) == (whole, whole_stale)


@pytest.mark.parametrize("kind", ["detector", "meter"])
def test_replayed_batches_are_ignored_and_counted(kind: str) -> None:
    stream, params, state_cls, kernel = kind_setup(kind, 3)
    parts = list(split(np.random.default_rng(0), stream, 50))
    state = state_cls(DEVICES)
    for part in parts[:5]:
        kernel(to_columns(kind, part), params, state)
    before = state.to_arrays()
    for part in parts[:5]:
        events, _ = kernel(to_columns(kind, part), params, state)
        assert len(events) == 0
        assert events.stale == len(part["ts"])
    after = state.to_arrays()
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def test_duplicates_within_a_batch_and_older_readings_are_stale() -> None:
    cols = DetectorColumns(
        idx=np.array([0, 0, 1, 0]),
        ts=np.array([1000, 2000, 1000, 1000]),
        ch4_lel=np.array([30.0, 1.0, 1.0, 30.0]),
        alarm=np.zeros(4, np.bool_),
    )
    state = DetectorState(2)
    events, _ = detect_detectors(cols, DetectorParams(), state)
    assert events.stale == 1
    assert state.last_ts.tolist() == [2000, 1000]
    older = DetectorColumns(
        idx=np.array([0, 1]),
        ts=np.array([1500, 1000]),
        ch4_lel=np.array([90.0, 90.0]),
        alarm=np.zeros(2, np.bool_),
    )
    events, _ = detect_detectors(older, DetectorParams(), state)
    assert (len(events), events.stale) == (0, 2)


@pytest.mark.parametrize("kind", ["detector", "meter"])
def test_state_round_trip_mid_stream_gives_the_same_events(kind: str) -> None:
    stream, params, state_cls, kernel = kind_setup(kind, 5)
    parts = list(split(np.random.default_rng(5), stream, 40))
    whole, _ = feed(kind, parts, params, state_cls(DEVICES), kernel)
    half = len(parts) // 2
    state = state_cls(DEVICES)
    first, _ = feed(kind, parts[:half], params, state, kernel)
    buf = io.BytesIO()
    np.savez(buf, **state.to_arrays())
    buf.seek(0)
    with np.load(buf) as npz:
        restored = state_cls.from_arrays(dict(npz))
    second, _ = feed(kind, parts[half:], params, restored, kernel)
    assert first + second == whole


@pytest.mark.parametrize("kind", ["detector", "meter"])
def test_grow_keeps_existing_state(kind: str) -> None:
    stream, params, state_cls, kernel = kind_setup(kind, 7)
    parts = list(split(np.random.default_rng(7), stream, 40))
    whole, _ = feed(kind, parts, params, state_cls(DEVICES), kernel)
    # the first half only has devices 0-2; then devices 3-4 are added
    state = state_cls(3)
    early = [{k: v[p["idx"] < 3] for k, v in p.items()} for p in parts[:10]]
    late = [{k: v[p["idx"] >= 3] for k, v in p.items()} for p in parts[:10]]
    got, _ = feed(kind, early, params, state, kernel)
    assert state.grow(DEVICES) is state and state.capacity == DEVICES
    got2, _ = feed(kind, [*late, *parts[10:]], params, state, kernel)
    assert sorted(got + got2) == sorted(whole)


def test_grow_refuses_to_shrink_and_from_arrays_checks_fields() -> None:
    state = MeterState(4)
    with pytest.raises(ValueError, match="shrink"):
        state.grow(3)
    arrays = state.to_arrays()
    del arrays["last_ts"]
    with pytest.raises(ValueError, match="missing \\['last_ts'\\]"):
        MeterState.from_arrays(arrays)
    arrays = DetectorState(4).to_arrays()
    arrays["open"] = np.zeros(5, np.uint32)
    with pytest.raises(ValueError, match="different lengths"):
        DetectorState.from_arrays(arrays)


def test_a_state_saved_before_newer_fields_existed_loads_with_their_defaults() -> None:
    """A running fleet's saved state survives an upgrade that adds fields (and widens the
    open mask from 16 to 32 bits)."""
    state = MeterState(3)
    state.open[1] = 1 << int(Rule.BURST)
    state.peak[2] = 1.5
    old = {k: v for k, v in state.to_arrays().items() if k not in ("ph_hi", "vf_until", "cs_ok")}
    old["open"] = old["open"].astype(np.uint16)
    back = MeterState.from_arrays(old)
    assert back.is_open(Rule.BURST).tolist() == [False, True, False] and back.peak[2] == 1.5
    assert back.open.dtype == np.uint32 and (back.vf_until == NO_TS).all()
    assert (back.ph_hi == 0).all() and len(back.cs_ok) == 3


def test_bad_batches_are_rejected_before_any_state_changes() -> None:
    state = MeterState(2)
    cols = MeterColumns(
        idx=np.array([0, 2]),
        ts=np.array([1, 2]),
        volume_m3=np.zeros(2),
        flow_m3h=np.zeros(2),
    )
    with pytest.raises(IndexError, match="grow"):
        detect_meters(cols, MeterParams(), state)
    cols = MeterColumns(
        idx=np.array([0, 1]), ts=np.array([1, 2]), volume_m3=np.zeros(3), flow_m3h=np.zeros(2)
    )
    with pytest.raises(ValueError, match="volume_m3"):
        detect_meters(cols, MeterParams(), state)
    assert (state.last_ts == MeterState(2).last_ts).all()
    with pytest.raises(ValueError, match="override"):
        detect_meters(
            MeterColumns(
                idx=np.array([1]), ts=np.array([1]), volume_m3=np.zeros(1), flow_m3h=np.zeros(1)
            ),
            MeterParams(qmax_by_device=np.array([2.5])),
            MeterState(2),
        )


def test_params_refuse_clear_levels_beyond_raise_levels() -> None:
    with pytest.raises(ValueError):
        DetectorParams(gas_low_clear=12.0)
    with pytest.raises(ValueError):
        MeterParams(pressure_clear=1.0)
    with pytest.raises(ValueError):
        MeterParams(valve_samples=0)


def test_empty_batch() -> None:
    cols = MeterColumns.from_mapping([], {"ts": [], "volume_m3": [], "flow_m3h": []})
    events, _ = detect_meters(cols, MeterParams(), MeterState(0))
    assert len(events) == 0 and events.stale == 0


def test_from_mapping_ignores_unknown_columns() -> None:
    cols = DetectorColumns.from_mapping(
        [0], {"ts": [5], "ch4_lel": [30.0], "alarm": [False], "temp_c": [20.0], "x": [1]}
    )
    events, _ = detect_detectors(cols, DetectorParams(), DetectorState(1))
    assert [r for _, _, r, _, _ in events.rows()] == [Rule.GAS_HIGH]


def test_events_concat_orders_by_ts_idx_rule_and_sums_stale() -> None:
    a = Events(
        idx=np.array([2, 1]),
        ts=np.array([10, 20]),
        rule=np.array([Rule.BURST, Rule.SILENT], np.int16),
        raised=np.array([True, False]),
        value=np.array([3.0, np.nan]),
        stale=2,
    )
    b = Events(
        idx=np.array([1]),
        ts=np.array([10]),
        rule=np.array([Rule.TAMPER], np.int16),
        raised=np.array([True]),
        value=np.array([0.0]),
        stale=1,
    )
    c = Events.concat([a, b, Events.empty(4)])
    assert [(i, t, r) for i, t, r, _, _ in c.rows()] == [
        (1, 10, Rule.TAMPER),
        (2, 10, Rule.BURST),
        (1, 20, Rule.SILENT),
    ]
    assert c.stale == 7
    assert c.severity.tolist() == [Severity.MINOR, Severity.CRITICAL, Severity.MINOR]


def test_district_incidents_need_a_share_and_a_count() -> None:
    district = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, -1, -1, -1])
    open_pl = np.zeros(len(district), np.bool_)
    open_pl[[0, 1, 2]] = True  # 3 of 4 in district 0
    open_pl[[4, 5]] = True  # 2 of 10 in district 1
    open_pl[[17, 18, 19]] = True  # unknown district
    assert district_incidents(open_pl, district).tolist() == [0]
    open_pl[[6, 7]] = True  # 4 of 10: 40 %
    assert district_incidents(open_pl, district).tolist() == [0, 1]
    assert district_incidents(open_pl, district, min_share=0.5).tolist() == [0]


def test_qmax_for_sizes() -> None:
    q = qmax_for_sizes(["G1.6", "G2.5", "G4", None, "G10"])
    np.testing.assert_array_equal(q, [2.5, 4.0, 6.0, np.nan, np.nan])


def test_state_of_100k_devices_is_small() -> None:
    """About 145 bytes a detector and 185 a meter (runs, the usual peak, the rising window,
    the latest clears of the rules late readings are judged by, the register's last rise and
    stretch, the closed valve's anchor): under 33 MB for 100,000 households."""
    total = DetectorState(100_000).nbytes + MeterState(100_000).nbytes
    assert total < 33_000_000
