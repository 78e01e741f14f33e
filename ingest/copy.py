"""PostgreSQL binary COPY straight from numpy columns.

Every row of a fixed-width binary COPY has the same layout (field count, then length and
big-endian value per field), so a whole batch is one numpy structured array filled column by
column and written with one ``tobytes()``: no Python work per reading. A NULL needs a
different layout, so rows with missing values (``comm_lost``) are written by a second, small
COPY with ``write_row``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

HEADER = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
TRAILER = (-1).to_bytes(2, "big", signed=True)
PG_EPOCH_MS = 946_684_800_000  # 2000-01-01T00:00Z

# column type -> (numpy big-endian dtype, byte length)
PG_TYPES: dict[str, tuple[str, int]] = {
    "timestamptz": (">i8", 8),
    "integer": (">i4", 4),
    "bigint": (">i8", 8),
    "real": (">f4", 4),
    "double precision": (">f8", 8),
    "boolean": ("u1", 1),
}


def binary_rows(columns: Sequence[tuple[str, str, npt.NDArray[np.generic]]]) -> bytes:
    """Rows (without header and trailer) for ``(name, pg type, values)`` columns.

    ``timestamptz`` values are epoch milliseconds (int64); other values are converted to
    the column's type. No value may be missing (NaN is written as NaN, not NULL).
    """
    if not columns:
        raise ValueError("no columns")
    n = len(columns[0][2])
    fields: list[tuple[str, str]] = [("count", ">i2")]
    for i, (_, pg_type, _) in enumerate(columns):
        fields += [(f"len{i}", ">i4"), (f"val{i}", PG_TYPES[pg_type][0])]
    rows = np.empty(n, dtype=np.dtype(fields))
    rows["count"] = len(columns)
    for i, (name, pg_type, values) in enumerate(columns):
        if len(values) != n:
            raise ValueError(f"column {name!r} has {len(values)} values, expected {n}")
        rows[f"len{i}"] = PG_TYPES[pg_type][1]
        if pg_type == "timestamptz":
            rows[f"val{i}"] = (np.asarray(values, dtype=np.int64) - PG_EPOCH_MS) * 1000
        elif pg_type == "real":
            rows[f"val{i}"] = narrow_to_real(values)
        else:
            rows[f"val{i}"] = values
    return rows.tobytes()


F32_MAX = float(np.finfo(np.float32).max)


def narrow_to_real(values: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Values for a ``real`` column: one that no float32 can hold (1e300) is stored as NaN,
    never as +-Infinity; detection has judged the raw value (a sensor fault, with the value
    kept on its alarm)."""
    v = np.asarray(values, np.float64)
    fits = ~(np.abs(v) > F32_MAX)  # NaN fits (it is NaN in float32 too)
    return v if fits.all() else np.where(fits, v, np.nan)


def copy_statement(table: str, names: Sequence[str]) -> str:
    cols = ", ".join(names)
    return f"COPY {table} ({cols}) FROM STDIN (FORMAT BINARY)"


def split_columns(
    types: Mapping[str, str], values: Mapping[str, npt.NDArray[np.generic]]
) -> list[tuple[str, str, npt.NDArray[np.generic]]]:
    """``(name, type, values)`` for every column that has values, in ``types`` order."""
    return [(name, types[name], values[name]) for name in types if name in values]
