"""Gateway polling throughput: device polls per second against simulated devices over real
Modbus TCP, the gateway's concurrent pollers against a one-connection sequential baseline,
measured in the same run. Also the gateway's CPU time per 1,000 polls.

    .venv/bin/python bench/gateway_polls.py [--devices 1000] [--seconds 5] [--sim-processes 1]

The simulated devices run in separate processes (``gasguard sim run``), one port per device,
so the figure is the gateway's, not the simulator's, as far as the machine's cores allow:
on a 2-core machine the simulator and the gateway share them, so read the ratio first.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gasguard.profiles import builtin_profile  # noqa: E402
from gateway.links import tcp_link  # noqa: E402
from gateway.poller import DevicePoller, PollSettings  # noqa: E402


def free_block(count: int) -> int:
    import random

    for _ in range(500):
        base = random.randrange(20000, 32000 - count)
        socks = []
        try:
            for p in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port block")


def start_sims(
    devices: int, processes: int
) -> tuple[list[subprocess.Popen[bytes]], list[tuple[str, int]]]:
    """Households with a detector and a meter each; one port per device."""
    procs, endpoints = [], []
    per = devices // processes
    for _ in range(processes):
        base = free_block(per)
        control = free_block(1)
        households = per // 2
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gasguard.cli",
                    "sim",
                    "run",
                    "--detectors",
                    str(households),
                    "--meters",
                    str(households),
                    "--per-device-ports",
                    "--port",
                    str(base),
                    "--control-port",
                    str(control),
                    "--speed",
                    "1",
                ],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        # household by household: detector on base + 2i, meter on base + 2i + 1
        endpoints += [
            ("detector" if i % 2 == 0 else "meter", base + i) for i in range(households * 2)
        ]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", control), 0.2).close()
                break
            except OSError:
                time.sleep(0.2)
    return procs, endpoints


def pollers(endpoints: list[tuple[str, int]]) -> list[DevicePoller]:
    profiles = {k: builtin_profile(f"{k}-generic") for k in ("detector", "meter")}
    settings = PollSettings(interval=0.0, timeout=2.0)
    out = []
    for i, (kind, port) in enumerate(endpoints):
        link = tcp_link("127.0.0.1", port, timeout=3.0)
        out.append(
            DevicePoller(f"X-{i}", kind, 1, profiles[kind], link, settings, lambda r, u: None)
        )  # type: ignore[arg-type]
    return out


async def sequential(endpoints: list[tuple[str, int]], seconds: float) -> int:
    """The naive peer: one connection at a time, one device after another."""
    devices = pollers(endpoints)
    polls, deadline, i = 0, time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        await devices[i % len(devices)].read()
        polls += 1
        i += 1
    for d in devices:
        await d.link.close()
    return polls


async def concurrent(endpoints: list[tuple[str, int]], seconds: float) -> tuple[int, int, float]:
    """The gateway: every device on its own schedule (here: as fast as it answers)."""
    devices = pollers(endpoints)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(d.run(stop)) for d in devices]
    await asyncio.sleep(1.0)  # connections up
    start = sum(d.stats.polls for d in devices)
    cpu0, t0 = time.process_time(), time.monotonic()
    await asyncio.sleep(seconds)
    polls = sum(d.stats.polls for d in devices) - start
    cpu, elapsed = time.process_time() - cpu0, time.monotonic() - t0
    stop.set()
    await asyncio.gather(*tasks)
    failures = sum(d.stats.failures for d in devices)
    for d in devices:
        await d.link.close()
    return int(polls / elapsed * seconds), failures, cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--sim-processes", type=int, default=1)
    args = parser.parse_args()
    procs, endpoints = start_sims(args.devices, args.sim_processes)
    try:
        base = asyncio.run(sequential(endpoints, args.seconds))
        polls, failures, cpu = asyncio.run(concurrent(endpoints, args.seconds))
    finally:
        for p in procs:
            p.send_signal(signal.SIGINT)
        for p in procs:
            p.wait(30)
    base_rate, rate = base / args.seconds, polls / args.seconds
    cpus = os.cpu_count()
    print(f"devices: {len(endpoints)} (one port each), {cpus} CPUs, {args.seconds:g} s per run")
    print(f"baseline, one connection, sequential: {base_rate:8.0f} polls/s")
    print(f"gateway, concurrent pollers:          {rate:8.0f} polls/s  ({failures} failed polls)")
    print(f"gateway CPU per 1,000 polls:          {cpu / max(polls, 1) * 1000 * 1000:8.1f} ms")
    ratio = rate / max(base_rate, 1e-9)
    print(f"ratio gateway/baseline:               {ratio:8.2f}x  (goal: >= 5,000 polls/s)")


if __name__ == "__main__":
    main()
