"""The hotline's figures for Prometheus (``GET /metrics``): what its background tasks did,
what they could not do (rows ticketed as unreadable, events skipped, results ignored) and how
often the supervisor had to start a task again. Read from the running tasks at each scrape."""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE_LATEST", "prometheus_text"]


class _Hotline(Collector):
    def __init__(self, state: Any) -> None:
        self._state = state

    def collect(self) -> Any:
        state = self._state
        outbox, feed = state.outbox, state.feed
        escalator = getattr(state, "escalator", None)
        webhook, supervisor = state.webhook, state.supervisor
        counters: list[tuple[str, str, float]] = [
            ("outbox_rows", "alarm outbox rows taken", outbox.rows),
            ("outbox_rows_failed", "outbox rows that could not be applied (ticketed as "
             "unreadable)", outbox.failed),
            ("tickets_opened_from_alarms", "tickets opened by the outbox", outbox.opened),
            ("alarms_during_cooldown", "alarms recorded on a ticket resolved moments before "
             "(its cool-down) instead of opening one", outbox.cooled),
            ("live_events", "ticket events announced to the live feed", feed.events),
            ("live_event_errors", "announcements the live feed could not handle", feed.errors),
        ]  # fmt: skip
        if escalator is not None:
            counters += [
                ("escalations", "tickets escalated", escalator.escalated),
                ("escalation_scans_failed", "escalation scans that failed",
                 escalator.failed_scans),
            ]  # fmt: skip
        if webhook is not None:
            counters += [
                ("webhook_delivered", "ticket events delivered to the webhook", webhook.delivered),
                ("webhook_skipped", "ticket events skipped by the webhook", webhook.skipped),
            ]
        bridge = getattr(state, "valve_bridge", None)
        if bridge is not None:
            counters += [
                ("valve_commands_sent", "valve commands sent", bridge.sent),
                ("valve_results_ignored", "valve results that could not be recorded",
                 bridge.malformed),
            ]  # fmt: skip
        for name, doc, value in counters:
            yield CounterMetricFamily(f"gasguard_hotline_{name}", doc, value=value)
        restarts = CounterMetricFamily("gasguard_hotline_task_restarts",
                                       "background tasks started again after they stopped",
                                       labels=["task"])  # fmt: skip
        down = GaugeMetricFamily("gasguard_hotline_task_down",
                                 "1 while a background task is down", labels=["task"])  # fmt: skip
        for task, count in sorted(supervisor.restarts.items()):
            restarts.add_metric([task], count)
            down.add_metric([task], 1.0 if task in supervisor.down else 0.0)
        yield restarts
        yield down


def prometheus_text(state: Any) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Hotline(state))
    return generate_latest(registry)
