"""Walking a dashboard model: its queries, what each must return, and its variables' choices.

What a query must return is read from the panel, where Grafana itself uses it:

- ``time_series`` format: a ``time`` column (a timestamp, or epoch seconds from
  ``$__timeGroup``) in ascending order, and at least one numeric column; text columns become
  series labels;
- a table or bar chart: exactly the columns its ``organize`` transformation orders and names;
- a stat panel: the numeric column its ``reduceOptions.fields`` picks (``/^name$/``);
- an annotation: ``time`` and ``text``, optionally ``timeend`` and ``tags``;
- a variable: one column, or ``__text`` and ``__value``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from gasguard.grafana import DASHBOARDS, JSON_DATA
from tests.grafana.grafana_sql import Expander, TimeRange, Variable, calculate_interval

# ALL: every multi-value or "All" variable on All; ONE: one value each. A variable without
# "All" takes its preferred value: the household with the demo scenario's gas leak.
PREFERRED = {"household": "H-0003", "district": "district-1", "consumer": "0/1"}
NUMERIC = {"int2", "int4", "int8", "float4", "float8", "numeric"}
TIME = {"timestamptz", "timestamp", "date"}
ANNOTATION_COLUMNS = {"time", "text", "timeend", "tags"}


@dataclass(frozen=True)
class Query:
    dashboard: str
    where: str  # panel title, annotation or variable name
    sql: str
    kind: str  # time_series, table, stat, annotation
    columns: tuple[str, ...] = ()  # for tables and stats
    min_interval: str | None = None


def dashboards() -> list[Path]:
    return sorted(DASHBOARDS.glob("*.json"))


def load(path: Path) -> dict[str, Any]:
    model: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return model


def panels(model: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in model["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row holds its panels


def expected_columns(panel: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
    """(kind, columns) of a panel's table-format query."""
    if panel["type"] in ("table", "barchart"):
        organize = [t for t in panel.get("transformations", []) if t["id"] == "organize"]
        assert organize, f"{panel['title']}: name the columns with an organize transformation"
        return "table", tuple(organize[0]["options"]["indexByName"])
    if panel["type"] == "stat":
        fields = panel["options"]["reduceOptions"].get("fields", "")
        m = re.fullmatch(r"/\^(\w+)\$/", fields)
        assert m, f"{panel['title']}: pick the stat's column with fields = /^name$/"
        return "stat", (m.group(1),)
    raise AssertionError(f"{panel['title']}: no rule for a {panel['type']} panel in table format")


def queries(path: Path) -> Iterator[Query]:
    model = load(path)
    name = path.stem
    for panel in panels(model):
        for target in panel.get("targets", []):
            columns: tuple[str, ...] = ()
            if target["format"] == "time_series":
                kind = "time_series"
            else:
                kind, columns = expected_columns(panel)
            where = f"{panel['title']} [{target['refId']}]"
            yield Query(name, where, target["rawSql"], kind, columns, panel.get("interval"))
    for annotation in model["annotations"]["list"]:
        if not annotation.get("builtIn"):
            yield Query(name, f"annotation {annotation['name']}", annotation["target"]["rawSql"],
                        "annotation")  # fmt: skip


def choose(variable: dict[str, Any], options: list[tuple[str, str]], everything: bool) -> Variable:
    """The chosen value(s) of a variable among its (text, value) options."""
    assert options, f"variable {variable['name']} has no options"
    multi, include_all = bool(variable.get("multi")), bool(variable.get("includeAll"))
    if include_all and everything:
        return Variable(
            variable["name"],
            tuple(v for _, v in options),
            tuple(t for t, _ in options),
            multi=multi,
            include_all=True,
            all_selected=True,
            all_value=variable.get("allValue") or None,
        )
    values = [v for _, v in options]
    value = PREFERRED.get(variable["name"], values[0])
    if value not in values:
        value = values[0]
    text = dict((v, t) for t, v in options)[value]
    return Variable(variable["name"], (value,), (text,), multi=multi, include_all=include_all)


def custom_options(variable: dict[str, Any]) -> list[tuple[str, str]]:
    """A custom variable's options: its query, comma-separated (``text : value`` allowed)."""
    out = []
    for part in re.split(r"(?<!\\),", variable["query"]):
        text, _, value = part.strip().partition(" : ")
        out.append((text, value or text))
    return out


# ---------------------------------------------------------------- running them


def run_dashboard(
    conn: psycopg.Connection[Any], path: Path, time: TimeRange, everything: bool, need_rows: bool
) -> list[str]:
    """Expand and run every query of a dashboard; what is wrong with each, if anything."""
    conn.execute("SET statement_timeout = '20s'")
    variables = resolve_variables(conn, load(path), time, everything)
    failures = []
    for query in queries(path):
        minimum = query.min_interval or JSON_DATA["timeInterval"]
        interval = calculate_interval(time.start, time.end, minimum)
        expander = Expander(TimeRange(time.start, time.end, interval), variables)
        problem = check(conn, query, expander.expand(query.sql), need_rows)
        if problem:
            failures.append(f"{query.where}: {problem}")
    return failures


def resolve_variables(
    conn: psycopg.Connection[Any], model: dict[str, Any], time: TimeRange, everything: bool
) -> dict[str, Variable]:
    """Each variable's options from its own query (with the variables before it chosen)."""
    chosen: dict[str, Variable] = {}
    for variable in model["templating"]["list"]:
        if variable["type"] == "custom":
            options = custom_options(variable)
        else:
            cur = conn.execute(Expander(time, chosen).expand(variable["query"]).encode())
            names = [c.name for c in cur.description or []]
            rows = cur.fetchall()
            assert len(names) == 1 or set(names) == {"__text", "__value"}, (variable["name"], names)
            if len(names) == 1:
                options = [(str(r[0]), str(r[0])) for r in rows]
            else:
                text, value = names.index("__text"), names.index("__value")
                options = [(str(r[text]), str(r[value])) for r in rows]
        chosen[variable["name"]] = choose(variable, options, everything)
    return chosen


def check(conn: psycopg.Connection[Any], query: Query, sql: str, need_rows: bool) -> str | None:
    """What is wrong with a query's result for its panel, or None."""
    try:
        cur = conn.execute(sql.encode())
    except psycopg.Error as exc:
        return f"{type(exc).__name__}: {str(exc).strip()}\n{sql}"
    rows = cur.fetchall()
    types = {c.name: _type_name(conn, c.type_code) for c in cur.description or []}
    if need_rows and not rows:
        return "no rows"
    if query.kind == "time_series":
        if types.get("time") not in TIME | NUMERIC:
            return f"no time column (columns {types})"
        if not [n for n, t in types.items() if n != "time" and t in NUMERIC]:
            return f"no numeric value column (columns {types})"
        times = [r[list(types).index("time")] for r in rows]
        if times != sorted(times):
            return "rows not in time order (ORDER BY the time column)"
    elif query.kind == "annotation":
        if not {"time", "text"} <= set(types) or not set(types) <= ANNOTATION_COLUMNS:
            return f"annotation columns {sorted(types)}, expected time, text[, timeend, tags]"
    elif query.kind == "stat":
        if types.get(query.columns[0]) not in NUMERIC:
            return f"stat column {query.columns[0]!r} missing or not numeric ({types})"
    elif sorted(types) != sorted(query.columns):
        return f"columns {list(types)}, the panel shows {list(query.columns)}"
    return None


def _type_name(conn: psycopg.Connection[Any], oid: int) -> str:
    info = conn.adapters.types.get(oid)
    return info.name if info else str(oid)
