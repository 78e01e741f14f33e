"""The households of bench/detection_quality.py and their normal life, one poll round at a time.

Every household has a methane detector and a smart gas meter on one gateway (200 households a
gateway, one district a gateway). A round gives every device's reading at ``t + phase``: the
gateway sweeps its devices in ``SWEEP_MS`` from its own offset in the round, so a device's
readings are exactly one interval apart and the generator knows every reading's timestamp.

Normal life, vectorised over all households:

- detector: clean air, CH4 = base (0-0.8 %LEL) + noise, clipped to 0-2 %LEL, at a resolution of
  0.1 %LEL (one detector in ten: 1 %LEL, which reads a steady 0 or 1 in clean air);
- meter: each day's appliance uses (breakfast, lunch, dinner, a long simmer, showers on a gas
  water heater, a rare snack after midnight) as intervals with a constant flow; the flow
  reading is the sum of the uses at that instant and the volume register their exact integral,
  so the register always agrees with the flow. Peaks stay below the meter's Qmax. Supply
  pressure is the district's nominal 1.85-2.15 kPa with noise (gateways without pressure
  sensors leave the column out); battery 35-100 % draining slowly; a few households are shut
  off by the utility (valve closed all month, no use);
- one reading in a thousand is simply missing (the gateway retried too late); hazard
  households are spared this so that their labels stay exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from gasguard.fields import Kind
from ingest.registry import QMAX_BY_SIZE, DeviceInfo, Registry

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000
UTC_OFFSET_MS = 8 * HOUR_MS  # local time UTC+8, as ingest's default
PER_GATEWAY = 200
DISTRICTS = 20
SWEEP_MS = 10_000  # a gateway reads its devices over this long, then sends the batch
SIZE_SHARE = {"G1.6": 0.5, "G2.5": 0.35, "G4": 0.15}
MISSING_SHARE = 0.001

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
Columns = dict[str, npt.NDArray[np.generic]]

# One row per appliance use: name, mean start (local h), spread h, mean minutes, spread
# minutes, flow low, high (m3/h, or share of Qmax for the water heater), chance per day, who.
USES: tuple[tuple[str, float, float, float, float, float, float, float, str], ...] = (
    ("breakfast", 6.9, 0.35, 25.0, 8.0, 0.25, 0.45, 0.9, "all"),
    ("lunch", 11.8, 0.4, 30.0, 10.0, 0.25, 0.5, 0.6, "all"),
    ("simmer", 15.0, 1.0, 150.0, 40.0, 0.12, 0.25, 0.1, "all"),
    ("dinner", 18.2, 0.5, 45.0, 12.0, 0.35, 0.6, 0.95, "all"),
    ("morning shower", 7.3, 0.4, 8.0, 3.0, 0.4, 0.55, 0.5, "heater"),
    ("evening shower", 21.0, 0.8, 12.0, 4.0, 0.4, 0.55, 0.8, "heater"),
    ("snack after midnight", 0.7, 0.4, 10.0, 4.0, 0.25, 0.45, 0.03, "snack"),
)
COOKING_PEAK = max(u[6] for u in USES if u[8] != "heater")  # m3/h before the household scale


@dataclass(frozen=True)
class Config:
    households: int
    days: float
    detector_interval_s: int
    meter_interval_s: int
    seed: int
    t0_ms: int  # local midnight

    @property
    def end_ms(self) -> int:
        return self.t0_ms + int(self.days * DAY_MS)

    def interval_ms(self, kind: str) -> int:
        return 1000 * (self.detector_interval_s if kind == "detector" else self.meter_interval_s)


@dataclass(eq=False)
class Fleet:
    """Who is where, and the fixed traits of every household (arrays by household index)."""

    cfg: Config
    gateways: int
    gateway_ids: list[str]
    detector_ids: npt.NDArray[np.object_]
    meter_ids: npt.NDArray[np.object_]
    size: list[str]
    qmax: FloatArray
    heater: BoolArray
    scale: FloatArray  # cooking flow factor
    coarse: BoolArray  # detector resolution 1 %LEL
    ch4_base: FloatArray
    ch4_sigma: FloatArray
    pressure_nominal: FloatArray
    gateway_pressure: BoolArray  # per gateway: its meters report supply pressure
    battery0: FloatArray
    battery_drain_per_ms: FloatArray
    volume0: FloatArray
    shut_off: BoolArray
    phase: dict[str, IntArray] = field(default_factory=dict)  # per kind, ms into the round
    protected: BoolArray = field(init=False)  # hazard households: no missing readings

    def __post_init__(self) -> None:
        self.protected = np.zeros(self.cfg.households, np.bool_)

    @classmethod
    def build(cls, cfg: Config) -> Fleet:
        n = cfg.households
        rng = np.random.default_rng([cfg.seed, 1])
        gateways = -(-n // PER_GATEWAY)
        gw = np.arange(n) // PER_GATEWAY
        size = list(rng.choice(list(SIZE_SHARE), n, p=list(SIZE_SHARE.values())))
        district_kpa = rng.uniform(1.85, 2.15, DISTRICTS)
        fleet = cls(
            cfg=cfg,
            gateways=gateways,
            gateway_ids=[f"GW{g:04d}" for g in range(gateways)],
            detector_ids=np.array([f"D{i:06d}" for i in range(n)], dtype=object),
            meter_ids=np.array([f"M{i:06d}" for i in range(n)], dtype=object),
            size=size,
            qmax=np.array([QMAX_BY_SIZE[s] for s in size]),
            heater=rng.random(n) < 0.6,
            scale=rng.uniform(0.6, 1.3, n),
            coarse=rng.random(n) < 0.1,
            ch4_base=rng.uniform(0.0, 0.8, n),
            ch4_sigma=rng.uniform(0.1, 0.35, n),
            pressure_nominal=district_kpa[gw % DISTRICTS],
            gateway_pressure=rng.random(gateways) < 0.7,
            battery0=rng.uniform(35.0, 100.0, n),
            battery_drain_per_ms=rng.uniform(1.0, 3.0, n) / (30 * DAY_MS),
            volume0=np.round(rng.uniform(100.0, 5000.0, n), 3),
            shut_off=rng.random(n) < 0.003,
        )
        for kind in ("detector", "meter"):
            interval = cfg.interval_ms(kind)
            room = max(interval - SWEEP_MS - 5_000, 1)
            offset = rng.integers(0, room, gateways)
            step = SWEEP_MS // PER_GATEWAY
            fleet.phase[kind] = (offset[gw] + (np.arange(n) % PER_GATEWAY) * step).astype(np.int64)
        return fleet

    def gateway_of(self, household: int) -> int:
        return household // PER_GATEWAY

    def rows(self, gateway: int) -> slice:
        return slice(gateway * PER_GATEWAY, min((gateway + 1) * PER_GATEWAY, self.cfg.households))

    def key(self, kind: str, household: int | IntArray) -> IntArray:
        """Registry key: detectors 0..n-1, meters n..2n-1."""
        return np.asarray(household, np.int64) + (self.cfg.households if kind == "meter" else 0)

    def registry(self) -> Registry:
        """The registry ingest would load, built in memory."""
        reg = Registry()
        n = self.cfg.households
        for i in range(n):
            g = self.gateway_ids[self.gateway_of(i)]
            district = f"district-{self.gateway_of(i) % DISTRICTS}"
            devices: tuple[tuple[Kind, npt.NDArray[np.object_], int, float], ...] = (
                ("detector", self.detector_ids, i, np.inf),
                ("meter", self.meter_ids, n + i, float(self.qmax[i])),
            )
            for kind, ids, key, qmax in devices:
                interval_s = self.cfg.interval_ms(kind) // 1000
                info = DeviceInfo(
                    key, str(ids[i]), kind, g, f"H{i:06d}", district, interval_s, False, qmax,
                    registered_ms=self.cfg.t0_ms,
                )  # fmt: skip
                reg.by_id[info.id] = info
                reg.by_key[info.key] = info
        reg.gateways = set(self.gateway_ids)
        return reg

    def grid_at_or_after(self, kind: str, household: int, t: int) -> int:
        """Timestamp of the device's first reading at or after ``t``."""
        interval = self.cfg.interval_ms(kind)
        base = self.cfg.t0_ms + int(self.phase[kind][household])
        k = max(-(-(t - base) // interval), 0)
        return base + k * interval


@dataclass
class _Day:
    index: int
    start: IntArray  # (uses, households), absolute ms
    end: IntArray
    rate: FloatArray  # m3/h
    volume_at_start: FloatArray  # register at local midnight


class NormalLife:
    """Clean readings of every device for one round; hazards are laid over them afterwards."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.cfg = fleet.cfg
        self.rng = np.random.default_rng([fleet.cfg.seed, 2])
        self._day: _Day | None = None

    def detector(self, t: int) -> tuple[IntArray, Columns, BoolArray]:
        """(ts, columns, present) for the detector round that starts at ``t``."""
        f = self.fleet
        n = self.cfg.households
        ts = t + f.phase["detector"]
        ch4 = np.clip(f.ch4_base + f.ch4_sigma * self.rng.standard_normal(n), 0.0, 2.0)
        ch4 = np.where(f.coarse, np.round(ch4), np.round(ch4, 1))
        cols: Columns = {
            "ch4_lel": ch4,
            "alarm": np.zeros(n, np.bool_),
            "comm_lost": np.zeros(n, np.bool_),
        }
        return ts, cols, self._present()

    def meter(self, t: int) -> tuple[IntArray, Columns, BoolArray]:
        """(ts, columns, present) for the meter round that starts at ``t``."""
        f = self.fleet
        n = self.cfg.households
        ts = t + f.phase["meter"]
        day = self._plan((t + UTC_OFFSET_MS) // DAY_MS)
        active = (day.start <= ts) & (ts < day.end)
        flow = (day.rate * active).sum(axis=0)
        used = np.clip(ts - day.start, 0, day.end - day.start) / HOUR_MS
        volume = day.volume_at_start + (day.rate * used).sum(axis=0)
        pressure = f.pressure_nominal + 0.02 * self.rng.standard_normal(n)
        battery = f.battery0 - f.battery_drain_per_ms * (ts - self.cfg.t0_ms)
        cols: Columns = {
            "volume_m3": np.round(volume, 4),
            "flow_m3h": np.round(flow, 4),
            "pressure_kpa": np.round(pressure, 2),
            "valve_closed": f.shut_off.copy(),
            "battery_pct": np.round(battery, 1),
            "comm_lost": np.zeros(n, np.bool_),
        }
        return ts, cols, self._present()

    def _present(self) -> BoolArray:
        return (self.rng.random(self.cfg.households) >= MISSING_SHARE) | self.fleet.protected

    def _plan(self, local_day: int) -> _Day:
        """The appliance uses of one local day (days are asked for in order)."""
        if self._day is not None and self._day.index == local_day:
            return self._day
        f = self.fleet
        n = self.cfg.households
        if self._day is None:
            volume = f.volume0.copy()
        else:
            prev = self._day
            volume = prev.volume_at_start + (prev.rate * (prev.end - prev.start)).sum(0) / HOUR_MS
        rng = np.random.default_rng([self.cfg.seed, 3, local_day])
        u = np.array([row[1:8] for row in USES])
        who = [row[8] for row in USES]
        k = len(USES)
        mean_h, spread_h, mean_min, spread_min, lo, hi, chance = (u[:, [j]] for j in range(7))
        start_h = mean_h + spread_h * np.clip(rng.standard_normal((k, n)), -2.5, 2.5)
        start_h = np.maximum(start_h, 0.05)  # within the day: its register is the day's sum
        minutes = mean_min + spread_min * np.clip(rng.standard_normal((k, n)), -2.0, 2.0)
        minutes = np.maximum(minutes, 3.0)
        share = rng.uniform(lo, hi, (k, n))
        heater_rows = np.array([w == "heater" for w in who])
        rate = np.where(heater_rows[:, None], share * f.qmax, share * f.scale)
        eligible = np.ones((k, n), np.bool_)
        eligible[heater_rows] = f.heater
        snack = np.array([w == "snack" for w in who])
        eligible[snack] = ~f.protected
        happens = eligible & (rng.random((k, n)) < chance) & ~f.shut_off
        midnight = local_day * DAY_MS - UTC_OFFSET_MS
        start = midnight + (start_h * HOUR_MS).astype(np.int64)
        end = np.minimum(start + (minutes * MINUTE_MS).astype(np.int64), midnight + DAY_MS - 1)
        self._day = _Day(local_day, start, end, np.where(happens, rate, 0.0), volume)
        return self._day
