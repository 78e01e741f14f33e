"""Thresholds are configuration: a TOML file changes the defaults and sets per-device values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ingest.detection import Detection, Thresholds, ThresholdsError
from ingest.registry import DeviceInfo, Registry


def registry() -> Registry:
    reg = Registry(gateways={"GW-1"})
    for key, (dev, kind) in enumerate(
        [("D-0001", "detector"), ("D-0002", "detector"), ("M-0001", "meter")], 1
    ):
        info = DeviceInfo(key, dev, kind, "GW-1", "H-0001", "district-1", 60, False, 4.0)  # type: ignore[arg-type]
        reg.by_id[dev] = info
        reg.by_key[key] = info
    return reg


def test_a_device_with_a_lower_gas_set_point_alarms_earlier(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text('[detector]\ngas_low_samples = 1\n[devices."D-0002"]\ngas_low = 6.0\n')
    detection = Detection(thresholds=Thresholds.load(path))
    cols = {
        "device_key": np.array([1, 2], np.int32),
        "ts": np.array([1000, 1000], np.int64),
        "ch4_lel": np.array([7.0, 7.0]),
        "alarm": np.array([False, False]),
    }
    changes = detection.run("detector", cols, registry())
    assert [(c.device_id, c.rule) for c in changes] == [("D-0002", "gas_low")]


BAD = [
    ("[detector]\ngas_lo = 3\n", "[detector] gas_lo: unknown threshold"),
    (
        "[meter]\npressure_low = 2.0\npressure_clear = 1.0\n",
        "[meter]: pressure_clear must not be below pressure_low",
    ),
    ('[devices."M-1"]\ncolour = 1\n', "[devices.'M-1'] colour: not a per-device threshold"),
    ('[devices."M-1"]\nqmax = "big"\n', "[devices.'M-1'] qmax: not a number"),
    ("[alarms]\nx = 1\n", "unknown sections ['alarms']"),
    ("[detector\n", "thresholds"),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_bad_thresholds_name_the_file_and_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "t.toml"
    path.write_text(text)
    with pytest.raises(ThresholdsError) as err:
        Thresholds.load(path)
    assert str(err.value).startswith(f"thresholds {path}") and message in str(err.value)
