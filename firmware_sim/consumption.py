"""A household's daily gas use: cooking in the morning and evening, water heating a few
times a day, nothing at night.

Demand is a pure function of (seed, household, day, time of day), so it does not depend on
how often or in which order the simulation asks: a fast-forwarded run and a real-time run
with the same seed see the same flows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# One row per appliance use: (mean start hour, spread h, mean minutes, spread min, m3/h low, high)
_USES = (
    (6.9, 0.35, 25.0, 8.0, 0.25, 0.45),  # breakfast on the hob
    (11.8, 0.4, 30.0, 10.0, 0.25, 0.5),  # lunch
    (18.2, 0.5, 45.0, 12.0, 0.35, 0.6),  # dinner, two burners
    (7.3, 0.4, 8.0, 3.0, 0.5, 0.7),  # morning shower (share of the meter's Qmax)
    (21.0, 0.8, 12.0, 4.0, 0.5, 0.7),  # evening shower
)
_HEATER_ROWS = (3, 4)  # rates of these rows are a share of Qmax, the others m3/h
_NIGHT_START_H, _NIGHT_END_H = 23.0, 5.5


@dataclass
class _Day:
    start_s: np.ndarray  # (uses, households)
    end_s: np.ndarray
    rate: np.ndarray


class ConsumptionPattern:
    """Demand in m3/h for every household at a given local time."""

    def __init__(self, seed: int, qmax_m3h: np.ndarray, utc_offset_hours: float) -> None:
        self._seed = seed
        self._qmax = qmax_m3h
        self._offset_s = utc_offset_hours * 3600.0
        rng = np.random.default_rng([seed, 0xC0DE])
        self._scale = rng.uniform(0.6, 1.3, size=qmax_m3h.shape)
        self._days: dict[int, _Day] = {}

    def _day(self, day: int) -> _Day:
        found = self._days.get(day)
        if found is None:
            if len(self._days) > 8:
                self._days.clear()
            found = self._days[day] = self._plan(day)
        return found

    def _plan(self, day: int) -> _Day:
        rng = np.random.default_rng([self._seed, 0xDA7, day])
        n = self._qmax.shape[0]
        uses = np.array(_USES)
        start_h = uses[:, [0]] + uses[:, [1]] * rng.standard_normal((len(_USES), n))
        minutes = np.maximum(uses[:, [2]] + uses[:, [3]] * rng.standard_normal((len(_USES), n)), 2)
        share = rng.uniform(uses[:, [4]], uses[:, [5]], size=(len(_USES), n))
        rate = share * self._scale
        rate[list(_HEATER_ROWS)] = share[list(_HEATER_ROWS)] * self._qmax
        skipped = rng.random((len(_USES), n)) < 0.15  # not every meal is cooked at home
        start_h = np.clip(start_h, _NIGHT_END_H, _NIGHT_START_H)
        start_s = start_h * 3600.0
        end_s = np.minimum(start_s + minutes * 60.0, _NIGHT_START_H * 3600.0)
        return _Day(start_s=start_s, end_s=end_s, rate=np.where(skipped, 0.0, rate))

    def demand(self, epoch_s: float) -> np.ndarray:
        """Flow each household draws at that instant, m3/h."""
        local = epoch_s + self._offset_s
        day, tod = divmod(local, 86400.0)
        plan = self._day(int(day))
        active = (plan.start_s <= tod) & (tod < plan.end_s)
        return np.asarray((plan.rate * active).sum(axis=0))
