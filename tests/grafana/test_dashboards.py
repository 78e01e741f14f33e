"""The dashboards in deploy/grafana: valid Grafana models, provisioning that agrees with the push,
and every panel's SQL run against a real database.

No Grafana server is installable on these machines. So the SQL is expanded the way Grafana's
PostgreSQL datasource expands it (tests/grafana/grafana_sql.py, which fails on any macro or
variable it does not know) and run on PostgreSQL against a database filled by a fast-forwarded
day of the demo building through the real ingest path (tests/grafana/fill.py). Every query must
return rows, with the columns its panel uses (tests/grafana/panels.py says where they come
from), with every variable on "All" and again with one value each.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml  # type: ignore[import-untyped]

from gasguard.grafana import (
    DATASOURCE_NAME,
    DATASOURCE_TYPE,
    DATASOURCE_UID,
    FOLDER_TITLE,
    FOLDER_UID,
    JSON_DATA,
)
from tests.conftest import ROOT
from tests.grafana.fill import Filled
from tests.grafana.grafana_sql import Expander, TimeRange, Variable
from tests.grafana.panels import dashboards, load, panels, queries, run_dashboard

PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
DS_REF = {"type": DATASOURCE_TYPE, "uid": DATASOURCE_UID}
PANEL_TYPES = {"row", "stat", "timeseries", "table", "barchart"}
IDS = [p.stem for p in dashboards()]


# ---------------------------------------------------------------- the models


def test_the_five_dashboards_of_issue_6_are_there() -> None:
    assert {load(p)["uid"] for p in dashboards()} == {
        "gasguard-fleet", "gasguard-household", "gasguard-hotline", "gasguard-consumption",
        "gasguard-ingest",
    }  # fmt: skip


@pytest.mark.parametrize("path", dashboards(), ids=IDS)
def test_a_dashboard_is_a_grafana_model(path: Path) -> None:
    model = load(path)
    assert model["id"] is None and model["uid"].startswith("gasguard-")
    assert model["schemaVersion"] == 39 and "gasguard" in model["tags"]
    ids: set[int] = set()
    cells: set[tuple[int, int]] = set()  # grid cells taken: panels must not overlap
    for panel in panels(model):
        where = f"{path.name}: {panel.get('title')}"
        assert panel["type"] in PANEL_TYPES, where
        assert panel["id"] not in ids, f"{where}: duplicate panel id"
        ids.add(panel["id"])
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["y"] >= 0 and g["h"] > 0, where
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not mine & cells, f"{where}: overlaps another panel"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DS_REF, where
        assert panel["targets"], f"{where}: no query"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(set(refs)) == len(refs), f"{where}: duplicate refId"
        for t in panel["targets"]:
            assert t["datasource"] == DS_REF and t["rawQuery"] and t["editorMode"] == "code"
            assert t["format"] in ("time_series", "table"), where
            assert (t["format"] == "time_series") == (panel["type"] == "timeseries"), where
    for variable in model["templating"]["list"]:
        assert variable["type"] in ("query", "custom"), variable["name"]
        if variable["type"] == "query":
            assert variable["datasource"] == DS_REF
    for annotation in model["annotations"]["list"]:
        if not annotation.get("builtIn"):
            assert annotation["datasource"] == DS_REF
            assert annotation["target"]["format"] == "table"


def test_the_household_dashboard_annotates_alarms() -> None:
    model = load(next(p for p in dashboards() if p.stem == "household"))
    names = {a["name"] for a in model["annotations"]["list"]}
    assert "Alarms" in names
    alarms = next(a for a in model["annotations"]["list"] if a["name"] == "Alarms")
    assert "FROM alarms" in alarms["target"]["rawSql"]


def test_provisioning_describes_what_the_push_writes() -> None:
    datasources = yaml.safe_load((PROVISIONING / "datasources" / "gasguard.yaml").read_text())
    (ds,) = datasources["datasources"]
    assert (ds["uid"], ds["name"], ds["type"]) == (DATASOURCE_UID, DATASOURCE_NAME, DATASOURCE_TYPE)
    assert {k: ds["jsonData"][k] for k in JSON_DATA} == JSON_DATA
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "gasguard.yaml").read_text())
    (provider,) = providers["providers"]
    assert (provider["folderUid"], provider["folder"]) == (FOLDER_UID, FOLDER_TITLE)
    assert provider["type"] == "file" and provider["options"]["path"]


@pytest.mark.parametrize("path", dashboards(), ids=IDS)
def test_every_query_expands(path: Path) -> None:
    """Without a database: each query and variable uses only macros and variables Grafana
    knows (a fast check; the run below checks what PostgreSQL makes of them)."""
    model = load(path)
    fake = {v["name"]: Variable(v["name"], ("x",), multi=True) for v in model["templating"]["list"]}
    expander = Expander(TimeRange(*_some_day()), fake)
    for query in queries(path):
        expander.expand(query.sql)
    for variable in model["templating"]["list"]:
        if variable["type"] == "query":
            expander.expand(variable["query"])


def _some_day() -> tuple[Any, Any]:
    from datetime import UTC, datetime

    end = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    return end - timedelta(days=1), end


# ---------------------------------------------------------------- the SQL, run


@pytest.mark.integration
@pytest.mark.parametrize("everything", [True, False], ids=["all", "one"])
@pytest.mark.parametrize("path", dashboards(), ids=IDS)
def test_every_panel_query_returns_its_columns(
    filled_database: Filled, path: Path, everything: bool
) -> None:
    time = TimeRange(filled_database.start, filled_database.end)
    with psycopg.connect(filled_database.url, autocommit=True) as conn:
        failures = run_dashboard(conn, path, time, everything, need_rows=everything)
    assert not failures, f"{path.name}:\n" + "\n".join(failures)
