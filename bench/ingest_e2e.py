"""End-to-end ingest throughput: simulated fleet -> Mosquitto (project config) -> GasGuard's
consumer (decode, detection, binary COPY, batch ids, one commit per micro-batch) -> PostgreSQL,
sustained, against a naive peer (one INSERT per reading from a paho callback) in the same run.

    .venv/bin/python bench/ingest_e2e.py [--devices 20000] [--seconds 60] [--naive-seconds 15]

Self-contained: a database of its own on 127.0.0.1:5432 (created, migrated, the fleet
registered, dropped at the end), a Mosquitto of its own on a free port with
deploy/mosquitto/gasguard.conf, and three processes besides this one: the publisher, the
GasGuard consumer (ingest.consumer.Ingest with its default settings) and the naive peer.
Everything is cleaned up on Ctrl-C too.

The publisher pre-encodes a pool of wire payloads from a fast-forwarded firmware_sim
Simulation and gives every batch a fresh per-gateway seq and the wall-clock time as its
timestamp (the JSON is assembled from byte pieces; the meters' volume column is re-encoded so
the register never runs backwards when the pool wraps). It publishes as fast as the consumer
takes the messages: no more than a fixed number of messages beyond what the consumer has
committed, so Mosquitto holds a bounded queue. Readings/s is what the consumer committed
over the window after a warm-up (its own counter, checked against row counts afterwards).

Gateways carry 400 devices (200 households), so every message holds exactly 200 readings.
Timestamps are the wall clock (as live devices would send them), so a device reports every
fraction of a second here: what matters to the silence scan, which compares with the clock.

On a 2-core machine the broker, PostgreSQL, the publisher and the consumer share the cores:
the absolute figure is lower than on a real deployment; the ratio to the naive peer is the
figure to compare. The naive peer waits for a WAL fsync per reading, so its figure (and the
ratio) follows the disk's fsync latency, printed with it. Each phase prints what runs and the
CPU split, including what else the machine is doing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import platform
import queue
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import orjson  # noqa: E402
import paho.mqtt.client as mqtt  # noqa: E402
import psycopg  # noqa: E402
from _cpu import CpuMeter, postgres_pids  # noqa: E402  (bench/, beside this script)
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

ADMIN_URL = os.environ.get(
    "GASGUARD_BENCH_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
MOSQUITTO_CONF = ROOT / "deploy" / "mosquitto" / "gasguard.conf"
BATCH = 200  # readings per MQTT message
HOUSEHOLDS_PER_GATEWAY = 200  # 400 devices: one 200-reading batch per kind per gateway and pass
POOL_SNAPSHOTS = 20  # simulated minutes pre-encoded (values cycle, the volume keeps rising)
FAST_FORWARD_H = 6

# slots of the shared int64 array the processes talk through
STATE, CONSUMED_SLOT, BACKLOG = 0, 1, 2
PUB_READY, PUB_SENT, PUB_ACKED, PUB_READINGS, PUB_PASSES, PUB_ERROR = 3, 4, 5, 6, 7, 8
GG_READY, GG_MSGS, GG_READINGS, GG_BATCHES, GG_MAXLAT_US, GG_ALARMS, GG_DEAD = range(9, 16)
NV_READY, NV_MSGS, NV_READINGS, NV_ERRORS = range(16, 20)
SENT0, CONSUMED0 = 20, 21  # where the current phase's flow control starts
# where the consumer's time goes (microseconds, summed)
T_ACCEPT, T_TXN, T_COPY, T_DETECT, T_HOUSEKEEP, N_HOUSEKEEP, T_HOUSEKEEP_MAX = range(22, 29)
TIMERS = {
    "decode and checks (accept)": T_ACCEPT,
    "transaction (claim, COPY, detection, alarms, commit)": T_TXN,
    "  of which COPY (building rows + server)": T_COPY,
    "  of which detection (Detection.run)": T_DETECT,
    "housekeeping (rollups, partitions, retention)": T_HOUSEKEEP,
}
SLOTS = 32
IDLE, RUN, EXIT = 0, 1, 2


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def status_kb(field: str, pid: int | str = "self") -> int:
    """A VmRSS/VmHWM-style line of /proc/PID/status, in kB (0 if unreadable)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def ignore_sigint() -> None:
    """Children leave Ctrl-C to the parent, which stops them in order."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ------------------------------------------------------------------------------ the fleet


def fleet_layout(households: int, seed: int) -> Any:
    from firmware_sim.fleet import build_fleet

    return build_fleet(fleet_spec(households), seed)


def fleet_spec(households: int) -> Any:
    from firmware_sim.scenario import FleetSpec

    return FleetSpec(detectors=households, meters=households, districts=max(1, households // 1000))


def gateway_id(g: int) -> str:
    return f"GW-{g + 1:04d}"


async def register_fleet(url: str, households: int, seed: int) -> int:
    """Households with a detector and a meter each, HOUSEHOLDS_PER_GATEWAY per gateway."""
    from ingest.registry import DeviceRow, import_rows

    fleet = fleet_layout(households, seed)
    rows = []
    for i, (d, m) in enumerate(zip(fleet.detectors, fleet.meters, strict=True)):
        common = {
            "household_id": d.household,
            "district": d.district,
            "address": f"{i + 1} Bench Street",
            "gateway_id": gateway_id(i // HOUSEHOLDS_PER_GATEWAY),
            "expected_interval_s": 60,
        }
        rows.append(
            DeviceRow(device_id=d.id, kind="detector", profile="detector-generic", **common)
        )
        rows.append(
            DeviceRow(
                device_id=m.id,
                kind="meter",
                profile="meter-generic",
                meter_size=m.meter_size,
                **common,
            )
        )
    async with await psycopg.AsyncConnection.connect(url) as conn:
        return await import_rows(conn, rows)


# ------------------------------------------------------------------------------ publisher


class Pool:
    """Wire payloads of the whole fleet for POOL_SNAPSHOTS consecutive simulated minutes, in
    byte pieces: seq and ts go in per publish, and the meters' volume (so that it keeps rising
    when the pool wraps)."""

    def __init__(self, households: int, seed: int) -> None:
        from firmware_sim.engine import Simulation

        start = now_ms() - (FAST_FORWARD_H * 60 + POOL_SNAPSHOTS) * 60_000
        sim = Simulation(fleet=fleet_spec(households), seed=seed, dt=60.0, start_ms=start)
        sim.run_for(FAST_FORWARD_H * 3600)
        self.gateways = (households + HOUSEHOLDS_PER_GATEWAY - 1) // HOUSEHOLDS_PER_GATEWAY
        parts = [
            (g * HOUSEHOLDS_PER_GATEWAY, min(households, (g + 1) * HOUSEHOLDS_PER_GATEWAY))
            for g in range(self.gateways)
        ]
        self.sizes = [hi - lo for lo, hi in parts]
        self.topics = [f"gasguard/v1/{gateway_id(g)}/telemetry" for g in range(self.gateways)]
        self.head = [
            b'{"v":1,"gw":' + orjson.dumps(gateway_id(g)) + b',"seq":' for g in range(self.gateways)
        ]
        self.mid: dict[str, list[bytes]] = {}
        self.tail: dict[str, list[list[bytes]]] = {"detector": [], "meter": []}
        self.volume: list[list[np.ndarray]] = []
        np_opt = orjson.OPT_SERIALIZE_NUMPY
        for k in range(POOL_SNAPSHOTS):
            sim.step()
            vols = []
            for kind in ("detector", "meter"):
                ids, cols = sim.readings(kind)
                if len(ids) != households:
                    raise RuntimeError(f"only {len(ids)} of {households} {kind}s answer")
                if k == 0:
                    self.mid[kind] = [
                        b',"kind":"'
                        + kind.encode()
                        + b'","dev":'
                        + orjson.dumps(ids[lo:hi].tolist())
                        + b',"ts":['
                        for lo, hi in parts
                    ]
                tails = []
                for lo, hi in parts:
                    fields = {n: np.ascontiguousarray(v[lo:hi]) for n, v in cols.items()}
                    if kind == "meter":
                        vols.append(fields.pop("volume_m3").astype(np.float64))
                        tails.append(b"," + orjson.dumps(fields, option=np_opt)[1:])
                    else:
                        tails.append(b"]," + orjson.dumps(fields, option=np_opt)[1:])
                self.tail[kind].append(tails)
            self.volume.append(vols)
        first, last = self.volume[0], self.volume[-1]
        # one pool cycle's rise, plus one mean step: the register never goes back at the wrap
        self.delta = [
            np.maximum(b - a, 0.0) * POOL_SNAPSHOTS / max(POOL_SNAPSHOTS - 1, 1)
            for a, b in zip(first, last, strict=True)
        ]
        self.seq = [0] * self.gateways
        self.nbytes = sum(len(t) for kind in self.tail.values() for ts in kind for t in ts)

    def payload(self, g: int, kind: str, k: int, cycle: int, ts: list[bytes]) -> bytes:
        self.seq[g] += 1
        seq = str(self.seq[g]).encode()
        if kind == "detector":
            return b"".join((self.head[g], seq, self.mid[kind][g], ts[g], self.tail[kind][k][g]))
        volume = self.volume[k][g] + cycle * self.delta[g]
        return b"".join(
            (
                self.head[g],
                seq,
                self.mid[kind][g],
                ts[g],
                b'],"volume_m3":',
                orjson.dumps(volume, option=orjson.OPT_SERIALIZE_NUMPY),
                self.tail[kind][k][g],
            )
        )

    def ts_blocks(self, ts: int) -> list[bytes]:
        one = str(ts).encode()
        by_size = {n: b",".join([one] * n) for n in set(self.sizes)}
        return [by_size[n] for n in self.sizes]

    def self_check(self) -> None:
        """The assembled payloads decode (and the volume never goes back at the wrap)."""
        from gasguard.wire import decode_batch

        ts = self.ts_blocks(now_ms())
        saved = list(self.seq)
        for kind in ("detector", "meter"):
            b = decode_batch(self.payload(0, kind, 0, 0, ts))
            if b.gw != gateway_id(0) or len(b) != self.sizes[0] or b.kind != kind:
                raise RuntimeError(f"self-check: bad {kind} payload")
        end = decode_batch(self.payload(0, "meter", POOL_SNAPSHOTS - 1, 0, ts))
        wrap = decode_batch(self.payload(0, "meter", 0, 1, ts))
        if (wrap.fields["volume_m3"] < end.fields["volume_m3"]).any():
            raise RuntimeError("self-check: the volume register goes back at the pool wrap")
        self.seq = saved


def publisher_main(port: int, households: int, seed: int, stats: Any) -> None:
    ignore_sigint()
    try:
        _publisher(port, households, seed, stats)
    except BaseException:
        traceback.print_exc()
        stats[PUB_ERROR] = 1
        raise


def _publisher(port: int, households: int, seed: int, stats: Any) -> None:
    pool = Pool(households, seed)
    pool.self_check()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{uuid.uuid4().hex[:8]}")
    client.max_inflight_messages_set(1_000_000)
    client.max_queued_messages_set(0)

    def on_publish(c: mqtt.Client, u: object, mid: int, rc: object, props: object) -> None:
        stats[PUB_ACKED] += 1

    client.on_publish = on_publish
    client.connect("127.0.0.1", port, keepalive=60)
    deadline = time.monotonic() + 10
    while not client.is_connected():
        client.loop(0.05)
        if time.monotonic() > deadline:
            raise RuntimeError("the publisher could not connect to the broker")
    sock = client.socket()
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    stats[PUB_READY] = 1
    passes, last_ts, sent = 0, 0, 0
    kinds = ("detector", "meter")
    while stats[STATE] != EXIT:
        if stats[STATE] != RUN:
            client.loop(0.01)
            continue
        ts = max(now_ms(), last_ts + 1)  # strictly later per device, never in the future
        last_ts = ts
        blocks = pool.ts_blocks(ts)
        k, cycle = passes % POOL_SNAPSHOTS, passes // POOL_SNAPSHOTS
        for g in range(pool.gateways):
            for kind in kinds:
                # as fast as the consumer takes them: at most BACKLOG messages ahead of it
                while (stats[PUB_SENT] - stats[SENT0]) - (
                    stats[stats[CONSUMED_SLOT]] - stats[CONSUMED0]
                ) >= stats[BACKLOG] and stats[STATE] == RUN:
                    client.loop(0.002)
                if stats[STATE] != RUN:
                    break
                info = client.publish(pool.topics[g], pool.payload(g, kind, k, cycle, blocks), 1)
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    raise RuntimeError(f"publish failed: {mqtt.error_string(info.rc)}")
                stats[PUB_SENT] += 1
                stats[PUB_READINGS] += pool.sizes[g]
                sent += 1
                if sent % 16 == 0:
                    client.loop_read()
            if stats[STATE] != RUN:
                break
        client.loop_misc()
        passes += 1
        stats[PUB_PASSES] = passes
    for _ in range(100):  # let the last PUBACKs in
        client.loop(0.01)
    client.disconnect()


# ------------------------------------------------------------------------------ consumers


def consumer_main(
    db_url: str, port: int, client_id: str, *, stats: Any, stop: Any, out: Any
) -> None:
    """GasGuard's consumer, with its default settings, until ``stop`` is set."""
    import logging

    ignore_sigint()
    logging.basicConfig(
        level=logging.WARNING, format="    [consumer] %(levelname)s %(name)s: %(message)s"
    )
    try:
        import ingest.consumer
        from gasguard.runner import run
        from ingest.consumer import Ingest
        from ingest.settings import IngestSettings

        def add_time(slot: int, started: float) -> int:
            us = int((time.perf_counter() - started) * 1e6)
            stats[slot] += us
            return us

        # timing only: the module's own copy_readings, wrapped
        copy_readings = ingest.consumer.copy_readings

        async def timed_copy(*args: Any, **kwargs: Any) -> int:
            started = time.perf_counter()
            try:
                return await copy_readings(*args, **kwargs)
            finally:
                add_time(T_COPY, started)

        ingest.consumer.copy_readings = timed_copy  # type: ignore[assignment]

        settings = IngestSettings(
            _env_file=None,  # type: ignore[call-arg]
            database_url=db_url,
            mqtt_host="127.0.0.1",
            mqtt_port=port,
            ingest_client_id=client_id,
            ingest_metrics_port=0,
        )

        class BenchIngest(Ingest):
            """Publishes its committed counts to the shared array after every micro-batch,
            and times its stages."""

            def __init__(self, settings: IngestSettings) -> None:
                super().__init__(settings)
                run = self.detection.run

                def timed_run(*args: Any, **kwargs: Any) -> Any:
                    started = time.perf_counter()
                    try:
                        return run(*args, **kwargs)
                    finally:
                        add_time(T_DETECT, started)

                self.detection.run = timed_run  # type: ignore[method-assign]

            def accept(self, messages: Any) -> Any:
                started = time.perf_counter()
                try:
                    return super().accept(messages)
                finally:
                    add_time(T_ACCEPT, started)

            async def _transaction(self, *args: Any, **kwargs: Any) -> Any:
                started = time.perf_counter()
                try:
                    return await super()._transaction(*args, **kwargs)  # type: ignore[misc]
                finally:
                    add_time(T_TXN, started)

            async def housekeeping(self) -> None:
                started = time.perf_counter()
                try:
                    await super().housekeeping()
                finally:
                    us = add_time(T_HOUSEKEEP, started)
                    stats[N_HOUSEKEEP] += 1
                    stats[T_HOUSEKEEP_MAX] = max(stats[T_HOUSEKEEP_MAX], us)

            async def _store(self, *args: Any, **kwargs: Any) -> None:
                started = time.perf_counter()
                await super()._store(*args, **kwargs)
                h = self.health
                stats[GG_MAXLAT_US] = max(
                    stats[GG_MAXLAT_US], int((time.perf_counter() - started) * 1e6)
                )
                stats[GG_BATCHES] += 1
                stats[GG_READINGS] = int(h.readings._value.get())
                stats[GG_ALARMS] = int(h.alarms_raised._value.get())
                stats[GG_DEAD] = int(h.dead_letters._value.get())
                stats[GG_MSGS] = int(h.messages._value.get())

        async def main() -> dict[str, Any]:
            ingest = BenchIngest(settings)
            halt = asyncio.Event()

            async def watch() -> None:
                while not stop.is_set():
                    if ingest.link.connected:
                        stats[GG_READY] = 1
                    await asyncio.sleep(0.05)
                halt.set()

            watcher = asyncio.create_task(watch())
            await ingest.run(halt)
            await watcher
            h = ingest.health
            return {
                "settings": settings.model_dump(
                    include={
                        "ingest_max_messages",
                        "ingest_max_wait_ms",
                        "ingest_pipeline",
                        "ingest_receive_maximum",
                        "ingest_state_every_s",
                        "ingest_rollup_every_s",
                    }
                ),
                "readings": int(h.readings._value.get()),
                "messages": int(h.messages._value.get()),
                "duplicates": int(h.duplicates._value.get()),
                "db_errors": int(h.db_errors._value.get()),
                "devices": len(ingest.registry.by_id),
                "state_bytes": ingest.detection.detectors.nbytes + ingest.detection.meters.nbytes,
            }

        result = run(main())  # as `gasguard ingest run`: on uvloop when installed
        result["vmhwm_kb"] = status_kb("VmHWM")
        result["maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out.put(result)
    except BaseException:
        out.put({"error": traceback.format_exc()})


def naive_main(db_url: str, port: int, stats: Any, stop: Any, out: Any) -> None:
    """The naive peer: a paho callback that INSERTs each reading (autocommit)."""
    ignore_sigint()
    try:
        from gasguard.wire import decode_batch
        from ingest.writer import READING_COLUMNS

        conn = psycopg.connect(db_url, autocommit=True)
        keys = {str(i): int(k) for i, k in conn.execute("SELECT id, key FROM devices")}
        inserts = {
            kind: (
                f"INSERT INTO {kind}_readings ({', '.join(cols)}) "
                f"VALUES ({', '.join(['%s'] * len(cols))})",
                [c for c in cols if c not in ("ts", "device_key")],
            )
            for kind, cols in READING_COLUMNS.items()
        }

        def on_message(c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
            try:
                batch = decode_batch(msg.payload)
                sql, names = inserts[batch.kind]
                columns = [batch.fields[n].tolist() for n in names]
                for i, (dev, ms) in enumerate(
                    zip(batch.dev.tolist(), batch.ts.tolist(), strict=True)
                ):
                    when = datetime.fromtimestamp(ms / 1000, UTC)
                    conn.execute(sql, (when, keys[dev], *(col[i] for col in columns)))
                stats[NV_READINGS] += len(batch)
            except Exception:
                stats[NV_ERRORS] += 1
                traceback.print_exc()
            stats[NV_MSGS] += 1

        def on_subscribe(c: mqtt.Client, u: object, mid: int, rcs: object, props: object) -> None:
            stats[NV_READY] = 1

        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"bench-naive-{uuid.uuid4().hex[:8]}"
        )
        client.on_message = on_message
        client.on_subscribe = on_subscribe
        client.on_connect = lambda c, u, f, rc, p: c.subscribe("gasguard/v1/+/telemetry", qos=1)
        client.connect("127.0.0.1", port, keepalive=60)
        while not stop.is_set():
            client.loop(0.1)
        client.disconnect()
        conn.close()
        out.put({"vmhwm_kb": status_kb("VmHWM")})
    except BaseException:
        out.put({"error": traceback.format_exc()})


def state_main(devices: int, out: Any) -> None:
    """Detection state for ``devices`` devices (households with a detector and a meter),
    and the kernels' speed over micro-batches covering the whole fleet."""
    ignore_sigint()
    try:
        out.put(_state(devices))
    except BaseException:
        out.put({"error": traceback.format_exc()})


def _state(devices: int) -> dict[str, Any]:
    from ingest.detection import Detection
    from ingest.registry import DeviceInfo, Registry

    households = devices // 2
    rss0 = status_kb("VmRSS")
    registry = Registry()
    for i in range(households):
        gw, hh, district = gateway_id(i // HOUSEHOLDS_PER_GATEWAY), f"H-{i:06d}", f"d-{i // 1000}"
        for kind, key, qmax in (("detector", 2 * i + 1, np.inf), ("meter", 2 * i + 2, 4.0)):
            dev = f"{kind[0].upper()}-{i:06d}"
            info = DeviceInfo(key, dev, kind, gw, hh, district, 60, False, qmax)  # type: ignore[arg-type]
            registry.by_id[info.id] = info
            registry.by_key[info.key] = info
        registry.gateways.add(gw)
    rss1 = status_kb("VmRSS")
    detection = Detection(8.0)
    rng = np.random.default_rng(1)
    keys = {"detector": np.arange(1, devices + 1, 2), "meter": np.arange(2, devices + 2, 2)}
    volume = rng.uniform(50, 5000, households)

    def columns(kind: str, ts: int) -> dict[str, np.ndarray]:
        n = households
        cols: dict[str, np.ndarray] = {
            "ts": np.full(n, ts, np.int64),
            "device_key": keys[kind].astype(np.int32),
            "comm_lost": np.zeros(n, bool),
        }
        if kind == "detector":
            cols |= {
                "ch4_lel": rng.uniform(0.0, 1.0, n),
                "alarm": np.zeros(n, bool),
                "fault": np.zeros(n, bool),
                "eol": np.zeros(n, bool),
                "valve_closed": np.zeros(n, bool),
                "temp_c": rng.normal(19, 1, n),
            }
        else:
            volume[:] += rng.uniform(0, 0.02, n)
            cols |= {
                "volume_m3": volume.copy(),
                "flow_m3h": rng.uniform(0, 1.0, n),
                "pressure_kpa": rng.normal(2.0, 0.02, n),
                "valve_closed": np.zeros(n, bool),
                "battery_pct": np.full(n, 80.0),
                "tamper": np.zeros(n, bool),
                "reverse_flow": np.zeros(n, bool),
            }
        return cols

    t0 = now_ms() - 3_600_000
    for kind in ("detector", "meter"):
        detection.run(kind, columns(kind, t0), registry)  # type: ignore[arg-type]
    rss2 = status_kb("VmRSS")
    state = detection.detectors.nbytes + detection.meters.nbytes
    params = sum(
        int(np.asarray(getattr(p, name)).nbytes)
        for p in (detection._detector_params, detection._meter_params)
        for name in ("expected_interval_ms_by_device", "qmax_by_device")
        if getattr(p, name, None) is not None
    )
    # the kernels alone: 10 more fleet-wide passes, a minute apart
    batches = [
        (kind, columns(kind, t0 + (j + 1) * 60_000))
        for j in range(10)
        for kind in ("detector", "meter")
    ]
    started = time.perf_counter()
    for kind, cols in batches:
        detection.run(kind, cols, registry)  # type: ignore[arg-type]
    kernel_s = time.perf_counter() - started
    return {
        "devices": devices,
        "capacity": detection.detectors.capacity,
        "detector_bytes": detection.detectors.nbytes,
        "meter_bytes": detection.meters.nbytes,
        "state_bytes": state,
        "params_bytes": params,
        "registry_rss_kb": rss1 - rss0,
        "detection_rss_kb": rss2 - rss1,
        "vmhwm_kb": status_kb("VmHWM"),
        "kernel_readings_per_s": 10 * devices / kernel_s,
    }


# ------------------------------------------------------------------------------ services


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def start_mosquitto(folder: Path) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).exists():
        raise SystemExit("mosquitto is not installed (scripts/services installs it)")
    port = free_port()
    conf = folder / "mosquitto.conf"
    conf.write_text(
        # as root, mosquitto would switch to its own user, who cannot write in our folder
        f"listener {port} 127.0.0.1\nallow_anonymous true\nuser root\n"
        f"persistence_location {folder}/\nlog_dest file {folder}/mosquitto.log\n"
        + MOSQUITTO_CONF.read_text()
    )
    proc = subprocess.Popen(  # its own session: Ctrl-C reaches it through our cleanup, last
        [binary, "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_for_port(port)
    return proc, port


def forget_session(port: int, client_id: str) -> None:
    """Drop a stopped consumer's persistent session, or the broker keeps queueing for it."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 0
    client.connect("127.0.0.1", port, clean_start=True, properties=props)
    deadline = time.monotonic() + 5
    while not client.is_connected() and time.monotonic() < deadline:
        client.loop(0.05)
    client.disconnect()


def admin(statement: str) -> None:
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(statement)  # type: ignore[arg-type]


def checkpoint() -> None:
    """Start a measured phase with no checkpoint pending from the previous one."""
    started = time.monotonic()
    admin("CHECKPOINT")
    say(f"      (CHECKPOINT before the phase: {time.monotonic() - started:.1f} s)")


def scalar(url: str, sql: str) -> Any:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(sql).fetchone()  # type: ignore[arg-type]
        return None if row is None else row[0]


def reading_rows(url: str) -> int:
    return int(
        scalar(
            url,
            "SELECT (SELECT count(*) FROM detector_readings) "
            "+ (SELECT count(*) FROM meter_readings)",
        )
    )


# ------------------------------------------------------------------------------ measuring


def window(
    stats: Any,
    slot: int,
    warmup: float,
    seconds: float,
    cpu_groups: Callable[[], dict[str, list[int]]],
) -> tuple[float, list[float], str, dict[int, float]]:
    """Readings/s committed (``stats[slot]``) over ``seconds`` after ``warmup``, with a
    5-second timeline, the CPU split and the consumer's timers (share of the window).
    The window starts and ends on commits (the count changing), so that whole micro-batches
    fall in it. ``cpu_groups`` names the processes, asked after the warm-up (a consumer opens
    its database connections when it needs them)."""
    end_warmup = time.monotonic() + warmup
    while time.monotonic() < end_warmup:
        check_children()
        time.sleep(0.1)
    next_commit(stats, slot)
    cpu = CpuMeter(cpu_groups())
    timers0 = {t: stats[t] for t in (*TIMERS.values(), N_HOUSEKEEP)}
    t0, r0 = time.monotonic(), stats[slot]
    timeline: list[float] = []
    t_prev, r_prev = t0, r0
    step = 5.0 if seconds >= 10 else max(seconds / 2, 0.5)
    while True:
        now = time.monotonic()
        if now >= t0 + seconds:
            break
        time.sleep(min(0.1, t0 + seconds - now))
        check_children()
        now = time.monotonic()
        if now - t_prev >= step or now >= t0 + seconds:
            r = stats[slot]
            timeline.append((r - r_prev) / (now - t_prev))
            t_prev, r_prev = now, r
    next_commit(stats, slot)
    t1, r1 = time.monotonic(), stats[slot]
    timers = {t: (stats[t] - v0) / 1e6 / (t1 - t0) for t, v0 in timers0.items()}
    timers[N_HOUSEKEEP] *= 1e6 * (t1 - t0)
    return (r1 - r0) / (t1 - t0), timeline, cpu.report(), timers


def next_commit(stats: Any, slot: int, timeout: float = 30.0) -> None:
    """Return just after ``stats[slot]`` changes."""
    before, deadline = stats[slot], time.monotonic() + timeout
    while stats[slot] == before and time.monotonic() < deadline:
        time.sleep(0.0005)


CHILDREN: dict[str, mp.process.BaseProcess] = {}


def check_children() -> None:
    for name, proc in CHILDREN.items():
        if not proc.is_alive():
            raise RuntimeError(f"the {name} process died (exit code {proc.exitcode})")


def wait_flag(stats: Any, slot: int, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not stats[slot]:
        check_children()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {timeout:.0f} s")
        time.sleep(0.05)


def start_publishing(stats: Any, consumed_slot: int, backlog: int) -> None:
    """Publish, at most ``backlog`` messages ahead of what ``stats[consumed_slot]`` counts."""
    stats[SENT0] = stats[PUB_SENT]
    stats[CONSUMED0] = stats[consumed_slot]
    stats[CONSUMED_SLOT], stats[BACKLOG] = consumed_slot, backlog
    stats[STATE] = RUN


def result_of(out: Any, what: str, timeout: float = 60.0) -> dict[str, Any]:
    try:
        result: dict[str, Any] = out.get(timeout=timeout)
    except queue.Empty:
        raise RuntimeError(f"no result from {what}") from None
    if "error" in result:
        raise RuntimeError(f"{what} failed:\n{result['error']}")
    return result


def stop_child(name: str, timeout: float = 30.0) -> None:
    proc = CHILDREN.pop(name, None)
    if proc is None:
        return
    proc.join(timeout)
    if proc.is_alive():
        proc.terminate()
        proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()


def say(text: str = "") -> None:
    print(text, flush=True)


def fmt(x: float) -> str:
    return f"{x:,.0f}"


def mb(kb: float) -> str:
    return f"{kb / 1024:.0f} MB"


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


# ------------------------------------------------------------------------------ the run


def run(args: argparse.Namespace, folder: Path, cleanup: list[Any]) -> None:
    ctx = mp.get_context("spawn")
    households = max(args.devices // 2, 1)
    devices = 2 * households
    gateways = (households + HOUSEHOLDS_PER_GATEWAY - 1) // HOUSEHOLDS_PER_GATEWAY
    cores = os.cpu_count() or 1
    pg_version = scalar(ADMIN_URL, "SHOW server_version")
    mosq = subprocess.run(
        [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-h"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.splitlines()[:1]
    say("GasGuard ingest, end to end (bench/ingest_e2e.py)")
    say(
        f"machine: {cores} CPUs ({platform.machine()}), {load()}; Python "
        f"{platform.python_version()}, PostgreSQL {pg_version}, {' '.join(mosq)}, paho-mqtt "
        f"{version('paho-mqtt')}, psycopg "
        f"{psycopg.__version__} ({psycopg.pq.__impl__})"
    )
    say(
        f"fleet: {devices:,} devices ({households:,} households with a detector and a meter) on "
        f"{gateways} gateways of {2 * HOUSEHOLDS_PER_GATEWAY} devices; {BATCH}-reading "
        f"batches, QoS 1"
    )

    # database
    name = f"gasguard_bench_{uuid.uuid4().hex[:12]}"
    admin(f'CREATE DATABASE "{name}"')
    cleanup.append(("database", name))
    url = ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    started = time.monotonic()

    async def prepare() -> int:
        from ingest.storage import migrate

        async with await psycopg.AsyncConnection.connect(url) as conn:
            await migrate(conn, "stock")
        return await register_fleet(url, households, args.seed)

    registered = asyncio.run(prepare())
    say(
        f"setup: database {name} migrated, {registered:,} devices registered "
        f"({time.monotonic() - started:.1f} s)"
    )

    # broker
    broker, port = start_mosquitto(folder)
    cleanup.append(("mosquitto", broker))
    say(f"setup: Mosquitto on 127.0.0.1:{port} with {MOSQUITTO_CONF.relative_to(ROOT)}")

    stats = ctx.RawArray("q", SLOTS)
    started = time.monotonic()
    pub = ctx.Process(
        target=publisher_main, args=(port, households, args.seed, stats), name="publisher"
    )
    pub.daemon = True
    pub.start()
    CHILDREN["publisher"] = pub
    cleanup.append(("stats", stats))
    wait_flag(stats, PUB_READY, "the publisher", timeout=120)
    say(
        f"setup: publisher ready, {POOL_SNAPSHOTS} simulated minutes of the fleet pre-encoded "
        f"after {FAST_FORWARD_H} h fast-forward ({time.monotonic() - started:.1f} s)"
    )

    # 1. the publisher alone
    say()
    say(
        f"[1/4] running: the publisher process -> Mosquitto, no subscriber (Mosquitto "
        f"PUBACKs and drops), {args.publisher_seconds:.0f} s; {load()}"
    )
    start_publishing(stats, PUB_ACKED, 4000)
    pub_rate, _, pub_cpu, _ = window(
        stats,
        PUB_READINGS,
        1.0,
        args.publisher_seconds,
        lambda: {"publisher": [pub.pid or 0], "mosquitto": [broker.pid]},
    )
    stats[STATE] = IDLE
    say(f"      publisher alone: {fmt(pub_rate)} readings/s ({fmt(pub_rate / BATCH)} msg/s)")
    say(f"      {pub_cpu}")
    time.sleep(0.5)

    # 2. GasGuard's consumer
    client_id = f"bench-ingest-{uuid.uuid4().hex[:8]}"
    gg_out = ctx.Queue()
    gg_stop = ctx.Event()
    consumer = ctx.Process(
        target=consumer_main,
        args=(url, port, client_id),
        kwargs={"stats": stats, "stop": gg_stop, "out": gg_out},
        name="gasguard-consumer",
    )
    consumer.daemon = True
    consumer.start()
    CHILDREN["consumer"] = consumer
    cleanup.append(("event", gg_stop))
    wait_flag(stats, GG_READY, "the GasGuard consumer")
    time.sleep(0.5)  # SUBACK
    backlog = args.backlog
    say()
    say(
        f"[2/4] running: publisher -> Mosquitto -> GasGuard consumer (pid {consumer.pid}: "
        f"ingest.consumer.Ingest, default settings, detection on) -> PostgreSQL; the "
        f"publisher stays <= {backlog} messages ahead of the consumer's commits; warm-up "
        f"{args.warmup:.0f} s, then {args.seconds:.0f} s measured; {load()}"
    )
    profiler = None
    checkpoint()
    start_publishing(stats, GG_MSGS, backlog)
    if args.profile:
        py_spy = Path(sys.executable).with_name("py-spy")
        profiler = subprocess.Popen(
            [
                str(py_spy),
                "record",
                "--pid",
                str(consumer.pid),
                "--duration",
                str(int(args.warmup + args.seconds)),
                "--format",
                "speedscope" if args.profile.endswith(".json") else "flamegraph",
                "--output",
                args.profile,
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        cleanup.append(("popen", profiler))

    def groups() -> dict[str, list[int]]:
        return {
            "consumer": [consumer.pid or 0],
            "publisher": [pub.pid or 0],
            "mosquitto": [broker.pid],
            "postgres": postgres_pids(url),
        }

    msgs0, batches0 = stats[GG_MSGS], stats[GG_BATCHES]
    gg_rate, gg_timeline, gg_cpu, gg_timers = window(
        stats, GG_READINGS, args.warmup, args.seconds, groups
    )
    stats[STATE] = IDLE
    msgs1, batches1 = stats[GG_MSGS], stats[GG_BATCHES]
    say(
        "      timeline (readings/s per 5 s; lumpy: a micro-batch commits every few seconds): "
        + ", ".join(fmt(x) for x in gg_timeline)
    )
    say(
        f"      GasGuard: {fmt(gg_rate)} readings/s; "
        f"{(msgs1 - msgs0) / max(batches1 - batches0, 1):.0f} messages per micro-batch on "
        f"average, slowest micro-batch (whole run) "
        f"{stats[GG_MAXLAT_US] / 1000:.0f} ms"
    )
    say(f"      {gg_cpu}")
    gg_stop.set()
    gg = result_of(gg_out, "the GasGuard consumer")
    say(
        "      consumer's wall time in the window: "
        + "; ".join(f"{label.strip()} {100 * gg_timers[t]:.0f}%" for label, t in TIMERS.items())
        + f" (transactions are summed over the {gg['settings']['ingest_pipeline']} micro-batches "
        "that can be in flight, so they can pass 100%; housekeeping is a task of its own)"
    )
    if gg_timers[N_HOUSEKEEP]:
        say(
            f"      housekeeping ran {gg_timers[N_HOUSEKEEP]:.0f} time(s) in the window, the "
            f"longest {stats[T_HOUSEKEEP_MAX] / 1e6:.1f} s (ingestion waits on its database lock)"
        )
    stop_child("consumer")
    if profiler is not None:
        profiler.wait(60)
        say(f"      py-spy profile of the consumer written to {args.profile}")
    forget_session(port, f"{client_id}-0")
    stored = reading_rows(url)
    batches_stored = scalar(url, "SELECT count(*) FROM ingested_batches")
    dead = scalar(url, "SELECT count(*) FROM dead_letters")
    alarms = scalar(url, "SELECT count(*) FROM alarms")
    say(
        f"      check: {stored:,} rows in the reading tables, the consumer counted "
        f"{gg['readings']:,} ({'equal' if stored == gg['readings'] else 'DIFFERENT'}); "
        f"{batches_stored:,} batch ids, {dead} dead letters, {alarms} alarms, "
        f"{gg['duplicates']} duplicates, {gg['db_errors']} database errors"
    )

    # 3. the naive peer
    nv_out = ctx.Queue()
    nv_stop = ctx.Event()
    naive = ctx.Process(target=naive_main, args=(url, port, stats, nv_stop, nv_out), name="naive")
    naive.daemon = True
    naive.start()
    CHILDREN["naive"] = naive
    cleanup.append(("event", nv_stop))
    wait_flag(stats, NV_READY, "the naive consumer")
    say()
    say(
        f"[3/4] running: publisher -> Mosquitto -> naive consumer (pid {naive.pid}: paho "
        f"callback, one INSERT per reading, autocommit) -> the same reading tables; the "
        f"publisher stays <= {args.naive_backlog} messages ahead; warm-up 2 s, then "
        f"{args.naive_seconds:.0f} s measured; {load()}"
    )
    checkpoint()
    start_publishing(stats, NV_MSGS, args.naive_backlog)

    def naive_groups() -> dict[str, list[int]]:
        return {
            "naive consumer": [naive.pid or 0],
            "publisher": [pub.pid or 0],
            "mosquitto": [broker.pid],
            "postgres": postgres_pids(url),
        }

    nv_rate, _, nv_cpu, _ = window(stats, NV_READINGS, 2.0, args.naive_seconds, naive_groups)
    stats[STATE] = IDLE
    nv_stop.set()
    naive_result = result_of(nv_out, "the naive consumer")
    stop_child("naive")
    say(
        f"      naive: {fmt(nv_rate)} readings/s ({stats[NV_ERRORS]} errors), i.e. "
        f"{1000 / max(nv_rate, 1e-9):.2f} ms per INSERT and its commit (WAL fsync)"
    )
    say(f"      {nv_cpu}")
    naive_rows = reading_rows(url) - stored
    say(
        f"      check: {naive_rows:,} rows added, the naive consumer counted {stats[NV_READINGS]:,}"
    )
    stats[STATE] = EXIT
    stop_child("publisher", 10)

    # 4. detection state for 100k devices
    say()
    say(
        f"[4/4] running: a fresh process with ingest.detection.Detection and a registry of "
        f"{args.state_devices:,} devices (nothing else); {load()}"
    )
    st_out = ctx.Queue()
    st = ctx.Process(target=state_main, args=(args.state_devices, st_out), name="state")
    st.daemon = True
    st.start()
    CHILDREN["state"] = st
    state = result_of(st_out, "the state measurement", timeout=120)
    stop_child("state")
    say(
        f"      state arrays: detector {state['detector_bytes'] / 1e6:.1f} MB + meter "
        f"{state['meter_bytes'] / 1e6:.1f} MB for capacity {state['capacity']:,} (indexed by "
        f"device key); per-device parameters {state['params_bytes'] / 1e6:.1f} MB"
    )
    say(
        f"      RSS growth: registry {mb(state['registry_rss_kb'])}, detection (state, "
        f"parameters, one fleet-wide batch) {mb(state['detection_rss_kb'])}; process peak "
        f"{mb(state['vmhwm_kb'])}; kernels alone (Detection.run, fleet-wide batches): "
        f"{fmt(state['kernel_readings_per_s'])} readings/s"
    )

    ratio = gg_rate / nv_rate if nv_rate > 0 else 0.0
    state_mb = state["state_bytes"] / 1e6
    say()
    state_ok = state_mb <= 200 and state["detection_rss_kb"] / 1024 <= 200
    rows = [
        ("machine", f"{cores} CPUs, shared by broker, database, publisher and consumers"),
        ("publisher alone", f"{fmt(pub_rate)} readings/s"),
        (
            "GasGuard consumer",
            f"{fmt(gg_rate)} readings/s over {args.seconds:.0f} s (detection on, durable)",
        ),
        (
            "naive peer",
            f"{fmt(nv_rate)} readings/s over {args.naive_seconds:.0f} s (INSERT per reading)",
        ),
        (
            "ratio GasGuard / naive",
            f"{ratio:.1f}x (goal >= 30x: {'met' if ratio >= 30 else 'NOT met'})",
        ),
        (">= 200,000 readings/s", "reached" if gg_rate >= 200_000 else "NOT reached"),
        (
            "consumer peak RSS (VmHWM)",
            f"{mb(gg['vmhwm_kb'])} ({gg['devices']:,} devices, state "
            f"{gg['state_bytes'] / 1e6:.1f} MB)",
        ),
        (
            f"state for {args.state_devices:,} devices",
            f"{state_mb:.1f} MB arrays, {mb(state['detection_rss_kb'])} RSS growth "
            f"(goal <= 200 MB: {'met' if state_ok else 'NOT met'})",
        ),
        ("detection kernels alone", f"{fmt(state['kernel_readings_per_s'])} readings/s"),
        ("naive consumer peak RSS", mb(naive_result["vmhwm_kb"])),
    ]
    say("=" * 78)
    for label, value in rows:
        say(f"{label:<32} {value}")
    say("=" * 78)


def clean(cleanup: list[Any]) -> None:
    for kind, thing in reversed(cleanup):
        try:
            if kind == "stats":
                thing[STATE] = EXIT
            elif kind == "event":
                thing.set()
            elif kind == "popen":
                if thing.poll() is None:
                    thing.terminate()
                    thing.wait(10)
            elif kind == "mosquitto":
                for name in list(CHILDREN):
                    stop_child(name, 10)
                if thing.poll() is None:
                    thing.terminate()
                    try:
                        thing.wait(10)
                    except subprocess.TimeoutExpired:
                        thing.kill()
                        thing.wait()
            elif kind == "database":
                for name in list(CHILDREN):
                    stop_child(name, 10)
                admin(f'DROP DATABASE IF EXISTS "{thing}" WITH (FORCE)')
        except Exception as exc:
            print(f"cleanup of {kind} failed: {exc}", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=20_000, help="fleet size (even)")
    parser.add_argument("--seconds", type=float, default=60.0, help="GasGuard's measured window")
    parser.add_argument("--warmup", type=float, default=None, help="before the window (s)")
    parser.add_argument("--naive-seconds", type=float, default=15.0)
    parser.add_argument("--publisher-seconds", type=float, default=5.0)
    parser.add_argument(
        "--backlog",
        type=int,
        default=3000,
        help="messages the publisher may be ahead of GasGuard's commits (receive maximum 2000 + "
        "one micro-batch of 1000)",
    )
    parser.add_argument("--naive-backlog", type=int, default=200)
    parser.add_argument("--state-devices", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--profile", metavar="FILE", help="py-spy record the consumer (.svg flamegraph, .json)"
    )
    args = parser.parse_args()
    if args.warmup is None:
        args.warmup = min(10.0, max(3.0, args.seconds / 6))

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    cleanup: list[Any] = []
    folder = Path(tempfile.mkdtemp(prefix="gasguard-bench-"))
    try:
        run(args, folder, cleanup)
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", file=sys.stderr)
        return 130
    finally:
        with contextlib.suppress(KeyboardInterrupt):
            clean(cleanup)
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
