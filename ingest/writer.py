"""One micro-batch, one transaction: batch ids first (a redelivered or replayed batch is
then a no-op), readings by binary COPY, alarms with their outbox rows, dead letters, and now
and then the detection state. The caller acknowledges the MQTT messages only after commit."""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import psycopg

from gasguard.fields import COMM_LOST, Kind
from ingest.copy import HEADER, TRAILER, binary_rows, copy_statement, narrow_to_real

log = logging.getLogger(__name__)

READING_COLUMNS: dict[Kind, dict[str, str]] = {
    "detector": {
        "ts": "timestamptz",
        "device_key": "integer",
        "ch4_lel": "real",
        "alarm": "boolean",
        "fault": "boolean",
        "valve_closed": "boolean",
        "eol": "boolean",
        "temp_c": "real",
        "comm_lost": "boolean",
    },
    "meter": {
        "ts": "timestamptz",
        "device_key": "integer",
        "volume_m3": "double precision",
        "flow_m3h": "real",
        "pressure_kpa": "real",
        "valve_closed": "boolean",
        "battery_pct": "real",
        "tamper": "boolean",
        "reverse_flow": "boolean",
        "comm_lost": "boolean",
    },
}


@dataclass
class DeadLetter:
    topic: str
    payload: bytes
    field: str | None
    reason: str


@dataclass
class AlarmChange:
    """A detection event made concrete for one registered device."""

    device_key: int
    device_id: str
    household_id: str
    district: str
    rule: str
    severity: str
    raised: bool
    ts_ms: int
    value: float
    test_mode: bool


@dataclass
class Outcome:
    alarms_raised: int = 0
    alarms_cleared: int = 0
    outbox_rows: int = 0
    incidents_opened: int = 0
    confidence_raised: int = 0  # alarms that became high confidence
    flapping: int = 0  # alarms cleared within FLAPPING of being raised


def _ts(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


async def claim_batches(
    cur: psycopg.AsyncCursor[Any], ids: Sequence[tuple[str, int, int]]
) -> set[tuple[str, int]]:
    """Record (gw, seq, readings); the ones recorded now (not seen before) are returned."""
    if not ids:
        return set()
    await cur.execute(
        "INSERT INTO ingested_batches (gw, seq, readings) "
        "SELECT * FROM unnest(%s::text[], %s::bigint[], %s::integer[]) "
        "ON CONFLICT DO NOTHING RETURNING gw, seq",
        ([i[0] for i in ids], [i[1] for i in ids], [i[2] for i in ids]),
    )
    return {(str(gw), int(seq)) for gw, seq in await cur.fetchall()}


async def copy_readings(
    cur: psycopg.AsyncCursor[Any], kind: Kind, columns: dict[str, npt.NDArray[np.generic]]
) -> npt.NDArray[np.bool_]:
    """COPY one kind's readings; which rows were new (a reading stored before, same device and
    ts, is a repeat and not stored again). Rows with comm_lost carry NULLs and take a slower
    path. Repeats are rare: the readings go in by plain COPY, and only when the unique index
    refuses one are they staged and inserted with ``ON CONFLICT DO NOTHING``."""
    n = len(columns["ts"])
    if n == 0:
        return np.zeros(0, np.bool_)
    try:
        async with cur.connection.transaction():  # a savepoint: a refused COPY undoes itself
            await _copy_into(cur, f"{kind}_readings", kind, columns)
        return np.ones(n, np.bool_)
    except psycopg.errors.UniqueViolation:
        pass
    stage = f"gasguard_stage_{kind}"
    await cur.execute(
        f"CREATE TEMP TABLE IF NOT EXISTS {stage} (LIKE {kind}_readings INCLUDING DEFAULTS) "
        "ON COMMIT DELETE ROWS"
    )
    await cur.execute(f"TRUNCATE {stage}")
    await _copy_into(cur, stage, kind, columns)
    await cur.execute(
        f"INSERT INTO {kind}_readings SELECT DISTINCT ON (device_key, ts) * FROM {stage} "
        "ORDER BY device_key, ts ON CONFLICT (device_key, ts) DO NOTHING "
        "RETURNING device_key, (extract(epoch FROM ts) * 1000)::bigint"
    )
    stored = {(int(k), int(t)) for k, t in await cur.fetchall()}
    new = np.zeros(n, np.bool_)
    keys = zip(columns["device_key"].tolist(), columns["ts"].tolist(), strict=True)
    for row, key in enumerate(keys):
        if key in stored:  # the first of repeats within the batch
            new[row] = True
            stored.discard(key)
    return new


async def _copy_into(
    cur: psycopg.AsyncCursor[Any],
    table: str,
    kind: Kind,
    columns: dict[str, npt.NDArray[np.generic]],
) -> None:
    types = READING_COLUMNS[kind]
    n = len(columns["ts"])
    lost = np.asarray(columns.get(COMM_LOST, np.zeros(n, dtype=bool)), dtype=bool)
    names = [c for c in types if c in columns]
    good = np.flatnonzero(~lost)
    if len(good):
        # in index order: the (device_key, ts) btree takes sorted rows much faster
        good = good[np.lexsort((columns["ts"][good], columns["device_key"][good]))]
        cols = [(c, types[c], np.asarray(columns[c])[good]) for c in names]
        async with cur.copy(copy_statement(table, names)) as copy:
            await copy.write(HEADER + binary_rows(cols) + TRAILER)
    if lost.any():
        async with cur.copy(f"COPY {table} (ts, device_key, comm_lost) FROM STDIN") as copy:
            for ms, key in zip(
                columns["ts"][lost].tolist(), columns["device_key"][lost].tolist(), strict=True
            ):
                await copy.write_row((_ts(int(ms)), int(key), True))


HOUR_MS = 3_600_000


def _groups(
    keys: np.ndarray, ts: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sort by (device, hour); returns the order, the group starts, and each group's key/hour."""
    hour = ts // HOUR_MS
    order = np.lexsort((hour, keys))
    k, h = keys[order], hour[order]
    starts = np.flatnonzero(np.r_[True, (k[1:] != k[:-1]) | (h[1:] != h[:-1])])
    return order, starts, k[starts], h[starts]


async def stage_rollups(
    cur: psycopg.AsyncCursor[Any], kind: Kind, columns: dict[str, np.ndarray]
) -> None:
    """Append one micro-batch's per-(device, hour) figures to the rollup deltas, in the
    transaction that stores its readings; :func:`fold_rollups` merges them into the hourly
    rollups (stock PostgreSQL; TimescaleDB keeps its continuous aggregates itself). Lost
    readings carry no values and do not count."""
    keep = ~np.asarray(columns.get(COMM_LOST, np.zeros(len(columns["ts"]), bool)), bool)
    if not keep.any():
        return
    keys = columns["device_key"][keep].astype(np.int64)
    ts = columns["ts"][keep]
    order, starts, gkey, ghour = _groups(keys, ts)

    def col(name: str, how: str) -> np.ndarray:  # NaN: no value in the group (fold: NULL)
        if name not in columns:
            return np.full(len(starts), np.nan)
        values = np.asarray(columns[name])[keep]
        if READING_COLUMNS[kind][name] == "real":  # what is stored: a value past float32 is NaN
            values = narrow_to_real(values)
        return _reduce_nan(values, order, starts, how)

    figures: list[tuple[str, str, npt.NDArray[np.generic]]] = [
        ("bucket", "timestamptz", ghour * HOUR_MS),
        ("device_key", "integer", gkey),
    ]
    if kind == "meter":
        figures += [
            ("min_volume_m3", "double precision", col("volume_m3", "min")),
            ("max_volume_m3", "double precision", col("volume_m3", "max")),
            ("max_flow_m3h", "real", col("flow_m3h", "max")),
            ("min_flow_m3h", "real", col("flow_m3h", "min")),
            ("min_pressure_kpa", "real", col("pressure_kpa", "min")),
        ]
    else:
        figures.append(("max_ch4_lel", "real", col("ch4_lel", "max")))
    figures.append(("readings", "integer", np.diff(np.r_[starts, len(keys)])))
    statement = copy_statement(f"{kind}_hourly_delta", [name for name, _, _ in figures])
    async with cur.copy(statement) as copy:  # binary COPY straight from the arrays
        await copy.write(HEADER + binary_rows(figures) + TRAILER)


def _reduce_nan(
    values: np.ndarray, order: np.ndarray, starts: np.ndarray, how: str
) -> npt.NDArray[np.float64]:
    """Per group min or max ignoring NaN; NaN where a group has no value."""
    v = values[order].astype(np.float64)
    fill = np.inf if how == "min" else -np.inf
    out = (np.minimum if how == "min" else np.maximum).reduceat(
        np.where(np.isnan(v), fill, v), starts
    )
    return np.where(np.isfinite(out), out, np.nan)


FOLD_LOCK = 0x6761_7366  # advisory lock: one fold at a time among several consumers


async def fold_rollups(conn: psycopg.AsyncConnection[Any]) -> bool:
    """Merge the staged rollup deltas into the hourly rollups, in one transaction. Returns
    False when another consumer is folding right now (its fold takes these rows too)."""
    async with conn.transaction(), conn.cursor() as cur:
        await cur.execute("SELECT pg_try_advisory_xact_lock(%s)", (FOLD_LOCK,))
        row = await cur.fetchone()
        if not (row and row[0]):
            return False
        await cur.execute(
            """
            WITH d AS (DELETE FROM meter_hourly_delta RETURNING *)
            INSERT INTO meter_hourly (bucket, device_key, min_volume_m3, max_volume_m3,
                                      max_flow_m3h, min_flow_m3h, min_pressure_kpa, readings)
            SELECT bucket, device_key, min(nullif(min_volume_m3, 'NaN')),
                   max(nullif(max_volume_m3, 'NaN')), max(nullif(max_flow_m3h, 'NaN')),
                   min(nullif(min_flow_m3h, 'NaN')), min(nullif(min_pressure_kpa, 'NaN')),
                   sum(readings)
            FROM d GROUP BY device_key, bucket ORDER BY device_key, bucket
            ON CONFLICT (device_key, bucket) DO UPDATE SET
                min_volume_m3 = LEAST(meter_hourly.min_volume_m3, excluded.min_volume_m3),
                max_volume_m3 = GREATEST(meter_hourly.max_volume_m3, excluded.max_volume_m3),
                max_flow_m3h = GREATEST(meter_hourly.max_flow_m3h, excluded.max_flow_m3h),
                min_flow_m3h = LEAST(meter_hourly.min_flow_m3h, excluded.min_flow_m3h),
                min_pressure_kpa = LEAST(meter_hourly.min_pressure_kpa, excluded.min_pressure_kpa),
                readings = meter_hourly.readings + excluded.readings
            """
        )
        await cur.execute(
            """
            WITH d AS (DELETE FROM detector_hourly_delta RETURNING *)
            INSERT INTO detector_hourly (bucket, device_key, max_ch4_lel, readings)
            SELECT bucket, device_key, max(nullif(max_ch4_lel, 'NaN')), sum(readings)
            FROM d GROUP BY device_key, bucket ORDER BY device_key, bucket
            ON CONFLICT (device_key, bucket) DO UPDATE SET
                max_ch4_lel = GREATEST(detector_hourly.max_ch4_lel, excluded.max_ch4_lel),
                readings = detector_hourly.readings + excluded.readings
            """
        )
    return True


FLAPPING = timedelta(minutes=1)
"""an alarm cleared this soon after it was raised (by the readings' time) flapped"""


async def write_alarms(cur: psycopg.AsyncCursor[Any], changes: Sequence[AlarmChange]) -> Outcome:
    """Open and close alarms (one open per device and rule) and queue their outbox rows, in
    the order of the changes; an alarm raised beside an open alarm of the other kind in its
    household raises both to high confidence (:func:`raise_confidence`)."""
    out = Outcome()
    for c in changes:
        if c.raised:
            await cur.execute(
                "INSERT INTO alarms (device_key, device_id, household_id, district, rule, "
                "severity, test_mode, raised_at, raise_value) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (device_key, rule) WHERE cleared_at IS NULL DO NOTHING RETURNING id",
                (
                    c.device_key,
                    c.device_id,
                    c.household_id,
                    c.district,
                    c.rule,
                    c.severity,
                    c.test_mode,
                    _ts(c.ts_ms),
                    _finite(c.value),
                ),
            )
            row = await cur.fetchone()
            if row is None:
                continue  # already open (e.g. raised again after a restart)
            out.alarms_raised += 1
        else:
            await cur.execute(
                # never cleared before it was raised (a SILENT raised by the scan at ingest's
                # clock, cleared by a reading stamped earlier that was still on its way)
                "UPDATE alarms SET cleared_at = greatest(%s, raised_at), clear_value = %s "
                "WHERE device_key = %s "
                "AND rule = %s AND cleared_at IS NULL "
                "RETURNING id, cleared_at - raised_at < %s",
                (_ts(c.ts_ms), _finite(c.value), c.device_key, c.rule, FLAPPING),
            )
            row = await cur.fetchone()
            if row is None:
                continue
            out.alarms_cleared += 1
            out.flapping += bool(row[1])
        payload = {
            "alarm_id": row[0],
            "device": c.device_id,
            "household": c.household_id,
            "district": c.district,
            "rule": c.rule,
            "severity": c.severity,
            "test": c.test_mode,
            "at": c.ts_ms,
            "value": _finite(c.value),
        }
        await cur.execute(
            "INSERT INTO alarm_outbox (alarm_id, event, payload) VALUES (%s, %s, %s)",
            (row[0], "raised" if c.raised else "cleared", orjson.dumps(payload).decode()),
        )
        out.outbox_rows += 1
        # judged change by change: a micro-batch may hold a whole dip or a whole leak
        if c.rule == "pressure_low":
            out.incidents_opened += await update_district_incidents(cur, {c.district})
        if c.raised:
            out.confidence_raised += await raise_confidence(cur, {c.household_id})
    return out


async def raise_confidence(cur: psycopg.AsyncCursor[Any], households: set[str]) -> int:
    """A detector gas alarm and a meter anomaly open in the same household: both become
    'high' confidence, and the alerting service is told."""
    if not households:
        return 0
    await cur.execute(
        """
        WITH both_open AS (
            SELECT household_id FROM alarms
            WHERE cleared_at IS NULL AND household_id = ANY(%s)
            GROUP BY household_id
            HAVING bool_or(rule IN ('gas_low', 'gas_high', 'gas_rising', 'gas_present'))
               AND bool_or(rule IN ('burst', 'continuous_flow', 'micro_leak', 'valve_fault'))
        )
        UPDATE alarms a SET confidence = 'high' FROM both_open b
        WHERE a.household_id = b.household_id AND a.cleared_at IS NULL AND a.confidence <> 'high'
        RETURNING a.id, a.household_id, a.rule
        """,
        (sorted(households),),
    )
    rows = await cur.fetchall()
    for alarm_id, household, rule in rows:
        await cur.execute(
            "INSERT INTO alarm_outbox (alarm_id, event, payload) VALUES (%s, 'confidence', %s)",
            (
                alarm_id,
                orjson.dumps(
                    {
                        "alarm_id": alarm_id,
                        "household": household,
                        "rule": rule,
                        "confidence": "high",
                    }
                ).decode(),
            ),
        )
    return len(rows)


async def update_district_incidents(
    cur: psycopg.AsyncCursor[Any], districts: set[str], min_share: float = 0.3, min_count: int = 3
) -> int:
    """Many meters of one district with low pressure at once are one network incident: open
    it when at least ``min_count`` meters and ``min_share`` of the district's meters have an
    open pressure_low alarm, close it when that is no longer so. Returns incidents opened."""
    if not districts:
        return 0
    await cur.execute(
        """
        WITH low AS (
            SELECT h.district,
                   count(*) FILTER (WHERE a.id IS NOT NULL) AS low, count(*) AS meters
            FROM devices d JOIN households h ON h.id = d.household_id
            LEFT JOIN alarms a ON a.device_key = d.key AND a.rule = 'pressure_low'
                               AND a.cleared_at IS NULL
            WHERE d.kind = 'meter' AND h.district = ANY(%(d)s)
            GROUP BY h.district
        ), opened AS (
            INSERT INTO district_incidents (district, rule, opened_at, households)
            SELECT district, 'pressure_low', now(), low FROM low
            WHERE low >= %(n)s AND low >= %(share)s * meters
            ON CONFLICT (district, rule) WHERE closed_at IS NULL
                DO UPDATE SET households = excluded.households
            RETURNING (xmax = 0) AS new
        ), closed AS (
            UPDATE district_incidents i SET closed_at = now() FROM low
            WHERE i.district = low.district AND i.rule = 'pressure_low' AND i.closed_at IS NULL
              AND NOT (low.low >= %(n)s AND low.low >= %(share)s * low.meters)
            RETURNING i.id
        )
        SELECT (SELECT count(*) FROM opened WHERE new), (SELECT count(*) FROM closed)
        """,
        {"d": sorted(districts), "n": min_count, "share": min_share},
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def write_dead_letters(cur: psycopg.AsyncCursor[Any], letters: Sequence[DeadLetter]) -> None:
    if letters:
        await cur.executemany(
            "INSERT INTO dead_letters (topic, payload, field, reason) VALUES (%s, %s, %s, %s)",
            [(d.topic, d.payload, d.field, d.reason) for d in letters],
        )


async def save_state(
    cur: psycopg.AsyncCursor[Any], shard: str, kind: Kind, arrays: dict[str, np.ndarray]
) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    await cur.execute(
        "INSERT INTO detection_state (shard, kind, state) VALUES (%s, %s, %s) "
        "ON CONFLICT (shard, kind) DO UPDATE SET state = excluded.state, saved_at = now()",
        (shard, kind, buf.getvalue()),
    )


async def load_state(
    conn: psycopg.AsyncConnection[Any], shard: str, kind: Kind
) -> dict[str, np.ndarray] | None:
    cur = await conn.execute(
        "SELECT state FROM detection_state WHERE shard = %s AND kind = %s", (shard, kind)
    )
    row = await cur.fetchone()
    if row is None:
        return None
    with np.load(io.BytesIO(bytes(row[0]))) as data:
        return {k: data[k] for k in data.files}


def _finite(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None
