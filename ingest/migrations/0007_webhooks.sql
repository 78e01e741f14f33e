-- The hotline's optional outbound webhook (issue 5): every ticket event is POSTed, in order, to
-- a utility's call-centre software by one hotline instance at a time (alerting/webhook.py).

-- How far the feed has gone: the last ticket_events id delivered (or skipped). One row, made by
-- the sender on its first run with the highest event id existing then: the feed starts with
-- the events created after the webhook is first enabled, not with the whole history. The row
-- is kept when the webhook is switched off, so switching it on again resumes where it stopped
-- (delete the row to start afresh from the events created after the next start).
CREATE TABLE webhook_cursor (
    one_row       boolean PRIMARY KEY DEFAULT true CHECK (one_row),
    last_event_id bigint NOT NULL CHECK (last_event_id >= 0),
    enabled_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- Every event the sender tried, so that failures are visible: a row is written at the first
-- attempt and updated at each one. Delivered: delivered_at is set (and the cursor moved past
-- it in the same transaction). Skipped: the receiver refused it permanently (a 4xx that is
-- about the request, e.g. 400 or 422) several times; the cursor moved past it, and the row
-- keeps the refusal. last_status is NULL when no answer came (timeout, connection refused).
CREATE TABLE webhook_deliveries (
    event_id         bigint PRIMARY KEY REFERENCES ticket_events (id),
    attempts         integer NOT NULL DEFAULT 1 CHECK (attempts >= 1),
    first_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_attempt_at  timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    skipped_at       timestamptz,
    last_status      integer,
    last_error       text,
    CHECK (delivered_at IS NULL OR skipped_at IS NULL)
);
CREATE INDEX webhook_deliveries_undelivered ON webhook_deliveries (last_attempt_at)
    WHERE delivered_at IS NULL;
