"""``gasguard grafana push`` against a fake Grafana.

No Grafana server is installable on these machines, so the push runs through grafana-client and
real HTTP against ``fake_grafana.FakeGrafana``: a server on 127.0.0.1 with just the endpoints the
push calls, which records every request. What a real Grafana would make of the dashboards' SQL is
checked separately (test_dashboards.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from gasguard.grafana import (
    DASHBOARDS,
    DATASOURCE_UID,
    FOLDER_UID,
    TOKEN_ENV,
    GrafanaPushError,
    push,
    register,
)
from tests.grafana.fake_grafana import FakeGrafana

TOKEN = "glsa_test_token"
DB_URL = "postgresql://grafana:s3cret@db:5432/gasguard?sslmode=disable"
UIDS = sorted(json.loads(p.read_text())["uid"] for p in DASHBOARDS.glob("*.json"))


@pytest.fixture
def grafana() -> Iterator[FakeGrafana]:
    server = FakeGrafana(TOKEN)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def dashboards(tmp_path: Path) -> Path:
    """A copy of the shipped dashboards that a test may change."""
    return Path(shutil.copytree(DASHBOARDS, tmp_path / "dashboards"))


def actions(outcomes: list) -> dict[str, str]:  # type: ignore[type-arg]
    return {o.uid: o.action for o in outcomes}


def run_cli(argv: list[str]) -> int:
    """The way ``gasguard`` runs a subcommand (gasguard/cli.py prints a ValueError as one line)."""
    parser = argparse.ArgumentParser(prog="gasguard")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.handler(args))


def test_first_push_creates_everything_and_a_second_writes_nothing(
    grafana: FakeGrafana, dashboards: Path
) -> None:
    first = push(grafana.url, TOKEN, db_url=DB_URL, dashboards=dashboards)
    assert actions(first) == {DATASOURCE_UID: "created", FOLDER_UID: "created"} | {
        uid: "created" for uid in UIDS
    }
    state = grafana.state
    ds = state.datasources[DATASOURCE_UID]
    assert (ds["type"], ds["url"], ds["user"], ds["jsonData"]["database"]) == (
        "grafana-postgresql-datasource", "db:5432", "grafana", "gasguard",
    )  # fmt: skip
    assert ds["secureJsonData"] == {"password": "s3cret"}
    assert ds["jsonData"]["timescaledb"] is False
    assert sorted(state.dashboards) == UIDS
    assert {d["folderUid"] for d in state.dashboards.values()} == {FOLDER_UID}
    assert state.folders[FOLDER_UID]["title"] == "GasGuard"
    writes = len(grafana.writes)
    assert writes == 2 + len(UIDS)

    second = push(grafana.url, TOKEN, db_url=DB_URL, dashboards=dashboards)
    assert set(actions(second).values()) == {"unchanged"}
    assert len(grafana.writes) == writes, "an unchanged push must write nothing"


def test_a_changed_dashboard_is_updated_alone(grafana: FakeGrafana, dashboards: Path) -> None:
    push(grafana.url, TOKEN, db_url=DB_URL, dashboards=dashboards)
    path = dashboards / "fleet-overview.json"
    model = json.loads(path.read_text())
    model["panels"][0]["title"] = "Registered devices"
    path.write_text(json.dumps(model))
    before = len(grafana.writes)

    outcomes = push(grafana.url, TOKEN, db_url=DB_URL, dashboards=dashboards)
    changed = [o for o in outcomes if o.action != "unchanged"]
    assert [(o.uid, o.action) for o in changed] == [("gasguard-fleet", "updated")]
    assert changed[0].changes == ('panels["Registered devices"].title',)
    assert [(w.method, w.path) for w in grafana.writes[before:]] == [("POST", "/api/dashboards/db")]
    stored = grafana.state.dashboards["gasguard-fleet"]
    assert stored["dashboard"]["panels"][0]["title"] == "Registered devices"
    assert stored["version"] == 2


def test_dry_run_prints_what_would_change_and_writes_nothing(
    grafana: FakeGrafana, dashboards: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["grafana", "push", "--url", grafana.url, "--token", TOKEN, "--db-url", DB_URL,
            "--dashboards", str(dashboards)]  # fmt: skip
    assert run_cli([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert f'datasource {DATASOURCE_UID} "GasGuard PostgreSQL": would be created' in out
    assert out[-1] == f"dry run, nothing written: {2 + len(UIDS)} to create"
    assert grafana.writes == []

    assert run_cli(argv) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"{2 + len(UIDS)} created"
    writes = len(grafana.writes)
    path = dashboards / "consumption.json"
    path.write_text(path.read_text().replace('"refresh": "5m"', '"refresh": "15m"'))
    assert run_cli([*argv, "--dry-run", "--folder", "Gas safety"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert f'folder {FOLDER_UID} "Gas safety": would be updated (title)' in out
    assert (
        'dashboard gasguard-consumption "GasGuard · Consumption": would be updated (refresh)' in out
    )
    assert out[-1] == f"dry run, nothing written: 2 to update, {len(UIDS)} unchanged"
    assert len(grafana.writes) == writes


def test_a_changed_database_updates_the_datasource_and_keeps_its_password(
    grafana: FakeGrafana, dashboards: Path
) -> None:
    push(grafana.url, TOKEN, db_url=DB_URL, dashboards=dashboards)
    moved = "postgresql://grafana:s3cret@db2:5433/gasguard?sslmode=require"
    outcome = push(grafana.url, TOKEN, db_url=moved, dashboards=dashboards)[0]
    assert (outcome.action, set(outcome.changes)) == ("updated", {"url", "jsonData.sslmode"})
    update = grafana.writes[-1]
    assert (update.method, update.path) == ("PUT", f"/api/datasources/uid/{DATASOURCE_UID}")
    assert "secureJsonData" not in update.body, "a password Grafana holds is not re-sent"
    assert grafana.state.datasources[DATASOURCE_UID]["secureJsonData"] == {"password": "s3cret"}

    rotated = moved.replace("s3cret", "n3w")
    assert push(grafana.url, TOKEN, db_url=rotated, dashboards=dashboards)[0].action == "unchanged"
    outcomes = push(grafana.url, TOKEN, db_url=rotated, dashboards=dashboards, rotate_password=True)
    outcome = outcomes[0]
    assert (outcome.action, outcome.changes) == ("updated", ("password",))
    assert grafana.state.datasources[DATASOURCE_UID]["secureJsonData"] == {"password": "n3w"}


def test_a_dashboard_moved_to_another_folder_is_moved_back(
    grafana: FakeGrafana, dashboards: Path
) -> None:
    push(grafana.url, TOKEN, db_url=DB_URL, dashboards=dashboards)
    grafana.state.folders["elsewhere"] = {"id": 99, "uid": "elsewhere", "title": "x", "version": 1}
    grafana.state.dashboards["gasguard-ingest"]["folderUid"] = "elsewhere"
    outcomes = push(grafana.url, TOKEN, db_url=DB_URL, dashboards=dashboards)
    assert [(o.uid, o.changes) for o in outcomes if o.action == "updated"] == [
        ("gasguard-ingest", ("folder",))
    ]
    assert grafana.state.dashboards["gasguard-ingest"]["folderUid"] == FOLDER_UID


def test_a_refused_token_is_one_clear_line(grafana: FakeGrafana, dashboards: Path) -> None:
    argv = ["grafana", "push", "--url", grafana.url, "--token", "wrong", "--db-url", DB_URL,
            "--dashboards", str(dashboards)]  # fmt: skip
    with pytest.raises(GrafanaPushError) as caught:
        run_cli(argv)
    message = str(caught.value)
    assert "\n" not in message
    assert message == (
        f"Grafana at {grafana.url} refused the token (401 Unauthorized): check --token or "
        f"${TOKEN_ENV}"
    )
    assert grafana.writes == []


def test_the_token_comes_from_the_environment_and_is_required(
    grafana: FakeGrafana, dashboards: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["grafana", "push", "--url", grafana.url, "--db-url", DB_URL,
            "--dashboards", str(dashboards)]  # fmt: skip
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(GrafanaPushError, match=f"pass --token or set \\${TOKEN_ENV}"):
        run_cli(argv)
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    assert run_cli(argv) == 0
    assert sorted(grafana.state.dashboards) == UIDS


def test_unreachable_grafana_and_bad_input_are_one_line(dashboards: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once closed
    with pytest.raises(GrafanaPushError, match=f"^cannot reach Grafana at {url}: ") as caught:
        push(url, TOKEN, db_url=DB_URL, dashboards=dashboards)
    assert "\n" not in str(caught.value)
    with pytest.raises(GrafanaPushError, match="--db-url must look like postgresql://"):
        push(url, TOKEN, db_url="mysql://db/x", dashboards=dashboards)
    with pytest.raises(GrafanaPushError, match="no dashboards"):
        push(url, TOKEN, db_url=DB_URL, dashboards=dashboards / "missing")
