"""JSON out of the hotline, whatever a payload held: orjson for speed, and the standard
library for what orjson refuses (integers past 64 bits, which PostgreSQL's jsonb keeps
exactly, e.g. a reading of 1e300 printed in full)."""

from __future__ import annotations

import json
from typing import Any

import orjson


def dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, default=str, ensure_ascii=False, allow_nan=False).encode()
