"""The control channel of a running simulation, so a technician can list devices and inject
events from a second terminal. One JSON object per line over TCP on 127.0.0.1:

    {"cmd": "list"}                          -> {"ok": true, "devices": [...]}
    {"cmd": "status"}                        -> {"ok": true, "now_ms": ..., "active": [...]}
    {"cmd": "inject", "event": {...}}        -> {"ok": true} or {"ok": false, "error": "..."}
"""

from __future__ import annotations

import asyncio
import errno
import logging
from typing import Any

import orjson

from firmware_sim.engine import Simulation
from firmware_sim.errors import PortInUseError, SimError
from firmware_sim.modbus import Endpoint
from firmware_sim.scenario import parse_event

log = logging.getLogger(__name__)


def describe(endpoint: Endpoint) -> dict[str, Any]:
    d = endpoint.device
    return {
        "id": d.id,
        "kind": d.kind,
        "household": d.household,
        "district": d.district,
        "meter_size": d.meter_size,
        "host": endpoint.host,
        "port": endpoint.port,
        "unit": endpoint.unit,
        "profile": endpoint.profile,
    }


class ControlServer:
    def __init__(self, sim: Simulation, endpoints: list[Endpoint], host: str, port: int) -> None:
        self._sim = sim
        self._endpoints = endpoints
        self._host, self._port = host, port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._serve, self._host, self._port)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUseError(
                    f"control port {self._host}:{self._port} is in use (another simulation "
                    "running?); choose another with --control-port"
                ) from None
            raise

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        cmd = request.get("cmd")
        if cmd == "list":
            return {"ok": True, "devices": [describe(e) for e in self._endpoints]}
        if cmd == "status":
            return {
                "ok": True,
                "now_ms": self._sim.now_ms,
                "tick": self._sim.clock.tick,
                "active": [
                    {"event": ev.model_dump(exclude_none=True), "until_s": until}
                    for ev, until in self._sim.active_events()
                ],
            }
        if cmd == "inject":
            event = parse_event(request.get("event") or {})
            self._sim.inject(event)
            log.info("injected %s on %s", event.type, event.target)
            return {"ok": True}
        return {"ok": False, "error": f"unknown command {cmd!r} (list, status, inject)"}

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    request = orjson.loads(line)
                    if not isinstance(request, dict):
                        raise SimError("a request is a JSON object")
                    reply = self.handle(request)
                except orjson.JSONDecodeError as exc:
                    reply = {"ok": False, "error": f"not JSON: {exc}"}
                except SimError as exc:
                    reply = {"ok": False, "error": str(exc)}
                writer.write(orjson.dumps(reply) + b"\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


async def request(
    host: str, port: int, payload: dict[str, Any], timeout: float = 5.0
) -> dict[str, Any]:
    """Send one request to a running simulation; SimError when none answers or it refuses."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError):
        raise SimError(
            f"no simulation answers on {host}:{port}; start one with 'gasguard sim run' "
            "(or pass --control-port)"
        ) from None
    try:
        writer.write(orjson.dumps(payload) + b"\n")
        await writer.drain()
        reply: dict[str, Any] = orjson.loads(await asyncio.wait_for(reader.readline(), timeout))
    finally:
        writer.close()
    if not reply.get("ok"):
        raise SimError(str(reply.get("error", "the simulation refused the request")))
    return reply
