"""Tests for gasguard.wire: MQTT topics and the columnar telemetry payload."""

from __future__ import annotations

import pickle
import time
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from gasguard.fields import COMM_LOST, FIELDS, KINDS, Kind
from gasguard.wire import (
    CHANNELS,
    MAX_FUTURE_MS,
    TOP_LEVEL_KEYS,
    Batch,
    WireError,
    decode_batch,
    encode_batch,
    make_batch,
    topic,
)

NOW_MS = 1_750_000_000_000  # 2025-06-15, the "now" of every decode below unless said otherwise
SLOW = settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# -- strategies -------------------------------------------------------------------------------

ids = st.text(
    st.characters(categories=("L", "N", "P", "S"), exclude_characters="/+#", codec="utf-8"),
    min_size=1,
    max_size=64,
)
device_ids = st.text(st.characters(codec="utf-8"), min_size=1, max_size=64)
finite_floats = st.floats(allow_nan=False, allow_infinity=False)
json_ints = st.integers(-(2**63), 2**64 - 1)  # what orjson reads and writes as integers
json_scalars = st.none() | st.booleans() | json_ints | finite_floats | st.text(max_size=10)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=10,
)


@st.composite
def batches(draw: st.DrawFn, max_size: int = 300) -> Batch:
    """A valid batch of either kind: some optional fields, NaN in some comm_lost rows."""
    kind: Kind = draw(st.sampled_from(KINDS))
    n = draw(st.integers(1, max_size))
    schema = FIELDS[kind]
    optional = [f.name for f in schema.values() if not f.required]
    sent = {f.name for f in schema.values() if f.required}
    sent |= set(draw(st.lists(st.sampled_from(optional), unique=True)))
    comm_lost = draw(arrays(np.bool_, n)) if COMM_LOST in sent else np.zeros(n, dtype=np.bool_)
    fields: dict[str, Any] = {}
    for name in sent:
        if name == COMM_LOST:
            fields[name] = comm_lost
        elif schema[name].type == "float":
            values = draw(arrays(np.float64, n, elements=finite_floats))
            values[comm_lost & draw(arrays(np.bool_, n))] = np.nan
            fields[name] = values
        else:
            fields[name] = draw(arrays(np.bool_, n))
    pool = draw(st.lists(device_ids, min_size=1, max_size=8))
    picks = draw(arrays(np.int64, n, elements=st.integers(0, len(pool) - 1)))
    ts = draw(arrays(np.int64, n, elements=st.integers(0, NOW_MS)))
    gw = draw(ids)
    seq = draw(st.integers(0, 2**63 - 1))
    return make_batch(gw, seq, kind, [pool[i] for i in picks], ts, fields)


def assert_same(a: Batch, b: Batch) -> None:
    assert (a.gw, a.seq, a.kind, len(a)) == (b.gw, b.seq, b.kind, len(b))
    assert a.dev.tolist() == b.dev.tolist()
    np.testing.assert_array_equal(a.ts, b.ts, strict=True)
    assert list(a.fields) == list(b.fields)
    for name in a.fields:
        np.testing.assert_array_equal(a.fields[name], b.fields[name], strict=True)  # NaN == NaN


# -- round trip -------------------------------------------------------------------------------


@SLOW
@given(batches())
def test_round_trip_keeps_every_value(batch: Batch) -> None:
    decoded = decode_batch(encode_batch(batch), now_ms=NOW_MS)
    assert_same(decoded, batch)
    assert decoded.dev.dtype == object and decoded.ts.dtype == np.int64
    schema = FIELDS[batch.kind]
    for name, values in decoded.fields.items():
        assert values.dtype == (np.float64 if schema[name].type == "float" else np.bool_)
        if values.dtype == np.float64:
            assert not (np.isnan(values) & ~decoded.fields[COMM_LOST]).any()


# -- rejection --------------------------------------------------------------------------------

BAD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "float": st.booleans() | st.text(max_size=5) | st.lists(finite_floats, max_size=2),
    "bool": json_ints | finite_floats | st.text(max_size=5) | st.just([]),
    "ts": st.booleans()
    | finite_floats
    | st.none()
    | st.text(max_size=5)
    | st.integers(-(2**63), -1)
    | st.integers(2**63, 2**64 - 1),
    "dev": st.none() | json_ints | st.just("") | st.text(min_size=65, max_size=80),
    "gw": st.none()
    | json_ints
    | st.sampled_from(["", "a/b", "a+", "#", "a b", "a\nb", "a\x00b", "g" * 65]),
    "seq": st.booleans()
    | st.integers(-(2**63), -1)
    | st.integers(2**63, 2**64 - 1)
    | finite_floats
    | st.text(max_size=5),
    "kind": st.none() | json_ints | st.text(max_size=10).filter(lambda k: k not in KINDS),
    "v": st.booleans() | json_ints.filter(lambda v: v != 1) | finite_floats | st.text(),
}


@st.composite
def mangled(draw: st.DrawFn, how: str) -> tuple[bytes, int, str | None]:
    """A valid payload broken one way: (payload, max_bytes, the field the error must name)."""
    batch = draw(batches(max_size=20))
    raw = encode_batch(batch)
    doc = orjson.loads(raw)
    n = len(batch)
    schema = FIELDS[batch.kind]
    columns = ["ts", *batch.fields]
    if how == "oversize":
        return raw, len(raw) - 1, None
    if how == "cut":
        return raw[: draw(st.integers(0, len(raw) - 1))], len(raw), None
    if how == "garbage":
        return b"\xff" + draw(st.binary(max_size=50)), len(raw), None
    if how == "not_object":
        value = draw(json_values.filter(lambda v: not isinstance(v, dict)))
        return orjson.dumps(value), len(raw) + 100, None
    field: str
    if how == "drop":
        required = [f.name for f in schema.values() if f.required]
        field = draw(st.sampled_from([*TOP_LEVEL_KEYS, *required]))
        del doc[field]
    elif how == "unknown":
        field = draw(st.text(max_size=12).filter(lambda k: k not in doc and k not in schema))
        doc[field] = draw(json_values)
    elif how == "resize":
        field = draw(st.sampled_from(columns))
        if draw(st.booleans()):
            doc[field] = doc[field][: draw(st.integers(0, n - 1))]
        else:
            doc[field] += doc[field][:1] * draw(st.integers(1, 3))
    elif how == "not_list":
        field = draw(st.sampled_from(["dev", *columns]))
        doc[field] = draw(json_values.filter(lambda v: not isinstance(v, list)))
    elif how == "bad_value":
        field = draw(st.sampled_from(["dev", *columns]))
        kind = field if field in ("dev", "ts") else schema[field].type
        doc[field][draw(st.integers(0, n - 1))] = draw(BAD_VALUES[kind])
    elif how == "bad_meta":
        field = draw(st.sampled_from(["v", "gw", "seq", "kind"]))
        doc[field] = draw(BAD_VALUES[field])
    elif how == "future":
        field = "ts"
        ahead = draw(st.integers(MAX_FUTURE_MS + 1, 2**62))
        doc["ts"][draw(st.integers(0, n - 1))] = NOW_MS + ahead
    else:  # a null outside a comm_lost row (any null in comm_lost itself)
        field = draw(st.sampled_from(list(batch.fields)))
        rows = np.flatnonzero(~batch.fields[COMM_LOST] | (field == COMM_LOST))
        assume(len(rows) > 0)
        doc[field][int(draw(st.sampled_from(rows.tolist())))] = None
    return orjson.dumps(doc), len(raw) + 10_000, field


MANGLES = ["drop", "unknown", "resize", "not_list", "bad_value", "bad_meta", "future", "null"]
MANGLES += ["oversize", "cut", "garbage", "not_object"]


@pytest.mark.parametrize("how", MANGLES)
@settings(SLOW, max_examples=40)
@given(data=st.data())
def test_broken_payload_raises_wire_error_naming_the_field(how: str, data: st.DataObject) -> None:
    payload, max_bytes, field = data.draw(mangled(how))
    with pytest.raises(WireError) as caught:
        decode_batch(payload, now_ms=NOW_MS, max_bytes=max_bytes)
    assert caught.value.field == field
    assert caught.value.reason
    if field is not None:
        assert str(caught.value).startswith(f"field {field!r}: ")


def decode_or_wire_error(payload: bytes) -> None:
    try:
        batch = decode_batch(payload, now_ms=NOW_MS)
    except WireError as exc:
        assert exc.reason
    else:
        assert len(batch) > 0


@given(st.binary(max_size=2000))
def test_arbitrary_bytes_raise_only_wire_error(payload: bytes) -> None:
    decode_or_wire_error(payload)


@given(json_values | st.dictionaries(st.sampled_from(TOP_LEVEL_KEYS), json_values))
def test_arbitrary_json_raises_only_wire_error(doc: Any) -> None:
    decode_or_wire_error(orjson.dumps(doc))


@SLOW
@given(batches(max_size=10), st.data())
def test_any_value_under_any_key_raises_only_wire_error(batch: Batch, data: st.DataObject) -> None:
    doc = orjson.loads(encode_batch(batch))
    key = data.draw(st.sampled_from(list(doc)))
    if isinstance(doc[key], list) and data.draw(st.booleans()):
        doc[key][data.draw(st.integers(0, len(doc[key]) - 1))] = data.draw(json_values)
    else:
        doc[key] = data.draw(json_values)
    decode_or_wire_error(orjson.dumps(doc))


# -- examples: the exact messages -------------------------------------------------------------


def meter_doc(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "v": 1,
        "gw": "GW-7",
        "seq": 12,
        "kind": "meter",
        "dev": ["D-0001", "D-0002", "D-0003"],
        "ts": [NOW_MS - 2000, NOW_MS - 1000, NOW_MS],
        "volume_m3": [10.5, None, 7],
        "flow_m3h": [0.0, None, 1.25],
        "tamper": [False, None, True],
        "comm_lost": [False, True, False],
    }
    doc.update(changes)
    return doc


def rejection(doc: dict[str, Any], **kwargs: Any) -> WireError:
    with pytest.raises(WireError) as caught:
        decode_batch(orjson.dumps(doc), **{"now_ms": NOW_MS, **kwargs})
    return caught.value


def test_decode_example_meter_batch() -> None:
    batch = decode_batch(orjson.dumps(meter_doc()), now_ms=NOW_MS)
    assert (batch.gw, batch.seq, batch.kind, len(batch)) == ("GW-7", 12, "meter", 3)
    assert batch.dev.tolist() == ["D-0001", "D-0002", "D-0003"]
    np.testing.assert_array_equal(batch.fields["volume_m3"], [10.5, np.nan, 7.0])
    assert batch.fields["tamper"].tolist() == [False, False, True]  # null where comm_lost
    assert list(batch.fields) == ["volume_m3", "flow_m3h", "tamper", "comm_lost"]


def test_missing_comm_lost_means_all_false() -> None:
    doc = meter_doc(volume_m3=[1, 2, 3], flow_m3h=[0, 0, 0], tamper=[True, False, False])
    del doc["comm_lost"]
    batch = decode_batch(orjson.dumps(doc), now_ms=NOW_MS)
    assert batch.fields["comm_lost"].tolist() == [False, False, False]


def test_batch_arrays_are_read_only() -> None:
    batch = decode_batch(orjson.dumps(meter_doc()), now_ms=NOW_MS)
    with pytest.raises(ValueError, match="read-only"):
        batch.fields["flow_m3h"][0] = 1.0


def test_error_messages() -> None:
    assert str(rejection(meter_doc(v=2))) == "field 'v': unsupported version 2"
    assert str(rejection(meter_doc(seq=True))) == (
        "field 'seq': expected an integer from 0 to 2**63-1, got boolean true"
    )
    assert str(rejection(meter_doc(colour=[1, 2, 3]))) == (
        "field 'colour': unknown key(s) 'colour' for kind 'meter'"
    )
    assert str(rejection(meter_doc(tamper=[True, False]))) == (
        "field 'tamper': has 2 values but dev has 3"
    )
    assert str(rejection(meter_doc(flow_m3h=[None, None, 1.0]))) == (
        "field 'flow_m3h': row 0: null (NaN) is allowed only where comm_lost is true"
    )
    assert str(rejection(meter_doc(tamper=[0, None, 1]))) == (
        "field 'tamper': row 0: expected true or false, got integer 0"
    )
    assert str(rejection(meter_doc(volume_m3=[1.0, None, "7"]))) == (
        "field 'volume_m3': row 2: expected a number, got string '7'"
    )
    assert str(rejection(meter_doc(ts=[NOW_MS, 1.5e12, NOW_MS]))) == (
        "field 'ts': row 1: expected an integer epoch-ms timestamp, got number 1500000000000.0"
    )
    assert str(rejection(meter_doc(dev=[]))) == "field 'dev': empty batch: no readings"
    detector = meter_doc(kind="detector", alarm=[False] * 3, volume_m3=None, flow_m3h=None)
    for key in ("volume_m3", "flow_m3h", "tamper"):
        del detector[key]
    assert str(rejection(detector)) == (
        "field 'ch4_lel': missing required field(s) 'ch4_lel' of kind 'detector'"
    )


def test_timestamp_in_the_future_names_time_and_distance() -> None:
    doc = meter_doc(ts=[NOW_MS, NOW_MS + MAX_FUTURE_MS + 1, NOW_MS])
    err = rejection(doc)
    assert (err.field, err.reason) == (
        "ts",
        "row 1: timestamp 2025-06-15T15:11:40.001Z is 301 s in the future (limit 300 s)",
    )
    assert decode_batch(orjson.dumps(doc), now_ms=NOW_MS, max_future_ms=MAX_FUTURE_MS + 1)


def test_default_now_is_the_clock() -> None:
    now = int(time.time() * 1000)
    decode_batch(orjson.dumps(meter_doc(ts=[now, now, now])))
    assert rejection(meter_doc(ts=[now, now + 3_600_000, now]), now_ms=None).field == "ts"


def test_oversize_and_non_json_payloads() -> None:
    payload = orjson.dumps(meter_doc())
    with pytest.raises(WireError) as caught:
        decode_batch(payload, now_ms=NOW_MS, max_bytes=100)
    assert caught.value.field is None
    assert str(caught.value) == f"payload is {len(payload)} bytes, over the limit of 100"
    for junk in (b"", b"{", b"[1, 2]", b'"v"', b"[1e999]", b"\xff\xfe"):
        with pytest.raises(WireError) as caught:
            decode_batch(junk)
        assert caught.value.field is None


def test_wire_error_is_a_value_error_and_pickles() -> None:
    err = rejection(meter_doc(v=2))
    assert isinstance(err, ValueError)
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.field, copy.reason, str(copy)) == (err.field, err.reason, str(err))


# -- make_batch -------------------------------------------------------------------------------


def test_make_batch_coerces_dtypes() -> None:
    batch = make_batch(
        "GW-1",
        np.int64(3),
        "detector",
        np.array(["D-1", "D-2"]),
        [NOW_MS, NOW_MS],
        {
            "ch4_lel": [0, 12],
            "alarm": np.array([False, True]),
            "temp_c": np.array([20, 21], dtype=np.float32),
        },
    )
    assert batch.seq == 3 and type(batch.seq) is int
    assert batch.dev.tolist() == ["D-1", "D-2"] and batch.dev.dtype == object
    assert batch.fields["ch4_lel"].dtype == np.float64
    assert batch.fields["alarm"].tolist() == [False, True]
    assert list(batch.fields) == ["ch4_lel", "alarm", "temp_c", "comm_lost"]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"ch4_lel": [np.nan, 1.0], "alarm": [False, False]}, "ch4_lel"),  # NaN, not comm_lost
        ({"ch4_lel": [np.inf, 1.0], "alarm": [False, False]}, "ch4_lel"),
        ({"ch4_lel": [1.0, 2.0], "alarm": np.array([0, 1])}, "alarm"),
        ({"ch4_lel": [True, False], "alarm": [False, False]}, "ch4_lel"),
        ({"ch4_lel": np.zeros((2, 1)), "alarm": [False, False]}, "ch4_lel"),
        ({"ch4_lel": 5, "alarm": [False, False]}, "ch4_lel"),
        ({"alarm": [False, False]}, "ch4_lel"),
        ({"ch4_lel": [1.0, 2.0], "alarm": [False, False], "volume_m3": [1.0, 2.0]}, "volume_m3"),
    ],
)
def test_make_batch_rejects(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(WireError) as caught:
        make_batch("GW-1", 0, "detector", ["D-1", "D-2"], [NOW_MS, NOW_MS], fields)
    assert caught.value.field == field


def test_make_batch_rejects_device_ids_json_cannot_carry() -> None:
    with pytest.raises(WireError) as caught:
        make_batch("GW-1", 0, "meter", ["D-\ud800"], [0], {"volume_m3": [1], "flow_m3h": [0]})
    assert caught.value.field == "dev"


# -- topics -----------------------------------------------------------------------------------


@pytest.mark.parametrize("channel", CHANNELS)
def test_topic(channel: str) -> None:
    assert topic("GW-0042", channel) == f"gasguard/v1/GW-0042/{channel}"


def test_topic_accepts_a_64_character_gateway_id() -> None:
    assert topic("g" * 64, "state") == f"gasguard/v1/{'g' * 64}/state"


@pytest.mark.parametrize(
    "gateway_id", ["", "g" * 65, "a/b", "a+b", "a#", "a b", "a\tb", "a\u00a0b", "a\x00b", "a\x7f"]
)
def test_topic_rejects_bad_gateway_id(gateway_id: str) -> None:
    with pytest.raises(WireError) as caught:
        topic(gateway_id, "telemetry")
    assert caught.value.field == "gw"


def test_topic_rejects_unknown_channel() -> None:
    with pytest.raises(WireError) as caught:
        topic("GW-1", "telemetry/+")
    assert caught.value.field == "channel"
