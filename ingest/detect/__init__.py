"""Vectorised leak and abnormal-flow detection (DESIGN.md, "Detection").

Pure numpy kernels over one micro-batch of readings, with per-device state carried between
batches in arrays indexed by a dense device index (one index space per device kind)::

    state = MeterState(capacity)
    events, state = detect_meters(MeterColumns(idx, ts, volume, flow, ...), MeterParams(), state)
    events = scan_silence(state, now_ms, params)          # periodically

Readings may arrive in any order; each device's are taken in timestamp order, so the events
do not depend on where batches end. Replays (not newer than the device's last reading) are
ignored and counted in ``Events.stale``. Every rule raises an alarm and later clears it, at
most one open per (device, rule); ``state.is_open(rule)`` tells which are open.

Choices the rule table leaves open (pinned by the reference in tests/ingest):
- a reading flagged ``comm_lost`` feeds SILENT only; a reading that should carry a value but
  has NaN (CH4, flow, volume) is a SENSOR_FAULT; NaN pressure is skipped by PRESSURE_LOW, a
  missing battery is fine; NaN compares False elsewhere (it breaks runs, clears nothing);
- with a per-device raise level below the clear level, the clear level follows it down
  (GAS_LOW, GAS_HIGH) or up (PRESSURE_LOW), so raise and clear never hold at once;
- GAS_RISING clears after readings that are not rising and have CH4 below the clear level or
  a rate <= 0;
- MICRO_LEAK is open while either branch holds (night: cleared by a night no-flow reading;
  never zero for days: cleared by any no-flow reading);
- CONTINUOUS_FLOW and MICRO_LEAK measure flow time from the first reading of the run.
"""

from .detector import detect_detectors
from .events import (
    DETECTOR_RULES,
    METER_RULES,
    SEVERITY,
    Events,
    Rule,
    Severity,
    severity_of,
)
from .meter import detect_meters
from .params import (
    QMAX_BY_SIZE,
    DetectorColumns,
    DetectorParams,
    MeterColumns,
    MeterParams,
    qmax_for_sizes,
)
from .runs import NO_TS
from .silence import district_incidents, scan_never_reported, scan_silence
from .state import DetectorState, MeterState

__all__ = [
    "DETECTOR_RULES",
    "METER_RULES",
    "NO_TS",
    "QMAX_BY_SIZE",
    "SEVERITY",
    "DetectorColumns",
    "DetectorParams",
    "DetectorState",
    "Events",
    "MeterColumns",
    "MeterParams",
    "MeterState",
    "Rule",
    "Severity",
    "detect_detectors",
    "detect_meters",
    "district_incidents",
    "qmax_for_sizes",
    "scan_never_reported",
    "scan_silence",
    "severity_of",
]
