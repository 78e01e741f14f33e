"""A stand-in for Grafana's HTTP API: a real HTTP server on 127.0.0.1 with just the endpoints
``gasguard grafana push`` calls, recording every request.

No Grafana server is installable on these machines (no package, no Docker), so this is the only
way to test the push end to end through grafana-client and real HTTP. It follows Grafana's
documented behaviour for these endpoints (bearer-token auth, 404 for what does not exist, a
datasource's secrets kept on update and never returned, dashboards stored as sent with their
id and version added, 412 on a version conflict without ``overwrite``), not Grafana's code.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Request:
    method: str
    path: str
    body: Any


@dataclass
class State:
    token: str
    datasources: dict[str, dict[str, Any]] = field(default_factory=dict)
    folders: dict[str, dict[str, Any]] = field(default_factory=dict)
    dashboards: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    next_id: int = 1

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id


Reply = tuple[int, Any]


def _datasource_view(stored: dict[str, Any]) -> dict[str, Any]:
    view = {k: v for k, v in stored.items() if k != "secureJsonData"}
    view["secureJsonFields"] = {k: True for k in stored.get("secureJsonData") or {}}
    return {"orgId": 1, "isDefault": False, "readOnly": False, "withCredentials": False, **view}


def get_datasource(s: State, uid: str, body: Any) -> Reply:
    if uid not in s.datasources:
        return 404, {"message": "Data source not found"}
    return 200, _datasource_view(s.datasources[uid])


def create_datasource(s: State, _: str, body: Any) -> Reply:
    uid = body.get("uid")
    if uid in s.datasources:
        return 409, {"message": "data source with the same uid already exists"}
    stored = {**body, "id": s.new_id(), "version": 1}
    s.datasources[uid] = stored
    view = _datasource_view(stored)
    return 200, {"datasource": view, "id": stored["id"], "message": "Datasource added"}


def update_datasource(s: State, uid: str, body: Any) -> Reply:
    old = s.datasources.get(uid)
    if old is None:
        return 404, {"message": "Data source not found"}
    secrets = {**(old.get("secureJsonData") or {}), **(body.get("secureJsonData") or {})}
    stored = {**body, "uid": uid, "id": old["id"], "version": old["version"] + 1}
    stored["secureJsonData"] = secrets
    s.datasources[uid] = stored
    view = _datasource_view(stored)
    return 200, {"datasource": view, "id": stored["id"], "message": "Datasource updated"}


def get_folder(s: State, uid: str, body: Any) -> Reply:
    if uid not in s.folders:
        return 404, {"message": "folder not found", "status": "not-found"}
    return 200, s.folders[uid]


def create_folder(s: State, _: str, body: Any) -> Reply:
    uid = body.get("uid")
    if uid in s.folders:
        return 409, {"message": "a folder with the same uid already exists"}
    s.folders[uid] = {"id": s.new_id(), "uid": uid, "title": body["title"], "version": 1}
    return 200, s.folders[uid]


def update_folder(s: State, uid: str, body: Any) -> Reply:
    folder = s.folders.get(uid)
    if folder is None:
        return 404, {"message": "folder not found"}
    if not body.get("overwrite") and body.get("version") != folder["version"]:
        return 412, {"message": "the folder has been changed by someone else"}
    folder.update(title=body.get("title", folder["title"]), version=folder["version"] + 1)
    return 200, folder


def get_dashboard(s: State, uid: str, body: Any) -> Reply:
    found = s.dashboards.get(uid)
    if found is None:
        return 404, {"message": "Dashboard not found"}
    model = {**found["dashboard"], "id": found["id"], "uid": uid, "version": found["version"]}
    meta = {"folderUid": found["folderUid"], "version": found["version"], "slug": uid}
    return 200, {"dashboard": model, "meta": meta}


def save_dashboard(s: State, _: str, body: Any) -> Reply:
    model = dict(body["dashboard"])
    uid, folder = str(model.get("uid")), body.get("folderUid", "")
    if folder and folder not in s.folders:
        return 400, {"message": "folder not found"}
    old = s.dashboards.get(uid)
    if old and not body.get("overwrite") and model.get("version") != old["version"]:
        return 412, {"message": "The dashboard has been changed by someone else"}
    version = old["version"] + 1 if old else 1
    stored_id = old["id"] if old else s.new_id()
    model = {k: v for k, v in model.items() if k not in ("id", "version")}
    s.dashboards[uid] = {"dashboard": model, "folderUid": folder, "version": version,
                         "id": stored_id}  # fmt: skip
    return 200, {"id": stored_id, "uid": uid, "status": "success", "version": version,
                 "url": f"/d/{uid}/{uid}", "slug": uid}  # fmt: skip


ROUTES = [
    ("GET", re.compile(r"/api/datasources/uid/([^/]+)"), get_datasource),
    ("POST", re.compile(r"/api/datasources()"), create_datasource),
    ("PUT", re.compile(r"/api/datasources/uid/([^/]+)"), update_datasource),
    ("GET", re.compile(r"/api/folders/([^/]+)"), get_folder),
    ("POST", re.compile(r"/api/folders()"), create_folder),
    ("PUT", re.compile(r"/api/folders/([^/]+)"), update_folder),
    ("GET", re.compile(r"/api/dashboards/uid/([^/]+)"), get_dashboard),
    ("POST", re.compile(r"/api/dashboards/db()"), save_dashboard),
]


class FakeGrafana:
    def __init__(self, token: str) -> None:
        self.state = State(token)
        state = self.state

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                path = self.path.split("?", 1)[0]
                state.requests.append(Request(self.command, path, body))
                if self.headers.get("Authorization") != f"Bearer {state.token}":
                    self._reply(401, {"message": "invalid API key"})
                    return
                for method, pattern, handler in ROUTES:
                    m = pattern.fullmatch(path)
                    if m and method == self.command:
                        self._reply(*handler(state, m.group(1), body))
                        return
                self._reply(404, {"message": "Not found"})

            def _reply(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._serve()

            def do_POST(self) -> None:
                self._serve()

            def do_PUT(self) -> None:
                self._serve()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def writes(self) -> list[Request]:
        return [r for r in self.state.requests if r.method != "GET"]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
