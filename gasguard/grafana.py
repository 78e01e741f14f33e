"""``gasguard grafana push``: GasGuard's datasource, folder and dashboards into a running Grafana
through its HTTP API (with the grafana-client library), idempotently.

Each item is read first and compared with what GasGuard ships: only what differs is written,
and every item is reported as created, updated or unchanged (``--dry-run`` reports the same
and writes nothing). The datasource and dashboards keep fixed uids, so the push and Grafana's
file provisioning (``deploy/grafana/provisioning``) describe the same objects.

Grafana never returns a stored password, so a changed database password alone is not seen:
``--rotate-password`` sends it anyway. grafana-client is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

DATASOURCE_UID = "gasguard-pg"
DATASOURCE_NAME = "GasGuard PostgreSQL"
DATASOURCE_TYPE = "grafana-postgresql-datasource"
FOLDER_UID = "gasguard"
FOLDER_TITLE = "GasGuard"
# The same settings as deploy/grafana/provisioning/datasources/gasguard.yaml. timescaledb stays
# off on TimescaleDB too: on, Grafana turns $__timeGroup into time_bucket(), which stock
# PostgreSQL lacks, and the dashboards' SQL is written for both.
JSON_DATA: dict[str, Any] = {
    "postgresVersion": 1500,
    "timescaledb": False,
    "timeInterval": "1m",
    "maxOpenConns": 10,
    "maxIdleConns": 10,
    "connMaxLifetime": 14400,
}
DASHBOARDS = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "dashboards"
TOKEN_ENV = "GASGUARD_GRAFANA_TOKEN"
MESSAGE = "gasguard grafana push"
_SHOWN_CHANGES = 6


class GrafanaPushError(ValueError):
    """The push cannot go on; the message is one line a user can act on."""


@dataclass(frozen=True)
class Datasource:
    model: dict[str, Any]  # what Grafana stores and returns, secrets left out
    password: str | None


@dataclass(frozen=True)
class Outcome:
    kind: str  # datasource, folder or dashboard
    uid: str
    title: str
    action: str  # created, updated or unchanged
    changes: tuple[str, ...] = ()

    def line(self, dry_run: bool) -> str:
        action = self.action
        if dry_run and action != "unchanged":
            action = f"would be {action}"
        shown = ", ".join(self.changes[:_SHOWN_CHANGES])
        if len(self.changes) > _SHOWN_CHANGES:
            shown += f" and {len(self.changes) - _SHOWN_CHANGES} more"
        return f'{self.kind} {self.uid} "{self.title}": {action}' + (f" ({shown})" if shown else "")


def datasource_from_url(db_url: str) -> Datasource:
    """The datasource for a database URL ``postgresql://user:password@host:port/db?sslmode=``."""
    parts = urlsplit(db_url)
    if parts.scheme not in ("postgres", "postgresql") or not parts.path.strip("/"):
        raise GrafanaPushError(
            f"--db-url must look like postgresql://user:password@host:5432/dbname, got "
            f"{parts.scheme or '(no scheme)'}://{parts.hostname or ''}{parts.path}"
        )
    database = unquote(parts.path.strip("/"))
    sslmode = parse_qs(parts.query).get("sslmode", ["disable"])[0]
    model = {
        "uid": DATASOURCE_UID,
        "name": DATASOURCE_NAME,
        "type": DATASOURCE_TYPE,
        "access": "proxy",
        "url": f"{parts.hostname or 'localhost'}:{parts.port or 5432}",
        "user": unquote(parts.username or ""),
        "database": database,  # where Grafana before 10 reads it
        "basicAuth": False,
        "jsonData": {"database": database, "sslmode": sslmode, **JSON_DATA},
    }
    return Datasource(model, unquote(parts.password) if parts.password else None)


def load_dashboards(folder: Path) -> list[dict[str, Any]]:
    files = sorted(folder.glob("*.json"))
    if not files:
        raise GrafanaPushError(f"no dashboards (*.json) in {folder}: pass --dashboards DIR")
    out = []
    for path in files:
        try:
            model = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise GrafanaPushError(f"{path}: not a readable JSON dashboard: {exc}") from None
        if not isinstance(model, dict) or not model.get("uid") or not model.get("title"):
            raise GrafanaPushError(f"{path}: a dashboard needs a fixed uid and a title")
        out.append(model)
    return out


def differences(old: Any, new: Any, path: str = "") -> list[str]:
    """Where ``new`` differs from ``old``, as paths (list items named by their title)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += differences(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        out = []
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            name = b.get("title") if isinstance(b, dict) else None
            out += differences(a, b, f"{path}[{json.dumps(name) if name else i}]")
        return out
    return [] if old == new else [path or "(everything)"]


def _comparable(dashboard: dict[str, Any]) -> dict[str, Any]:
    """A dashboard without what Grafana assigns itself (its numeric id and version)."""
    return {k: v for k, v in dashboard.items() if k not in ("id", "version")}


class Pusher:
    """Reads each item, compares, writes only what differs (nothing on a dry run)."""

    def __init__(self, api: Any, dry_run: bool) -> None:
        self.api = api
        self.dry_run = dry_run
        self.writes = 0

    def _get(self, read: Any, uid: str) -> Any:
        from grafana_client.client import GrafanaClientError

        try:
            return read(uid)
        except GrafanaClientError as exc:
            if exc.status_code == 404:
                return None
            raise

    def _write(self, write: Any, *args: Any, **kwargs: Any) -> None:
        if not self.dry_run:
            write(*args, **kwargs)
            self.writes += 1

    def datasource(self, wanted: Datasource, rotate_password: bool = False) -> Outcome:
        ds = self.api.datasource
        model = wanted.model
        current = self._get(ds.get_datasource_by_uid, DATASOURCE_UID)
        secret = {"secureJsonData": {"password": wanted.password}} if wanted.password else {}
        if current is None:
            self._write(ds.create_datasource, {**model, **secret})
            return Outcome("datasource", DATASOURCE_UID, model["name"], "created")
        changes = [
            f"jsonData.{k}" for k, v in model["jsonData"].items()
            if (current.get("jsonData") or {}).get(k) != v
        ] + [k for k, v in model.items() if k != "jsonData" and current.get(k) != v]  # fmt: skip
        has_password = bool((current.get("secureJsonFields") or {}).get("password"))
        if wanted.password and (rotate_password or not has_password):
            changes.append("password")
        if not changes:
            return Outcome("datasource", DATASOURCE_UID, model["name"], "unchanged")
        body = {**model, **(secret if "password" in changes else {})}
        self._write(ds.update_datasource_by_uid, DATASOURCE_UID, body)
        return Outcome("datasource", DATASOURCE_UID, model["name"], "updated", tuple(changes))

    def folder(self, uid: str, title: str) -> Outcome:
        current = self._get(self.api.folder.get_folder, uid)
        if current is None:
            self._write(self.api.folder.create_folder, title, uid=uid)
            return Outcome("folder", uid, title, "created")
        if current.get("title") == title:
            return Outcome("folder", uid, title, "unchanged")
        self._write(self.api.folder.update_folder, uid, title=title, overwrite=True)
        return Outcome("folder", uid, title, "updated", ("title",))

    def dashboard(self, model: dict[str, Any], folder_uid: str) -> Outcome:
        uid, title = str(model["uid"]), str(model["title"])
        current = self._get(self.api.dashboard.get_dashboard, uid)
        wanted = _comparable(model)
        if current is None:
            action, changes = "created", []
        else:
            action = "updated"
            changes = differences(_comparable(current.get("dashboard") or {}), wanted)
            if (current.get("meta") or {}).get("folderUid") != folder_uid:
                changes.append("folder")
            if not changes:
                return Outcome("dashboard", uid, title, "unchanged")
        body = {
            "dashboard": {**wanted, "id": None},
            "folderUid": folder_uid,
            "overwrite": True,
            "message": MESSAGE,
        }
        self._write(self.api.dashboard.update_dashboard, body)
        return Outcome("dashboard", uid, title, action, tuple(changes))


@contextlib.contextmanager
def _explained(url: str) -> Iterator[None]:
    """Grafana's refusals and network failures as one line naming the cause."""
    from grafana_client.client import GrafanaClientError, GrafanaException, GrafanaTimeoutError

    try:
        yield
    except GrafanaTimeoutError:
        raise GrafanaPushError(f"Grafana at {url} did not answer in time") from None
    except GrafanaClientError as exc:
        if exc.status_code == 401:
            raise GrafanaPushError(
                f"Grafana at {url} refused the token (401 Unauthorized): check --token or "
                f"${TOKEN_ENV}"
            ) from None
        if exc.status_code == 403:
            raise GrafanaPushError(
                f"Grafana at {url} refused the request (403 Forbidden): the token's service "
                "account needs the Admin role to write datasources"
            ) from None
        raise GrafanaPushError(f"Grafana at {url}: {_one_line(exc.message)}") from None
    except GrafanaException as exc:
        raise GrafanaPushError(f"Grafana at {url}: {_one_line(exc.message)}") from None
    except OSError as exc:  # niquests' connection errors are OSErrors
        raise GrafanaPushError(f"cannot reach Grafana at {url}: {_one_line(str(exc))}") from None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:300]


def push(
    url: str,
    token: str,
    *,
    db_url: str,
    folder: str = FOLDER_TITLE,
    dashboards: Path = DASHBOARDS,
    dry_run: bool = False,
    rotate_password: bool = False,
    api: Any = None,
) -> list[Outcome]:
    """Create or update the datasource, the folder and every dashboard; the outcome of each."""
    datasource = datasource_from_url(db_url)
    models = load_dashboards(dashboards)
    if api is None:
        from grafana_client.api import GrafanaApi

        factory: Any = GrafanaApi.from_url  # grafana-client's API carries no type hints
        api = factory(url, credential=token, timeout=15.0)
    pusher = Pusher(api, dry_run)
    with _explained(url):
        outcomes = [
            pusher.datasource(datasource, rotate_password),
            pusher.folder(FOLDER_UID, folder),
        ]
        outcomes += [pusher.dashboard(model, FOLDER_UID) for model in models]
    return outcomes


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    grafana = commands.add_parser("grafana", help="GasGuard's dashboards in Grafana")
    sub = grafana.add_subparsers(dest="grafana_command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "push",
        help="create or update the datasource and dashboards through Grafana's HTTP API",
        description="Creates or updates GasGuard's datasource, folder and dashboards; only what "
        "differs from what Grafana holds is written, and each item is reported as created, "
        "updated or unchanged.",
    )
    p.add_argument("--url", required=True, help="Grafana's address, e.g. http://grafana:3000")
    p.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV),
        help=f"a service account token (Admin role); default ${TOKEN_ENV}",
    )
    p.add_argument(
        "--db-url",
        help="the database as Grafana reaches it, postgresql://user:password@host:5432/db"
        "?sslmode=disable (default: GASGUARD_DATABASE_URL); a read-only role is enough",
    )
    p.add_argument("--folder", default=FOLDER_TITLE, help="title of the dashboards' folder")
    p.add_argument("--dashboards", type=Path, default=DASHBOARDS, help="folder of *.json")
    p.add_argument("--dry-run", action="store_true", help="show what would change, write nothing")
    p.add_argument(
        "--rotate-password",
        action="store_true",
        help="send the database password even when Grafana already holds one",
    )
    p.set_defaults(handler=_push)


def _push(args: argparse.Namespace) -> int:
    if not args.token:
        raise GrafanaPushError(f"no Grafana token: pass --token or set ${TOKEN_ENV}")
    db_url = args.db_url
    if db_url is None:
        from gasguard.settings import CommonSettings

        db_url = CommonSettings().database_url
    outcomes = push(
        args.url,
        args.token,
        db_url=db_url,
        folder=args.folder,
        dashboards=args.dashboards,
        dry_run=args.dry_run,
        rotate_password=args.rotate_password,
    )
    for outcome in outcomes:
        print(outcome.line(args.dry_run))
    words = {"created": "to create", "updated": "to update"} if args.dry_run else {}
    counts = {a: sum(o.action == a for o in outcomes) for a in ("created", "updated", "unchanged")}
    summary = ", ".join(f"{n} {words.get(a, a)}" for a, n in counts.items() if n)
    print(f"dry run, nothing written: {summary}" if args.dry_run else summary)
    return 0
