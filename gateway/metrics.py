"""The gateway's figures, readable locally: ``GET /metrics`` (Prometheus text format) and
``GET /status`` (JSON, per device) on 127.0.0.1, for a technician or a node exporter."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import orjson

log = logging.getLogger(__name__)

Snapshot = Callable[[], dict[str, Any]]


def render_prometheus(snapshot: dict[str, Any]) -> str:
    """Gateway-wide counters and gauges, plus per-device poll figures."""
    lines = []
    gw = snapshot["gateway_id"]
    for name, (kind, value, help_text) in snapshot["figures"].items():
        metric = f"gasguard_gateway_{name}"
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} {kind}"]
        lines.append(f'{metric}{{gateway="{gw}"}} {0 if value is None else value}')
    per_device = (("polls", "counter"), ("failures", "counter"), ("lost", "gauge"))
    for name, kind in per_device:
        metric = f"gasguard_gateway_device_{name}"
        lines.append(f"# TYPE {metric} {kind}")
        for d in snapshot["devices"]:
            lines.append(f'{metric}{{gateway="{gw}",device="{d["id"]}"}} {int(d[name])}')
    return "\n".join(lines) + "\n"


class MetricsServer:
    def __init__(self, snapshot: Snapshot, host: str, port: int) -> None:
        self._snapshot = snapshot
        self._host, self._port = host, port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self._host, self._port)
        log.info("metrics on http://%s:%d/metrics", self._host, self._port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            path = request.split(b" ", 2)[1] if request.count(b" ") >= 2 else b"/"
            if path == b"/metrics":
                body, ctype, status = (
                    render_prometheus(self._snapshot()).encode(),
                    "text/plain; version=0.0.4",
                    "200 OK",
                )
            elif path == b"/status":
                body, ctype, status = (
                    orjson.dumps(self._snapshot(), default=str),
                    "application/json",
                    "200 OK",
                )
            else:
                body, ctype, status = b"try /metrics or /status\n", "text/plain", "404 Not Found"
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        writer.close()
