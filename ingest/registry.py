"""The device registry: importing it from CSV, and the in-memory view ingest works with.

``gasguard devices import FILE.csv`` takes one row per device::

    device_id,kind,household_id,district,address,phone,gateway_id,profile,meter_size,
        expected_interval_s,test_mode                       (one line in the file)
    D-0001,detector,H-0001,district-1,"12 Elm St, flat 3",555-0101,GW-0001,
        detector-generic,,60,false

Every row is checked first; any bad row names its line and field and nothing is imported.
Rows for devices that exist update them (households and gateways are created or updated too).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import psycopg
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gasguard.fields import Kind
from ingest.detect.runs import NO_TS

QMAX_BY_SIZE = {"G1.6": 2.5, "G2.5": 4.0, "G4": 6.0}
COLUMNS = [
    "device_id",
    "kind",
    "household_id",
    "district",
    "address",
    "phone",
    "gateway_id",
    "profile",
    "meter_size",
    "expected_interval_s",
    "test_mode",
]
_ID = r"^[^\s/+#]{1,64}$"


class RegistryError(ValueError):
    """The import file is unusable; every problem names its line and field."""


class DeviceRow(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    device_id: str = Field(pattern=_ID)
    kind: Literal["detector", "meter"]
    household_id: str = Field(pattern=_ID)
    district: str = Field(min_length=1, max_length=64)
    address: str = Field(min_length=1)
    phone: str | None = None
    gateway_id: str = Field(pattern=_ID)
    profile: str = Field(min_length=1)
    meter_size: Literal["G1.6", "G2.5", "G4"] | None = None
    expected_interval_s: int = Field(60, gt=0, le=86400)
    test_mode: bool = False

    @field_validator("phone", "meter_size", mode="before")
    @classmethod
    def _empty_is_none(cls, v: object) -> object:
        return None if v == "" else v

    @field_validator("expected_interval_s", "test_mode", mode="before")
    @classmethod
    def _empty_is_default(cls, v: object) -> object:
        return None if v == "" else v

    @model_validator(mode="after")
    def _size_for_meters(self) -> DeviceRow:
        if self.kind == "meter" and self.meter_size is None:
            raise ValueError("meter_size: a meter needs its size (G1.6, G2.5 or G4)")
        if self.kind == "detector" and self.meter_size is not None:
            raise ValueError("meter_size: only meters have a size")
        return self


def parse_csv(text: str, source: str = "<csv>") -> list[DeviceRow]:
    """Validate every row; RegistryError listing each bad line and field."""
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    missing = [
        c
        for c in COLUMNS
        if c not in header and c not in ("phone", "expected_interval_s", "test_mode")
    ]
    unknown = [c for c in header if c not in COLUMNS]
    if missing or unknown:
        raise RegistryError(
            f"{source}: line 1: header "
            + (f"misses {', '.join(missing)}" if missing else "")
            + ("; " if missing and unknown else "")
            + (f"has unknown columns {', '.join(unknown)}" if unknown else "")
        )
    rows: list[DeviceRow] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    for row in reader:
        line = reader.line_num
        data = {k: v for k, v in row.items() if k is not None}
        if None in row:
            problems.append(f"{source}: line {line}: more values than columns")
            continue
        clean = {
            k: v
            for k, v in data.items()
            if v is not None and not (v == "" and k in ("expected_interval_s", "test_mode"))
        }
        try:
            parsed = DeviceRow.model_validate(clean)
        except ValidationError as exc:
            for err in exc.errors():
                where = ".".join(str(p) for p in err["loc"])
                msg = err["msg"].removeprefix("Value error, ")
                problems.append(f"{source}: line {line}: {where + ': ' if where else ''}{msg}")
            continue
        if parsed.device_id in seen:
            problems.append(
                f"{source}: line {line}: device_id: {parsed.device_id} "
                f"already on line {seen[parsed.device_id]}"
            )
            continue
        seen[parsed.device_id] = line
        rows.append(parsed)
    if problems:
        raise RegistryError("\n".join(problems))
    if not rows:
        raise RegistryError(f"{source}: no devices")
    return rows


async def import_rows(conn: psycopg.AsyncConnection[Any], rows: list[DeviceRow]) -> int:
    """Write all rows in one transaction (all or nothing); returns how many devices."""
    households = {r.household_id: r for r in rows}
    async with conn.transaction(), conn.cursor() as cur:
        for gw in sorted({r.gateway_id for r in rows}):
            await cur.execute("INSERT INTO gateways (id) VALUES (%s) ON CONFLICT DO NOTHING", (gw,))
        await cur.executemany(
            "INSERT INTO households (id, district, address, phone) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (id) DO UPDATE SET district = excluded.district, "
            "address = excluded.address, phone = excluded.phone",
            [(h.household_id, h.district, h.address, h.phone) for h in households.values()],
        )
        await cur.executemany(
            "INSERT INTO devices (id, kind, household_id, gateway_id, profile, meter_size, "
            "expected_interval_s, test_mode) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (id) DO UPDATE SET household_id = excluded.household_id, "
            "gateway_id = excluded.gateway_id, profile = excluded.profile, "
            "meter_size = excluded.meter_size, expected_interval_s = excluded.expected_interval_s, "
            "test_mode = excluded.test_mode WHERE devices.kind = excluded.kind",
            [
                (
                    r.device_id,
                    r.kind,
                    r.household_id,
                    r.gateway_id,
                    r.profile,
                    r.meter_size,
                    r.expected_interval_s,
                    r.test_mode,
                )
                for r in rows
            ],
        )
        await cur.execute(
            "SELECT d.id FROM devices d JOIN unnest(%s::text[], %s::text[]) AS r(id, kind) "
            "ON r.id = d.id WHERE d.kind <> r.kind",
            ([r.device_id for r in rows], [r.kind for r in rows]),
        )
        clash = [row[0] for row in await cur.fetchall()]
        if clash:
            raise RegistryError(
                f"devices {', '.join(clash)} exist with another kind; nothing imported"
            )
        # ingest consumers reread the registry (and subscribe to new gateways) on commit
        await cur.execute("NOTIFY gasguard_registry")
    return len(rows)


def read_csv(path: Path) -> list[DeviceRow]:
    """The rows of a registry file, every one checked (RegistryError names line and field)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise RegistryError(f"{path}: {exc.strerror}") from None
    return parse_csv(text, str(path))


async def import_csv(conn: psycopg.AsyncConnection[Any], path: Path) -> int:
    return await import_rows(conn, read_csv(path))


@dataclass
class DeviceInfo:
    key: int
    id: str
    kind: Kind
    gateway_id: str
    household_id: str
    district: str
    expected_interval_s: int
    test_mode: bool
    qmax: float
    registered_ms: int | None = None  # when the device was registered (epoch ms)


@dataclass
class Registry:
    """What ingest needs to know about every device, by id and by key."""

    by_id: dict[str, DeviceInfo] = field(default_factory=dict)
    by_key: dict[int, DeviceInfo] = field(default_factory=dict)
    gateways: set[str] = field(default_factory=set)

    @property
    def capacity(self) -> int:
        return max(self.by_key, default=0) + 1

    def qmax_array(self) -> np.ndarray:
        out = np.full(self.capacity, np.inf)
        for k, d in self.by_key.items():
            out[k] = d.qmax
        return out

    def registered_array(self, kind: Kind, gateways: set[str] | None = None) -> np.ndarray:
        """Per key: when the device of ``kind`` (behind one of ``gateways``; None: any) was
        registered (epoch ms); NO_TS for other keys and devices without a registration time."""
        out = np.full(self.capacity, NO_TS, dtype=np.int64)
        for k, d in self.by_key.items():
            mine = gateways is None or d.gateway_id in gateways
            if d.kind == kind and d.registered_ms is not None and mine:
                out[k] = d.registered_ms
        return out

    def interval_array(self) -> np.ndarray:
        out = np.full(self.capacity, 60_000, dtype=np.int64)
        for k, d in self.by_key.items():
            out[k] = d.expected_interval_s * 1000
        return out


async def load_registry(conn: psycopg.AsyncConnection[Any]) -> Registry:
    cur = await conn.execute(
        "SELECT d.key, d.id, d.kind, d.gateway_id, d.household_id, h.district, "
        "d.expected_interval_s, d.test_mode, d.meter_size, "
        "(extract(epoch FROM d.created_at) * 1000)::bigint FROM devices d "
        "JOIN households h ON h.id = d.household_id"
    )
    reg = Registry()
    for key, id_, kind, gw, hh, district, interval, test, size, created in await cur.fetchall():
        info = DeviceInfo(
            int(key),
            str(id_),
            kind,
            str(gw),
            str(hh),
            str(district),
            int(interval),
            bool(test),
            QMAX_BY_SIZE.get(str(size), np.inf),
            int(created),
        )
        reg.by_id[info.id] = info
        reg.by_key[info.key] = info
    cur = await conn.execute("SELECT id FROM gateways")
    reg.gateways = {str(r[0]) for r in await cur.fetchall()}
    return reg


async def listeners(
    conn: psycopg.AsyncConnection[Any], gateways: list[str]
) -> dict[str, list[str]]:
    """The ingest consumers (MQTT client ids) subscribed to each gateway's telemetry, as
    they recorded it once the broker granted it (see ingest.consumer.sync_subscriptions)."""
    cur = await conn.execute(
        "SELECT g, coalesce(array_agg(s.client_id ORDER BY s.client_id) "
        "FILTER (WHERE s.client_id IS NOT NULL), '{}') "
        "FROM unnest(%s::text[]) AS g LEFT JOIN ingest_subscriptions s "
        "ON s.topic IN ('gasguard/v1/' || g || '/telemetry', 'gasguard/v1/+/telemetry') "
        "GROUP BY g ORDER BY g",
        (gateways,),
    )
    out = {str(g): list(c) for g, c in await cur.fetchall()}
    await conn.commit()
    return out
