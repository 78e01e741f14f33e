"""``gasguard selftest``: a field technician's end-to-end check of a running system, without
sending a crew.

1. Signs in to the hotline and puts the households of the chosen devices in test mode (a
   silence per household, since a test leak or burst also alarms the household's other
   device: their tickets are marked test, never dispatched and never close a valve).
2. Runs a scenario on the simulated devices through the simulator's control port: ``leak``
   (gas leak on a detector), ``burst`` (on a meter), ``silence`` (a device stops answering;
   the ingest silence scan needs a few expected intervals, so give it a longer timeout).
3. Waits for each expected ticket, and prints whether it appeared, how fast, that it is a
   test ticket, and that no crew was dispatched and no valve command sent.
4. Clears the events, cancels its test tickets (when the user may) and lifts the silences.

Exit code 0 only when every check passed.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import httpx

# step -> (simulator event, device kind it needs, the ticket cause it should produce)
STEPS: dict[str, tuple[str, str, str]] = {
    "leak": ("gas_leak", "detector", "gas_leak"),
    "burst": ("burst", "meter", "burst"),
    "silence": ("silent", "detector", "device_silent"),
}


class SelftestError(RuntimeError):
    """The selftest could not run (not a failed check): the message says why."""


@dataclass
class Check:
    step: str
    device: str
    household: str
    cause: str
    started: float = 0.0
    ticket: dict[str, Any] | None = None
    seconds: float | None = None
    problems: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return self.ticket is not None and not self.problems


def _sim(control_port: int, message: dict[str, Any]) -> dict[str, Any]:
    from firmware_sim.control import request

    try:
        reply: dict[str, Any] = asyncio.run(request("127.0.0.1", control_port, message))
    except OSError as exc:
        raise SelftestError(f"no simulator answers on control port {control_port}: {exc}") from None
    return reply


class Selftest:
    def __init__(self, url: str, username: str, password: str, control_port: int) -> None:
        self.control_port = control_port
        self.client = httpx.Client(base_url=url.rstrip("/"), timeout=10)
        try:
            login = self.client.post(
                "/api/auth/login", json={"username": username, "password": password}
            )
        except httpx.HTTPError as exc:
            raise SelftestError(f"the hotline at {url} does not answer: {exc}") from None
        if login.status_code != 200:
            raise SelftestError(f"cannot sign in to {url} as {username}: {login.text}")
        self.role = login.json()["user"]["role"]
        self.client.headers["Authorization"] = f"Bearer {login.json()['token']}"
        self.silences: list[int] = []

    def plan(self, steps: list[str], devices: list[str] | None) -> list[Check]:
        listed = _sim(self.control_port, {"cmd": "list"})["devices"]
        by_id = {d["id"]: d for d in listed}
        checks: list[Check] = []
        for step in steps:
            if step not in STEPS:
                raise SelftestError(f"unknown step {step!r}; known: {', '.join(STEPS)}")
            _, kind, cause = STEPS[step]
            candidates = [
                by_id[d] for d in devices or [] if d in by_id and by_id[d]["kind"] == kind
            ]
            unknown = [d for d in devices or [] if d not in by_id]
            if unknown:
                raise SelftestError(f"the simulator has no device {', '.join(unknown)}")
            if not candidates:
                if devices:
                    raise SelftestError(f"step {step!r} needs a {kind} among {', '.join(devices)}")
                used = {c.household for c in checks}
                candidates = [d for d in listed if d["kind"] == kind and d["household"] not in used]
            device = candidates[-1]
            checks.append(Check(step, device["id"], device["household"], cause))
        return checks

    def run(self, checks: list[Check], timeout: float, minutes: int = 30) -> None:
        for household in sorted({c.household for c in checks}):
            reply = self.client.post(
                "/api/silences",
                json={"household_id": household, "reason": "gasguard selftest", "minutes": minutes},
            )
            if reply.status_code != 201:
                raise SelftestError(f"cannot put {household} in test mode: {reply.text}")
            self.silences.append(reply.json()["id"])
        for check in checks:
            event = STEPS[check.step][0]
            answer = _sim(
                self.control_port,
                {"cmd": "inject", "event": {"type": event, "device": check.device}},
            )
            if not answer.get("ok"):
                raise SelftestError(f"the simulator refused {event} on {check.device}: {answer}")
            check.started = time.monotonic()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(c.ticket is None for c in checks):
            queue = self.client.get("/api/tickets", params={"include_held": True}).json()
            for check in checks:
                if check.ticket is None:
                    found = [
                        t
                        for t in queue
                        if t["household_id"] == check.household and t["cause"] == check.cause
                    ]
                    if found:
                        check.ticket = found[0]
                        check.seconds = time.monotonic() - check.started
            time.sleep(0.5)
        for check in checks:
            if check.ticket is not None:
                check.problems = self._judge(check.ticket["id"])

    def _judge(self, ticket_id: int) -> tuple[str, ...]:
        detail = self.client.get(f"/api/tickets/{ticket_id}").json()
        problems = []
        if not detail["test_mode"]:
            problems.append("not marked test")
        dispatched = any(e["kind"] == "dispatch" for e in detail["events"])
        if dispatched or detail["status"] in ("dispatched", "on_site") or detail["crew"]:
            problems.append("a crew was dispatched")
        if detail["valve_commands"]:
            problems.append("a valve command was sent")
        return tuple(problems)

    def clean_up(self, checks: list[Check], settle_s: float = 60.0) -> list[str]:
        """End the events on the test households and air their homes, wait (up to
        ``settle_s``) until the test devices have no open alarm, cancel every test ticket
        opened at those households, then lift the silences: lifted earlier, a late alarm from
        a test device would open a real ticket."""
        notes = []
        for check in checks:
            _sim(
                self.control_port,
                {"cmd": "inject", "event": {"type": "clear", "household": check.household,
                                            "vent": True}},
            )  # fmt: skip
        deadline = time.monotonic() + settle_s
        while True:
            still = sorted({c.household for c in checks if self._open_alarms(c.household)})
            if not still or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        if still:
            notes.append(f"{', '.join(still)} still in alarm after {settle_s:g} s: left in test "
                         "mode (the silences end by themselves)")  # fmt: skip
        households = {c.household for c in checks}
        queue = self.client.get("/api/tickets", params={"include_held": True}).json()
        ours = [t for t in queue if t["household_id"] in households and t["test_mode"]]
        for ticket in ours:
            reply = self.client.post(
                f"/api/tickets/{ticket['id']}/cancel", json={"reason": "gasguard selftest"}
            )
            if reply.status_code != 200:
                notes.append(f"test ticket {ticket['id']} left open ({reply.json()['detail']})")
        if not still:
            for silence in self.silences:
                self.client.delete(f"/api/silences/{silence}")
        return notes

    def _open_alarms(self, household: str) -> bool:
        reply = self.client.get("/api/alarms", params={"household_id": household, "open": True})
        return bool(reply.json())


def report(checks: list[Check]) -> str:
    lines = [f"{'step':<8} {'device':<8} {'household':<10} {'ticket':>7} {'after':>8}  result"]
    for c in checks:
        ticket = str(c.ticket["id"]) if c.ticket else "-"
        after = f"{c.seconds:.1f} s" if c.seconds is not None else "-"
        if c.ticket is None:
            result = f"FAIL: no {c.cause} ticket appeared"
        elif c.problems:
            result = "FAIL: " + ", ".join(c.problems)
        else:
            result = "ok: test ticket, no crew, no valve"
        lines.append(
            f"{c.step:<8} {c.device:<8} {c.household:<10} {ticket:>7} {after:>8}  {result}"
        )
    return "\n".join(lines)


def main(
    url: str,
    username: str,
    password: str,
    *,
    control_port: int,
    steps: list[str],
    devices: list[str] | None,
    timeout: float,
) -> int:
    test = Selftest(url, username, password, control_port)
    checks = test.plan(steps, devices)
    print(
        f"selftest: {len(checks)} step(s) on {', '.join(c.device for c in checks)}; "
        f"devices in test mode while it runs",
        flush=True,
    )
    try:
        test.run(checks, timeout)
    finally:
        notes = test.clean_up(checks)
    print(report(checks))
    for note in notes:
        print(f"note: {note}")
    passed = all(c.passed for c in checks)
    print("selftest: " + ("all passed" if passed else "FAILED"))
    return 0 if passed else 1
