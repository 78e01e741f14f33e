"""The MQTT wire contract: topic names and the columnar telemetry payload.

A telemetry payload is one JSON object holding one array per column::

    {"v": 1, "gw": "GW-1", "seq": 7, "kind": "meter", "dev": ["D-0001", ...],
     "ts": [epoch ms, ...], "volume_m3": [...], "flow_m3h": [...], ...}

``decode_batch`` parses it once with orjson, turns each column into a numpy array with an
explicit dtype and validates it with vectorised checks. Anything wrong raises ``WireError``
naming the field and the reason, which ingest stores with the dead-lettered payload.
The columns of each device kind come from ``gasguard.fields``.
"""

from __future__ import annotations

import math
import operator
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import repeat
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from gasguard.fields import COMM_LOST, FIELDS, KINDS, Kind

WIRE_VERSION = 1
MAX_PAYLOAD_BYTES = 1_048_576
MAX_FUTURE_MS = 300_000
MAX_ID_LEN = 64
CHANNELS = ("telemetry", "alarm", "state", "cmd", "cmd/result")
TOP_LEVEL_KEYS = ("v", "gw", "seq", "kind", "dev", "ts")

_INT64_MAX = 2**63 - 1
# MQTT topic separators and wildcards, and any whitespace.
_BAD_GATEWAY_CHARS = re.compile(r"[/+#\s]")
_KIND_BY_NAME: dict[str, Kind] = {k: k for k in KINDS}
_NONE = type(None)
_JSON_NAMES: dict[type, str] = {
    _NONE: "null", bool: "boolean", int: "integer", float: "number",
    str: "string", list: "array", dict: "object",
}  # fmt: skip

BoolArray = npt.NDArray[np.bool_]
ColumnInput = Iterable[Any] | npt.NDArray[Any]


class WireError(ValueError):
    """A payload (or batch input) that breaks the wire contract.

    ``field`` names the offending key, or is None for a whole-payload problem.
    """

    def __init__(self, field: str | None, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(reason if field is None else f"field {field!r}: {reason}")

    def __reduce__(self) -> tuple[type[WireError], tuple[str | None, str]]:
        return (type(self), (self.field, self.reason))


@dataclass(frozen=True, eq=False)
class Batch:
    """Readings of one kind from one gateway, in columns (all arrays read-only).

    ``fields`` holds float64 arrays (NaN where comm_lost) and bool arrays, in the schema's
    order; ``comm_lost`` is always present, optional fields only when they were sent.
    """

    gw: str
    seq: int
    kind: Kind
    dev: npt.NDArray[np.object_]
    ts: npt.NDArray[np.int64]
    fields: dict[str, npt.NDArray[Any]]

    def __len__(self) -> int:
        return len(self.dev)


def topic(gateway_id: str, channel: str) -> str:
    """The MQTT topic of ``channel`` for a gateway: ``gasguard/v1/{gw}/{channel}``."""
    gw = _check_gateway_id(gateway_id)
    if channel not in CHANNELS:
        raise WireError("channel", f"unknown channel {_show(channel)}, expected one of {CHANNELS}")
    return f"gasguard/v{WIRE_VERSION}/{gw}/{channel}"


def make_batch(  # noqa: PLR0917 - the positional signature is the agreed API
    gw: str,
    seq: int | np.integer[Any],
    kind: str,
    dev: ColumnInput,
    ts: ColumnInput,
    fields: Mapping[str, ColumnInput],
) -> Batch:
    """Build a validated batch from python or numpy columns (the checks of ``decode_batch``).

    A missing value is NaN or None. Timestamps are not checked against the clock here.
    """
    columns = {name: _as_list(name, values) for name, values in fields.items()}
    if isinstance(seq, np.integer):
        seq = int(seq)
    dev_list = _as_list("dev", dev)
    batch = _build(gw, seq, kind, dev_list, _as_list("ts", ts), columns=columns, clock=None)
    for row, device in enumerate(dev_list):  # what decode never sees: ids orjson cannot encode
        if not device.isprintable() and _is_unencodable(device):
            raise WireError("dev", f"row {row}: device id {_show(device)} is not valid UTF-8")
    return batch


def encode_batch(batch: Batch) -> bytes:
    """Serialise a batch to its JSON payload; NaN becomes null."""
    doc: dict[str, Any] = {
        "v": WIRE_VERSION,
        "gw": batch.gw,
        "seq": batch.seq,
        "kind": batch.kind,
        "dev": batch.dev.tolist(),
        "ts": np.ascontiguousarray(batch.ts, dtype=np.int64),
    }
    for name, values in batch.fields.items():
        doc[name] = np.ascontiguousarray(values)
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


def decode_batch(
    payload: bytes,
    *,
    now_ms: int | None = None,
    max_bytes: int = MAX_PAYLOAD_BYTES,
    max_future_ms: int = MAX_FUTURE_MS,
) -> Batch:
    """Parse and validate a telemetry payload; raise ``WireError`` on any contract breach."""
    if len(payload) > max_bytes:
        raise WireError(None, f"payload is {len(payload)} bytes, over the limit of {max_bytes}")
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise WireError(None, f"not valid JSON: {exc}") from None
    if type(doc) is not dict:
        raise WireError(None, f"payload is a JSON {_describe(doc)}, not an object")
    if "v" not in doc:
        raise WireError("v", "missing")
    version = doc["v"]
    if type(version) is not int or version != WIRE_VERSION:
        raise WireError("v", f"unsupported version {_show(version)}")
    missing = [key for key in TOP_LEVEL_KEYS if key not in doc]
    if missing:
        raise WireError(missing[0], f"missing key(s) {_names(missing)}")
    columns = {key: value for key, value in doc.items() if key not in TOP_LEVEL_KEYS}
    now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    limit = min(now + max_future_ms, _INT64_MAX)
    clock = (now, limit)
    return _build(
        doc["gw"], doc["seq"], doc["kind"], doc["dev"], doc["ts"], columns=columns, clock=clock
    )


def _build(
    gw: object,
    seq: object,
    kind: object,
    dev: object,
    ts: object,
    *,
    columns: dict[str, Any],
    clock: tuple[int, int] | None,
) -> Batch:
    """Validate decoded (JSON-typed) values and turn them into a batch."""
    if type(kind) is not str or kind not in _KIND_BY_NAME:
        raise WireError("kind", f"unknown kind {_show(kind)}, expected one of {KINDS}")
    schema = FIELDS[_KIND_BY_NAME[kind]]
    unknown = sorted(columns.keys() - schema.keys(), key=str)
    if unknown:
        raise WireError(unknown[0], f"unknown key(s) {_names(unknown)} for kind {kind!r}")
    missing = [f.name for f in schema.values() if f.required and f.name not in columns]
    if missing:
        raise WireError(missing[0], f"missing required field(s) {_names(missing)} of kind {kind!r}")
    gateway = _check_gateway_id(gw)
    if type(seq) is not int or not 0 <= seq <= _INT64_MAX:
        raise WireError("seq", f"expected an integer from 0 to 2**63-1, got {_describe(seq)}")
    dev_arr = _dev_column(dev)
    n = len(dev_arr)
    ts_arr = _ts_column(_column("ts", ts, n), clock)
    if COMM_LOST in columns:
        comm_lost = _bool_column(COMM_LOST, _column(COMM_LOST, columns[COMM_LOST], n), None)
    else:
        comm_lost = np.zeros(n, dtype=np.bool_)
    out: dict[str, npt.NDArray[Any]] = {}
    for name, field in schema.items():
        if name == COMM_LOST:
            out[name] = comm_lost
        elif name in columns:
            values = _column(name, columns[name], n)
            if field.type == "float":
                out[name] = _float_column(name, values, comm_lost)
            else:
                out[name] = _bool_column(name, values, comm_lost)
    for arr in (dev_arr, ts_arr, *out.values()):
        arr.flags.writeable = False
    return Batch(gateway, seq, _KIND_BY_NAME[kind], dev_arr, ts_arr, out)


def _check_gateway_id(gw: object) -> str:
    if type(gw) is not str:
        raise WireError("gw", f"expected a gateway id string, got {_describe(gw)}")
    if not 0 < len(gw) <= MAX_ID_LEN:
        raise WireError("gw", f"gateway id must be 1 to {MAX_ID_LEN} characters, got {len(gw)}")
    bad = _BAD_GATEWAY_CHARS.search(gw)
    if bad:
        raise WireError("gw", f"gateway id {_show(gw)} contains {bad.group()!r}")
    if not gw.isprintable():  # control characters, lone surrogates
        raise WireError("gw", f"gateway id {_show(gw)} contains a non-printable character")
    return gw


def _column(name: str, values: object, n: int) -> list[Any]:
    if type(values) is not list:
        raise WireError(name, f"expected an array, got {_describe(values)}")
    if len(values) != n:
        raise WireError(name, f"has {len(values)} values but dev has {n}")
    return values


def _dev_column(values: object) -> npt.NDArray[np.object_]:
    if type(values) is not list:
        raise WireError("dev", f"expected an array of device ids, got {_describe(values)}")
    if not values:
        raise WireError("dev", "empty batch: no readings")
    types = list(map(type, values))
    if types.count(str) != len(values):
        raise _type_error("dev", values, types, (str,), "a device id string")
    if "" in values or max(map(len, values)) > MAX_ID_LEN:
        row = next(i for i, x in enumerate(values) if not 0 < len(x) <= MAX_ID_LEN)
        raise WireError("dev", f"row {row}: device id must be 1 to {MAX_ID_LEN} characters")
    return np.array(values, dtype=object)  # 1-D: numpy does not split strings


def _ts_column(values: list[Any], clock: tuple[int, int] | None) -> npt.NDArray[np.int64]:
    types = list(map(type, values))
    if types.count(int) != len(values):
        raise _type_error("ts", values, types, (int,), "an integer epoch-ms timestamp")
    try:
        arr = np.array(values, dtype=np.int64)
    except OverflowError:
        row = next(i for i, x in enumerate(values) if not -_INT64_MAX - 1 <= x <= _INT64_MAX)
        raise WireError("ts", f"row {row}: timestamp {values[row]} is out of range") from None
    if arr.min() < 0:
        row = int(np.argmax(arr < 0))
        raise WireError("ts", f"row {row}: negative timestamp {arr[row]}")
    if clock is not None:
        now, limit = clock
        if arr.max() > limit:
            row = int(np.argmax(arr > limit))
            ms = int(arr[row])
            secs = math.ceil((ms - now) / 1000)
            raise WireError(
                "ts", f"row {row}: timestamp {_iso(ms)} is {secs} s in the future "
                f"(limit {(limit - now) / 1000:g} s)",
            )  # fmt: skip
    return arr


def _float_column(name: str, values: list[Any], comm_lost: BoolArray) -> npt.NDArray[np.float64]:
    # Exact types, counted in C: a bool is not a number here, though it is an int to python.
    types = list(map(type, values))
    n = len(values)
    ok = types.count(float)
    if ok != n:
        ok += types.count(int)
        if ok != n and ok + types.count(_NONE) != n:
            raise _type_error(name, values, types, (float, int, _NONE), "a number")
    arr = np.array(values, dtype=np.float64)  # None -> NaN
    if not np.isfinite(arr).all():
        stray = np.isnan(arr) & ~comm_lost
        if stray.any():
            raise WireError(name, f"row {int(np.argmax(stray))}: {_MISSING_OUTSIDE_COMM_LOST}")
        inf = np.isinf(arr)
        if inf.any():
            row = int(np.argmax(inf))
            raise WireError(name, f"row {row}: non-finite number {arr[row]}")
    return arr


def _bool_column(name: str, values: list[Any], comm_lost: BoolArray | None) -> BoolArray:
    types = list(map(type, values))
    n = len(values)
    if types.count(bool) == n:
        return np.frombuffer(bytes(values), dtype=np.bool_)  # bools are the bytes 0 and 1
    if comm_lost is None or types.count(bool) + types.count(_NONE) != n:
        allowed = (bool,) if comm_lost is None else (bool, _NONE)
        raise _type_error(name, values, types, allowed, "true or false")
    missing = np.fromiter(map(operator.is_, values, repeat(None)), dtype=np.bool_, count=n)
    stray = missing & ~comm_lost
    if stray.any():
        raise WireError(name, f"row {int(np.argmax(stray))}: {_MISSING_OUTSIDE_COMM_LOST}")
    return np.array(values, dtype=np.bool_)  # None -> False


_MISSING_OUTSIDE_COMM_LOST = "null (NaN) is allowed only where comm_lost is true"


def _type_error(
    name: str, values: list[Any], types: list[type], allowed: tuple[type, ...], expected: str
) -> WireError:
    row = next(i for i, t in enumerate(types) if t not in allowed)
    return WireError(name, f"row {row}: expected {expected}, got {_describe(values[row])}")


def _as_list(name: str, values: object) -> list[Any]:
    """A make_batch column as a list of plain python values, as orjson would give it."""
    if isinstance(values, np.ndarray):
        if values.ndim != 1:
            raise WireError(name, f"expected a 1-D array, got shape {values.shape}")
        if values.dtype != object:
            return list(values.tolist())
    elif isinstance(values, str | bytes | Mapping) or not isinstance(values, Iterable):
        raise WireError(name, f"expected a sequence, got {type(values).__name__}")
    return [x.item() if isinstance(x, np.generic) else x for x in values]


def _is_unencodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return True
    return False


def _iso(ms: int) -> str:
    try:
        when = datetime.fromtimestamp(ms / 1000, tz=UTC)
        return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    except (OverflowError, ValueError, OSError):
        return f"{ms} ms"


def _describe(x: object) -> str:
    if type(x) is bool:
        return "boolean true" if x else "boolean false"
    name = _JSON_NAMES.get(type(x), type(x).__name__)
    return name if type(x) in (list, dict) or x is None else f"{name} {_show(x)}"


def _show(x: object, width: int = 40) -> str:
    text = repr(x)
    return text if len(text) <= width else text[: width - 3] + "..."


def _names(keys: list[str]) -> str:
    return ", ".join(_show(k) for k in keys[:10]) + (" ..." if len(keys) > 10 else "")
