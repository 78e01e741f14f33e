"""A panel's SQL as Grafana hands it to PostgreSQL, so that the dashboards can be run without
Grafana (none is installable on these machines).

Grafana turns a panel's ``rawSql`` into the statement it runs in three steps, done here in the
same order with the same output:

1. The browser interpolates template variables (``TemplateSrv`` with the SQL datasources'
   ``interpolateVariable``):

   - ``$name`` / ``${name}``: a variable that is multi-valued or offers "All" gives each value
     as a SQL string literal (``'a'``, a quote inside doubled), joined by commas, ready for
     ``IN (...)``; any other variable gives its value as it is, with quotes doubled.
   - ``${name:sqlstring}`` quotes like that for any variable (so it is written *without*
     quotes around it: ``= ${household:sqlstring}``); ``${name:singlequote}`` gives ``'v'``
     with ``\\'`` inside; ``doublequote``, ``csv``, ``raw``, ``pipe`` and ``text`` as Grafana's
     format registry does. Any other format fails.
   - "All" is every option the variable's query returned (or the variable's ``allValue``,
     unquoted, when it has one).
   - Built-in variables: ``$__interval`` (e.g. ``2m``), ``$__interval_ms``, ``$__from`` and
     ``$__to`` (epoch ms), ``$__range_s``, ``$__range_ms``.

2. The backend (``sqleng.Interpolate``): ``$__interval_ms``, ``$__interval``,
   ``$__unixEpochFrom()``, ``$__unixEpochTo()``.

3. The PostgreSQL macro engine. A macro is matched by ``\\$([_a-zA-Z0-9]+)\\(([^\\)]*)\\)``,
   exactly as Grafana does, so a macro's arguments cannot contain a parenthesis; they are
   split on commas and trimmed. From and to are UTC RFC 3339 with nanosecond precision and no
   trailing zeros (Go's ``time.RFC3339Nano``: ``2026-01-01T00:00:00Z``, ``...:05.25Z``)::

       $__time(c)                 c AS "time"
       $__timeEpoch(c)            extract(epoch from c) as "time"
       $__timeFilter(c)           c BETWEEN '<from>' AND '<to>'
       $__timeFrom()              '<from>'
       $__timeTo()                '<to>'
       $__timeGroup(c, 5m[, f])   floor(extract(epoch from c)/300)*300
       $__timeGroupAlias(...)     the same, then AS "time"
       $__unixEpochFilter(c)      c >= <from s> AND c <= <to s>
       $__unixEpochFrom()         <from s>          $__unixEpochTo()   <to s>
       $__unixEpochGroup(c, 5m)   floor((c)/300)*300   (...Alias: then AS "time")

   ``$__timeGroup`` gives epoch seconds, which Grafana turns into the time column; with the
   datasource's ``timescaledb`` option on it would give ``time_bucket(...)`` instead, which
   stock PostgreSQL lacks, so GasGuard's datasource keeps it off. The number of seconds is
   printed as Go's ``%v`` prints a float (``300``, ``0.5``, ``1e+06``). The interval accepts
   Go durations and Grafana's ``d``, ``w``, ``M``, ``y``. Any other macro fails, as in Grafana
   ("undefined macro").

4. Then anything left that looks like ``$name``, ``${...}`` or ``[[name]]`` fails: a panel must
   not use something this helper does not know.

``$__interval`` is what Grafana's ``calculateInterval`` gives: the range divided by the
panel's data points (``maxDataPoints``, the panel width in pixels in a browser: 1000 here),
rounded by ``roundInterval``'s table, and not below the panel's ``interval`` or else the
datasource's ``timeInterval``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal


class ExpansionError(ValueError):
    """The query uses a macro, variable or format that Grafana (or this helper) lacks."""


@dataclass(frozen=True)
class Variable:
    """A template variable's chosen value(s). ``values`` holds every option for "All"."""

    name: str
    values: tuple[str, ...]
    texts: tuple[str, ...] = ()
    multi: bool = False
    include_all: bool = False
    all_selected: bool = False
    all_value: str | None = None


@dataclass(frozen=True)
class TimeRange:
    start: datetime
    end: datetime
    interval_ms: int = 60_000

    @property
    def from_ms(self) -> int:
        return int(self.start.timestamp() * 1000)

    @property
    def to_ms(self) -> int:
        return int(self.end.timestamp() * 1000)


@dataclass
class Expander:
    time: TimeRange
    variables: dict[str, Variable] = field(default_factory=dict)

    def expand(self, sql: str) -> str:
        out = self._variables(sql)
        out = self._backend_interpolate(out)
        out = _MACRO.sub(lambda m: self._macro(m.group(1), _args(m.group(2))), out)
        left = _LEFTOVER.search(out)
        if left:
            raise ExpansionError(f"not expanded: {left.group(0)!r} in\n{out}")
        return out

    # ---------------------------------------------------------------- step 1: the browser

    def _variables(self, sql: str) -> str:
        builtin = {
            "__interval": format_interval(self.time.interval_ms),
            "__interval_ms": str(self.time.interval_ms),
            "__from": str(self.time.from_ms),
            "__to": str(self.time.to_ms),
            "__range_ms": str(self.time.to_ms - self.time.from_ms),
            "__range_s": str((self.time.to_ms - self.time.from_ms) // 1000),
        }

        def one(m: re.Match[str]) -> str:
            name = m.group("plain") or m.group("braced")
            fmt = m.group("format")
            if m.group("plain") and sql[m.end() : m.end() + 1] == "(":
                return m.group(0)  # a macro: the backend's
            if name in builtin:
                if fmt:
                    raise ExpansionError(f"format {fmt!r} on built-in ${name}")
                return builtin[name]
            var = self.variables.get(name)
            if var is None:
                raise ExpansionError(f"unknown variable ${name} (not on the dashboard)")
            return format_variable(var, fmt)

        return _VARIABLE.sub(one, sql)

    # ---------------------------------------------------------------- step 2: sqleng

    def _backend_interpolate(self, sql: str) -> str:
        sql = sql.replace("$__interval_ms", str(self.time.interval_ms))
        sql = sql.replace("$__interval", format_interval(self.time.interval_ms))
        sql = sql.replace("$__unixEpochFrom()", str(self.time.from_ms // 1000))
        return sql.replace("$__unixEpochTo()", str(self.time.to_ms // 1000))

    # ---------------------------------------------------------------- step 3: macros

    def _macro(self, name: str, args: list[str]) -> str:
        start, end = rfc3339(self.time.start), rfc3339(self.time.end)

        def need(n: int, what: str) -> None:
            if len(args) < n or not args[0]:
                raise ExpansionError(f"macro ${name} needs {what}")

        match name:
            case "__time":
                need(1, "a time column")
                return f'{args[0]} AS "time"'
            case "__timeEpoch":
                need(1, "a time column")
                return f'extract(epoch from {args[0]}) as "time"'
            case "__timeFilter":
                need(1, "a time column")
                return f"{args[0]} BETWEEN '{start}' AND '{end}'"
            case "__timeFrom":
                return f"'{start}'"
            case "__timeTo":
                return f"'{end}'"
            case "__timeGroup" | "__timeGroupAlias":
                need(2, "a time column and an interval")
                s = go_float(_group_seconds(args))
                alias = ' AS "time"' if name.endswith("Alias") else ""
                return f"floor(extract(epoch from {args[0]})/{s})*{s}{alias}"
            case "__unixEpochFilter":
                need(1, "a time column")
                c, lo, hi = args[0], self.time.from_ms // 1000, self.time.to_ms // 1000
                return f"{c} >= {lo} AND {c} <= {hi}"
            case "__unixEpochGroup" | "__unixEpochGroupAlias":
                need(2, "a time column and an interval")
                s = go_float(_group_seconds(args))
                alias = ' AS "time"' if name.endswith("Alias") else ""
                return f"floor(({args[0]})/{s})*{s}{alias}"
        raise ExpansionError(f"undefined macro: ${name}")


_VARIABLE = re.compile(r"\$(?:(?P<plain>\w+)|\{(?P<braced>\w+)(?::(?P<format>\w+))?\})")
_MACRO = re.compile(r"\$([_a-zA-Z0-9]+)\(([^\)]*)\)")
_LEFTOVER = re.compile(r"\$\w+|\$\{[^}]*\}|\[\[\w+(?::\w+)?\]\]")
_FILL = re.compile(r"^(NULL|previous|[+-]?\d+(\.\d+)?)$", re.IGNORECASE)


def _args(text: str) -> list[str]:
    return [a.strip(" ") for a in text.split(",")]


def _group_seconds(args: list[str]) -> float:
    if len(args) > 3 or (len(args) == 3 and not _FILL.match(args[2])):
        raise ExpansionError(f"bad fill argument in {args}")
    return parse_interval(args[1].strip("'")) / 1000


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


FORMATS: dict[str, Callable[[Variable], str]] = {
    "sqlstring": lambda v: ",".join(_quote(x) for x in v.values),
    "singlequote": lambda v: ",".join("'" + x.replace("'", "\\'") + "'" for x in v.values),
    "doublequote": lambda v: ",".join('"' + x.replace('"', '\\"') + '"' for x in v.values),
    "csv": lambda v: ",".join(v.values),
    "raw": lambda v: ",".join(v.values),
    "pipe": lambda v: "|".join(v.values),
    "text": lambda v: "All" if v.all_selected else " + ".join(v.texts or v.values),
}


def format_variable(var: Variable, fmt: str | None) -> str:
    if var.all_selected and var.all_value is not None:
        return var.all_value
    if fmt is not None:
        if fmt not in FORMATS:
            raise ExpansionError(f"format {fmt!r} of ${{{var.name}}} is not supported here")
        return FORMATS[fmt](var)
    if not var.values:
        raise ExpansionError(f"variable ${var.name} has no value")
    if var.multi or var.include_all:
        return ",".join(_quote(x) for x in var.values)
    if len(var.values) != 1:
        raise ExpansionError(f"single-value variable ${var.name} has {len(var.values)} values")
    return var.values[0].replace("'", "''")


# ---------------------------------------------------------------- times and intervals


def rfc3339(t: datetime) -> str:
    """Go's time.RFC3339Nano in UTC: no fractional part when it is zero, no trailing zeros."""
    t = t.astimezone(UTC)
    text = t.strftime("%Y-%m-%dT%H:%M:%S")
    if t.microsecond:
        text += f".{t.microsecond:06d}".rstrip("0")
    return text + "Z"


_UNIT_MS = {
    "ns": 1e-6,
    "us": 1e-3,
    "µs": 1e-3,
    "ms": 1,
    "s": 1000,
    "m": 60_000,
    "h": 3_600_000,
}
_GRAFANA_UNIT_MS = {"d": 86_400_000, "w": 604_800_000, "M": 2_592_000_000, "y": 31_536_000_000}


def parse_interval(text: str) -> float:
    """gtime.ParseInterval: ``Nd``, ``Nw``, ``NM``, ``Ny`` or a Go duration (``1h30m``)."""
    m = re.fullmatch(r"(\d+)([dwMy])", text)
    if m:
        return int(m.group(1)) * _GRAFANA_UNIT_MS[m.group(2)]
    parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ExpansionError(f"error parsing interval {text!r}")
    return sum(float(n) * _UNIT_MS[u] for n, u in parts)


def go_float(value: float) -> str:
    """A float64 as Go's ``%v`` prints it (strconv ``'g'``, shortest): exponent form when the
    decimal exponent is below -4 or at least 6, so ``300``, ``0.5``, ``604800``, ``1e+06``."""
    d = Decimal(repr(float(value))).normalize()
    sign, digits, exp = d.as_tuple()
    assert isinstance(exp, int)
    x = len(digits) + exp - 1  # the decimal exponent
    if x < -4 or x >= 6:
        mantissa = str(digits[0]) + ("." + "".join(map(str, digits[1:])) if len(digits) > 1 else "")
        return f"{'-' if sign else ''}{mantissa}e{'+' if x >= 0 else '-'}{abs(x):02d}"
    return format(d, "f")


def format_interval(ms: int) -> str:
    """gtime.FormatInterval / the browser's secondsToHms for $__interval: the largest unit."""
    for unit, size in (
        ("y", 31_536_000_000),
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
        ("ms", 1),
    ):
        if ms >= size:
            return f"{ms // size}{unit}"
    return "1ms"


# rangeutil.roundInterval: (upper bound of the raw interval, the interval used), in ms
_ROUND = (
    (10, 1), (15, 10), (35, 20), (75, 50), (150, 100), (350, 200), (750, 500), (1500, 1000),
    (3500, 2000), (7500, 5000), (12500, 10000), (17500, 15000), (25000, 20000), (45000, 30000),
    (90000, 60000), (210000, 120000), (450000, 300000), (750000, 600000), (1050000, 900000),
    (1500000, 1200000), (2700000, 1800000), (5400000, 3600000), (9000000, 7200000),
    (16200000, 10800000), (32400000, 21600000), (86400000, 43200000), (604800000, 86400000),
    (1814400000, 604800000), (3628800000, 2592000000),
)  # fmt: skip


def round_interval(ms: float) -> int:
    for bound, result in _ROUND:
        if ms < bound:
            return result
    return 31_536_000_000


def calculate_interval(
    start: datetime, end: datetime, min_interval: str, max_data_points: int = 1000
) -> int:
    """$__interval_ms for a panel: the rounded range / data points, not below the minimum."""
    raw = (end - start).total_seconds() * 1000 / max_data_points
    return max(round_interval(raw), int(parse_interval(min_interval)))
