"""Commands from the hotline: close or open a meter's valve (or a detector's valve output).

A command is JSON on ``gasguard/v1/{gw}/cmd``::

    {"id": "T-0042-1", "device": "M-0007", "action": "close_valve"}

The write goes through the device's own link, so it is serialised with polling on that bus,
and is read back to confirm. The outcome is published on ``.../cmd/result``::

    {"id": "T-0042-1", "device": "M-0007", "action": "close_valve", "status": "done", "ts": ...}

with status ``done``, ``failed`` (with a reason), ``unknown_device``, ``not_writable`` or
``invalid``. Results are kept by command id: a repeated command gets the same result again
and is not executed twice, also when the repeat arrives while the first one still runs (it is
answered when that one is done). A failure because the device did not answer (a LinkError)
is not kept: it may be transient, so a retry with the same id runs again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from gateway.links import LinkError
from gateway.poller import DevicePoller
from gateway.spool import Spool

log = logging.getLogger(__name__)

ACTIONS = {"close_valve": True, "open_valve": False}
VALVE_POINT = "valve_closed"


class CommandHandler:
    def __init__(
        self, pollers: Mapping[str, DevicePoller], spool: Spool, publish: Callable[[bytes], None]
    ) -> None:
        self._pollers = pollers
        self._spool = spool
        self._publish = publish
        self.executed = 0
        self.repeated = 0
        self._running: dict[str, asyncio.Future[bytes]] = {}  # command id -> its result

    async def handle(self, payload: bytes) -> dict[str, Any]:
        """Execute one command message and publish its result (also returned)."""
        try:
            command = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            return self._result({}, "invalid", f"not JSON: {exc}")
        if not isinstance(command, dict):
            return self._result({}, "invalid", "a command is a JSON object")
        cmd_id = command.get("id")
        if not isinstance(cmd_id, str) or not cmd_id or len(cmd_id) > 128:
            return self._result(command, "invalid", "'id' must be a non-empty string (at most 128)")
        earlier = self._spool.command_result(cmd_id)
        if earlier is None and cmd_id in self._running:
            log.info("command %s repeated while it runs: answering when it is done", cmd_id)
            earlier = await asyncio.shield(self._running[cmd_id])
        if earlier is not None:
            self.repeated += 1
            log.info("command %s repeated: answering with its earlier result", cmd_id)
            self._publish(earlier)
            result: dict[str, Any] = orjson.loads(earlier)
            return result
        running = asyncio.get_running_loop().create_future()
        running.add_done_callback(lambda f: f.cancelled() or f.exception())  # waiters or not
        self._running[cmd_id] = running
        try:
            result = await self._execute(command, cmd_id)
        except asyncio.CancelledError:
            running.cancel()
            raise
        except Exception as exc:  # the waiting repeats get it too
            running.set_exception(exc)
            raise
        else:
            running.set_result(orjson.dumps(result))
        finally:
            del self._running[cmd_id]
        return result

    async def _execute(self, command: dict[str, Any], cmd_id: str) -> dict[str, Any]:
        action = command.get("action")
        if action not in ACTIONS:
            return self._result(
                command,
                "invalid",
                f"unknown action {action!r}; known: {', '.join(ACTIONS)}",
                keep=True,
            )
        poller = self._pollers.get(str(command.get("device")))
        if poller is None:
            return self._result(
                command,
                "unknown_device",
                f"no device {command.get('device')!r} on this gateway",
                keep=True,
            )
        point = next((p for p in poller.profile.points if p.name == VALVE_POINT), None)
        if point is None or not point.writable:
            return self._result(
                command,
                "not_writable",
                f"profile {poller.profile.name!r} has no writable valve",
                keep=True,
            )
        want = ACTIONS[action]
        try:
            await poller.write(VALVE_POINT, want)
            shown = (await poller.read()).get(VALVE_POINT)
        except LinkError as exc:  # perhaps transient: not kept, a retry runs again
            return self._result(command, "failed", str(exc))
        if shown is not want:
            return self._result(
                command, "failed", f"read-back shows valve_closed={shown}", keep=True
            )
        self.executed += 1
        log.warning(
            "%s: valve %s by command %s", poller.device_id, "closed" if want else "opened", cmd_id
        )
        return self._result(command, "done", "", keep=True)

    def _result(
        self, command: Mapping[str, Any], status: str, reason: str, keep: bool = False
    ) -> dict[str, Any]:
        ts = int(time.time() * 1000)
        result = {
            "id": command.get("id"),
            "device": command.get("device"),
            "action": command.get("action"),
            "status": status,
            "ts": ts,
        }
        if reason:
            result["reason"] = reason
            log.warning("command %s: %s: %s", command.get("id"), status, reason)
        payload = orjson.dumps(result)
        if keep:
            self._spool.save_command_result(str(command["id"]), payload, ts)
        self._publish(payload)
        return result
