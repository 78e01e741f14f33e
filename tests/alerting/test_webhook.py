"""The outbound webhook against a real HTTP receiver: every ticket event delivered once, in order
and signed; through a failing receiver, a receiver that is down, two sending instances, a
permanent refusal, and events that commit out of id order."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from alerting.webhook import WebhookSender, is_refusal, sign, verify, webhook_status
from gasguard.backoff import Backoff
from tests.alerting.harness import running_hotline
from tests.alerting.helpers import raise_alarm
from tests.conftest import free_port
from tests.ingest.conftest import register, registry_csv
from tests.ingest.harness import scalar, wait_for

pytestmark = pytest.mark.integration
SECRET = "s3cret-for-tests"


@dataclass
class Request:
    headers: dict[str, str]
    body: bytes
    status: int  # what the receiver answered

    @property
    def event_id(self) -> int:
        return int(self.headers["X-GasGuard-Event-Id"])


class Receiver:
    """A call-centre receiver on 127.0.0.1: records every request; fails the next ``fail_next``
    with 500; refuses with 400 the events whose detail says ``refuse``; down until started."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/gasguard"
        self.requests: list[Request] = []
        self.fail_next = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def _answer(self, headers: dict[str, str], body: bytes) -> int:
        with self._lock:
            status = 200
            if json.loads(body)["detail"].get("refuse"):
                status = 400
            elif self.fail_next > 0:
                self.fail_next, status = self.fail_next - 1, 500
            self.requests.append(Request(headers, body, status))  # before the answer is sent
            return status

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(receiver._answer(dict(self.headers), body))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def accepted(self) -> list[int]:
        """The event ids answered with 200, in arrival order."""
        with self._lock:
            return [r.event_id for r in self.requests if r.status == 200]

    def sent(self, event_id: int) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.event_id == event_id]


class SenderThread:
    """A sender running in a thread with its own event loop, as the test's stand-in for a
    hotline instance; stop() cancels it as the service's shutdown does."""

    def __init__(self, sender: WebhookSender) -> None:
        self.sender = sender
        self.loop = asyncio.new_event_loop()
        self.task: asyncio.Task[None] | None = None
        self.error: BaseException | None = None
        started = threading.Event()

        async def main() -> None:
            self.task = asyncio.current_task()
            started.set()
            await sender.run()

        def run() -> None:
            try:
                self.loop.run_until_complete(main())
            except asyncio.CancelledError:
                pass
            except BaseException as exc:
                self.error = exc
            finally:
                self.loop.close()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert started.wait(10), "sender did not start"

    def stop(self) -> None:
        if self.thread.is_alive() and self.task is not None:
            self.loop.call_soon_threadsafe(self.task.cancel)
        self.thread.join(10)
        assert not self.thread.is_alive(), "sender did not stop"
        assert self.error is None, self.error


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.stop()


@pytest.fixture
def start_sender(database: str, receiver: Receiver) -> Iterator[Callable[[], WebhookSender]]:
    threads: list[SenderThread] = []

    def start() -> WebhookSender:
        sender = WebhookSender(database, receiver.url, SECRET, timeout_s=2.0, poll_s=0.05,
                               lock_retry_s=0.1, backoff=Backoff(base=0.02, cap=0.1))  # fmt: skip
        threads.append(SenderThread(sender))
        return sender

    yield start
    for t in threads:
        t.stop()


def new_ticket(conn: psycopg.Connection[Any], status: str = "new") -> int:
    return scalar_in(conn, "INSERT INTO tickets (category, priority, cause, source, owner, status, resolve_due) "
                           "VALUES ('inspection', 'normal', 'device_silent', 'call', 'ct-1', %s, now() + interval '1 day') "
                           "RETURNING id", (status,))  # fmt: skip


def new_event(conn: psycopg.Connection[Any], ticket: int, kind: str = "note", **detail: Any) -> int:
    return scalar_in(conn, "INSERT INTO ticket_events (ticket_id, actor, kind, detail) VALUES (%s, 'ct-1', %s, %s) RETURNING id",
                     (ticket, kind, Jsonb(detail)))  # fmt: skip


def scalar_in(conn: psycopg.Connection[Any], sql: str, params: Any) -> int:
    row = conn.execute(sql.encode(), params).fetchone()
    assert row is not None
    return int(row[0])


def cursor_at(database: str, event_id: int) -> Callable[[], bool]:
    return lambda: scalar(database, "SELECT last_event_id FROM webhook_cursor") == event_id


def status_of(database: str) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
            return await webhook_status(conn)

    return asyncio.run(run())


def test_every_event_is_delivered_once_in_order_and_signed(database: str, receiver: Receiver, start_sender: Callable[[], WebhookSender]) -> None:  # fmt: skip
    receiver.start()
    with psycopg.connect(database, autocommit=True) as conn:
        before = new_event(conn, new_ticket(conn), "opened")  # before the webhook was enabled
        sender = start_sender()
        wait_for(lambda: sender.active, 10, "sender active")
        tickets = [new_ticket(conn, "acknowledged"), new_ticket(conn)]
        ids = [new_event(conn, tickets[i % 2], f"kind-{i}", n=i) for i in range(20)]
    wait_for(cursor_at(database, ids[-1]), 10, "all delivered")
    assert receiver.accepted() == ids and before not in receiver.accepted()
    for i, r in enumerate(receiver.requests):
        body = json.loads(r.body)
        ts, signature = r.headers["X-GasGuard-Timestamp"], r.headers["X-GasGuard-Signature"]
        assert verify(SECRET, ts, r.body, signature), r.headers
        assert not verify("another secret", ts, r.body, signature)
        assert not verify(SECRET, ts, r.body + b" ", signature)
        assert body["event_id"] == r.event_id == ids[i] and body["detail"] == {"n": i}
        assert (body["ticket_id"], body["kind"]) == (tickets[i % 2], f"kind-{i}")
        assert body["actor"] == "ct-1"
        assert body["ticket"]["id"] == tickets[i % 2] and body["ticket"]["category"] == "inspection"
        assert body["ticket"]["status"] == ("acknowledged" if i % 2 == 0 else "new") and body["at"]
    once = "SELECT count(*) FROM webhook_deliveries WHERE attempts = 1 AND delivered_at IS NOT NULL"
    assert scalar(database, once) == 20
    status = status_of(database)
    assert (status["cursor"], status["pending"], status["failures"]) == (ids[-1], 0, [])
    assert (sender.delivered, sender.failed_attempts, sender.last_error) == (20, 0, None)


def test_a_failing_receiver_gets_the_event_after_retries_and_once(database: str, receiver: Receiver, start_sender: Callable[[], WebhookSender]) -> None:  # fmt: skip
    receiver.start()
    sender = start_sender()
    wait_for(lambda: sender.active, 10, "sender active")
    receiver.fail_next = 2
    with psycopg.connect(database, autocommit=True) as conn:
        ticket = new_ticket(conn)
        first = new_event(conn, ticket)
        wait_for(cursor_at(database, first), 10, "delivered after retries")
        second = new_event(conn, ticket)  # and the first is not sent again meanwhile
    wait_for(cursor_at(database, second), 10, "second delivered")
    assert [r.status for r in receiver.sent(first)] == [500, 500, 200]
    assert receiver.accepted() == [first, second]
    with psycopg.connect(database) as conn:
        row = conn.execute("SELECT attempts, last_status, last_error, delivered_at IS NOT NULL "
                           "FROM webhook_deliveries WHERE event_id = %s", (first,)).fetchone()  # fmt: skip
    assert row == (3, 200, None, True)
    assert (sender.delivered, sender.failed_attempts) == (2, 2)
    assert sender.last_error is not None and "HTTP 500" in sender.last_error


def test_nothing_is_lost_while_the_receiver_is_down(database: str, receiver: Receiver, start_sender: Callable[[], WebhookSender]) -> None:  # fmt: skip
    sender = start_sender()  # the receiver is not started yet
    wait_for(lambda: sender.active, 10, "sender active")
    with psycopg.connect(database, autocommit=True) as conn:
        ticket = new_ticket(conn)
        ids = [new_event(conn, ticket) for _ in range(5)]

    def retried() -> bool:
        failures = status_of(database)["failures"]
        return bool(failures) and failures[0]["attempts"] >= 3

    wait_for(retried, 10, "retries against a receiver that is down")
    failure = status_of(database)["failures"][0]
    assert failure["event_id"] == ids[0] and failure["last_status"] is None, failure
    assert "ConnectError" in failure["last_error"] and status_of(database)["pending"] == 5
    assert scalar(database, "SELECT count(*) FROM webhook_deliveries") == 1, "order is kept"
    receiver.start()
    wait_for(cursor_at(database, ids[-1]), 10, "delivered once the receiver is up")
    assert receiver.accepted() == ids and len(receiver.requests) == 5


def test_two_senders_deliver_each_event_once(database: str, receiver: Receiver, start_sender: Callable[[], WebhookSender]) -> None:  # fmt: skip
    receiver.start()
    senders = [start_sender(), start_sender()]
    wait_for(lambda: any(s.active for s in senders), 10, "one sender active")
    with psycopg.connect(database, autocommit=True) as conn:
        tickets = [new_ticket(conn) for _ in range(3)]
        ids = [new_event(conn, tickets[i % 3]) for i in range(30)]
        wait_for(cursor_at(database, ids[-1]), 10, "all delivered")
        assert sum(s.active for s in senders) == 1 and sum(s.delivered for s in senders) == 30
        active = next(s for s in senders if s.active)
        standby = next(s for s in senders if not s.active)
        assert standby.polls == 0 and standby.cursor is None
        with psycopg.connect(database, autocommit=True) as other:  # the active one goes away
            other.execute("SELECT pg_terminate_backend(l.pid) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
                          "WHERE l.locktype = 'advisory' AND l.granted AND d.datname = current_database()")  # fmt: skip
        wait_for(lambda: standby.active, 10, "the other sender takes over")
        ids += [new_event(conn, tickets[0]) for _ in range(5)]
    wait_for(cursor_at(database, ids[-1]), 10, "delivered after the take-over")
    assert receiver.accepted() == ids, "each event once, in order"
    assert standby.delivered == 5 and active.delivered == 30


def test_a_permanent_refusal_is_recorded_and_skipped(database: str, receiver: Receiver, start_sender: Callable[[], WebhookSender],
                                                      caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    caplog.set_level(logging.INFO, logger="alerting.webhook")
    receiver.start()
    sender = start_sender()
    wait_for(lambda: sender.active, 10, "sender active")
    with psycopg.connect(database, autocommit=True) as conn:
        ticket = new_ticket(conn)
        bad = new_event(conn, ticket, refuse=True)
        good = new_event(conn, ticket)
    wait_for(cursor_at(database, good), 10, "the event after the refused one delivered")
    assert [r.status for r in receiver.sent(bad)] == [400] * 5 and receiver.accepted() == [good]
    status = status_of(database)
    assert (status["cursor"], status["pending"], len(status["failures"])) == (good, 0, 1)
    failure = status["failures"][0]
    assert (failure["event_id"], failure["attempts"], failure["last_status"]) == (bad, 5, 400)
    assert failure["skipped_at"] is not None and failure["last_error"].startswith("HTTP 400")
    errors = [
        r for r in caplog.records if r.name == "alerting.webhook" and r.levelno >= logging.ERROR
    ]
    assert len(errors) == 1 and f"refused event {bad}" in errors[0].getMessage(), errors
    assert sender.skipped == 1 and sender.delivered == 1


def test_an_event_committed_after_a_later_one_is_not_lost(database: str, receiver: Receiver, start_sender: Callable[[], WebhookSender]) -> None:  # fmt: skip
    receiver.start()
    sender = start_sender()
    wait_for(lambda: sender.active, 10, "sender active")
    with psycopg.connect(database, autocommit=True) as conn, psycopg.connect(database) as slow:
        ticket = new_ticket(conn)
        early = new_event(slow, ticket)  # takes its id, commits later
        late = new_event(conn, ticket)
        polls = sender.polls
        wait_for(lambda: sender.polls >= polls + 10, 10, "a few polls")
        assert receiver.accepted() == [], "nothing passes a gap that an open transaction may fill"
        slow.commit()
        wait_for(cursor_at(database, late), 10, "both delivered")
        assert receiver.accepted() == [early, late]
        rolled_back = new_event(slow, ticket)
        after = new_event(conn, ticket)
        slow.rollback()
        wait_for(cursor_at(database, after), 10, "delivered past the gap of a rollback")
    assert receiver.accepted() == [early, late, after] and rolled_back not in receiver.accepted()


@pytest.mark.parametrize(("status", "refusal"), [(400, True), (422, True), (401, False), (404, False), (408, False), (429, False), (500, False), (302, False)])  # fmt: skip
def test_which_answers_are_permanent_refusals(status: int, refusal: bool) -> None:
    assert is_refusal(status) is refusal


def test_verify_refuses_old_and_malformed_timestamps() -> None:
    body = b'{"event_id": 1}'
    assert verify(SECRET, "1000", body, sign(SECRET, "1000", body), now=1200)
    assert not verify(SECRET, "1000", body, sign(SECRET, "1000", body), now=1301)
    assert not verify(SECRET, "1000", body, sign(SECRET, "1000", body), now=699)
    assert not verify(SECRET, "soon", body, sign(SECRET, "soon", body))
    assert not verify(SECRET, "1000", body, "sha256=zz\u00e9", now=1000)
    assert sign(SECRET, "1000", body).startswith("sha256=") and len(sign(SECRET, "1", b"")) == 71


def test_the_hotline_service_pushes_its_ticket_changes(
    database: str, receiver: Receiver, tmp_path: Path
) -> None:
    """Wired into the service: an alarm's ticket and a dispatcher's acknowledgement reach the
    call-centre software, signed, and the status endpoint shows the progress."""
    register(database, registry_csv(tmp_path / "r.csv", "GW-1", 2, 2))
    receiver.start()
    with running_hotline(
        database, hotline_webhook_url=receiver.url, hotline_webhook_secret=SECRET
    ) as hotline:
        wait_for(
            lambda: hotline.client("admin").get("/api/webhook").json().get("active") is True,
            15,
            "sender active",
        )
        raise_alarm(database, "M-0001", "burst", "critical")
        wait_for(lambda: len(receiver.accepted()) >= 2, 15, "opened + valve_requested delivered")
        tid = json.loads(receiver.requests[0].body)["ticket_id"]
        hotline.client("dispatcher").post(f"/api/tickets/{tid}/acknowledge")
        wait_for(lambda: len(receiver.accepted()) >= 3, 15, "acknowledge delivered")
        kinds = [json.loads(r.body)["kind"] for r in receiver.requests if r.status == 200]
        assert kinds == ["opened", "valve_requested", "acknowledge"]
        last = receiver.requests[-1]
        assert verify(
            SECRET,
            last.headers["X-GasGuard-Timestamp"],
            last.body,
            last.headers["X-GasGuard-Signature"],
        )
        status = hotline.client("engineer").get("/api/webhook").json()
        assert status["enabled"] and status["delivered"] == 3
        assert hotline.client("dispatcher").get("/api/webhook").status_code == 403


def test_an_event_holding_a_number_past_64_bits_is_delivered_and_the_next_ones_too(database: str, receiver: Receiver, start_sender: Callable[[], WebhookSender]) -> None:  # fmt: skip
    """jsonb keeps 1e300 as a 301-digit integer, which orjson refuses to encode."""
    receiver.start()
    with psycopg.connect(database, autocommit=True) as conn:
        sender = start_sender()
        wait_for(lambda: sender.active, 10, "sender active")
        ticket = new_ticket(conn)
        huge = scalar_in(conn, "INSERT INTO ticket_events (ticket_id, actor, kind, detail) "
                               "VALUES (%s, 'ingest', 'opened', '{\"value\": 1e300}') RETURNING id",
                         (ticket,))  # fmt: skip
        after = new_event(conn, ticket, "note", n=1)
    wait_for(cursor_at(database, after), 10, "both delivered")
    assert receiver.accepted() == [huge, after]
    assert json.loads(receiver.requests[0].body)["detail"]["value"] == 10**300


def test_an_event_that_cannot_be_sent_is_skipped_with_its_error_and_the_feed_goes_on(database: str, receiver: Receiver, start_sender: Callable[[], WebhookSender], monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    receiver.start()
    real_post = WebhookSender._post
    broken: list[int] = []

    async def post(self: WebhookSender, http: Any, event: dict[str, Any]) -> Any:
        if event["event_id"] in broken:
            raise ValueError("a bug on this event")
        return await real_post(self, http, event)

    monkeypatch.setattr(WebhookSender, "_post", post)
    with psycopg.connect(database, autocommit=True) as conn:
        sender = start_sender()
        wait_for(lambda: sender.active, 10, "sender active")
        ticket = new_ticket(conn)
        with conn.transaction():  # both committed at once: the broken one is seen first
            broken.append(new_event(conn, ticket, "note", n=0))
            after = new_event(conn, ticket, "note", n=1)
    wait_for(cursor_at(database, after), 10, "past the broken event")
    assert receiver.accepted() == [after]
    failure = status_of(database)["failures"][0]
    assert failure["event_id"] == broken[0] and failure["skipped_at"] is not None
    assert "ValueError: a bug on this event" in failure["last_error"]
    assert sender.skipped == 1
