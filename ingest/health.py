"""Ingest health: Prometheus figures at /metrics, and a row in ``ingest_health`` every few
seconds for the ingest-health dashboard."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

import psycopg
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from ingest.settings import IngestSettings

log = logging.getLogger(__name__)


class Health:
    def __init__(self, settings: IngestSettings) -> None:
        self.settings = settings
        self.registry = CollectorRegistry()
        r = self.registry
        self.readings = Counter("gasguard_ingest_readings", "readings stored", registry=r)
        self.messages = Counter("gasguard_ingest_messages", "MQTT messages processed", registry=r)
        self.duplicates = Counter(
            "gasguard_ingest_duplicate_batches",
            "redelivered or replayed batches skipped",
            registry=r,
        )
        self.dead_letters = Counter(
            "gasguard_ingest_dead_letters", "messages dead-lettered", registry=r
        )
        self.repeated_readings = Counter(
            "gasguard_ingest_repeated_readings",
            "readings stored before (same device and ts) under another batch id: not stored "
            "or judged again",
            registry=r,
        )
        self.batch_errors = Counter(
            "gasguard_ingest_unexpected_errors",
            "batches dead-lettered and periodic jobs failed for an unexpected error",
            registry=r,
        )
        self.alarms_raised = Counter("gasguard_ingest_alarms_raised", "alarms raised", registry=r)
        self.alarms_flapping = Counter(
            "gasguard_ingest_alarms_flapping",
            "alarms cleared within a minute of being raised (their time stamps)",
            registry=r,
        )
        self.db_errors = Counter(
            "gasguard_ingest_db_errors", "database failures (retried)", registry=r
        )
        self.lag = Gauge(
            "gasguard_ingest_lag_seconds",
            "now minus the newest reading's time at commit",
            registry=r,
        )
        self.inbox = Gauge(
            "gasguard_ingest_inbox_messages", "received, not yet processed", registry=r
        )
        self.latency = Histogram(
            "gasguard_ingest_batch_latency_seconds",
            "one micro-batch, decode to commit",
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self._server: object | None = None
        self._last = (time.monotonic(), 0.0)
        self._last_latency = 0.0

    def start(self) -> None:
        port = self.settings.ingest_metrics_port
        if port:
            self._server = start_http_server(
                port, addr=self.settings.ingest_metrics_host, registry=self.registry
            )
            log.info("metrics on http://%s:%d/metrics", self.settings.ingest_metrics_host, port)

    def stop(self) -> None:
        server = self._server
        if server is not None:
            server[0].shutdown()  # type: ignore[index]
            self._server = None

    def batch_done(self, messages: int, dead: int, latency_s: float, newest_ms: int | None) -> None:
        self.messages.inc(messages)
        self.latency.observe(latency_s)
        self._last_latency = latency_s
        if newest_ms is not None:
            self.lag.set(max(0.0, time.time() - newest_ms / 1000))

    async def write(self, conn: psycopg.AsyncConnection[Any], consumer: str, inbox: int) -> None:
        self.inbox.set(inbox)
        now, total = time.monotonic(), self.readings._value.get()
        then, before = self._last
        self._last = (now, total)
        rate = (total - before) / max(now - then, 1e-9)
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO ingest_health (at, consumer, readings_per_s, lag_s, "
                "batch_latency_ms, readings_total, dead_letters, alarms_raised) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    datetime.now(UTC),
                    consumer,
                    rate,
                    self.lag._value.get(),
                    self._last_latency * 1000,
                    int(total),
                    int(self.dead_letters._value.get()),
                    int(self.alarms_raised._value.get()),
                ),
            )
