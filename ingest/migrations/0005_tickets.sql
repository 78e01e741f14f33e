-- The hotline's tickets (issue 5, first slice): one ticket system for automatic alarms and
-- phone calls. A ticket has one owner from first contact, a published service-time promise
-- and a full event history. Automatic alarms arrive through alarm_outbox.
CREATE TABLE service_times (
    category        text PRIMARY KEY,
    on_site_minutes integer,          -- promised arrival (emergency repair: 30 minutes)
    resolve_minutes integer NOT NULL  -- promised resolution
);
INSERT INTO service_times (category, on_site_minutes, resolve_minutes) VALUES
    ('emergency_repair', 30, 240),
    ('inspection', NULL, 1440),
    ('complaint', NULL, 1440),
    ('enquiry', NULL, 480),
    ('installation', NULL, 7200),
    ('engineering', 120, 480),
    ('chasing', NULL, 480);

CREATE TABLE tickets (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    category      text NOT NULL REFERENCES service_times (category),
    priority      text NOT NULL CHECK (priority IN ('critical', 'high', 'normal', 'low')),
    household_id  text REFERENCES households (id),
    device_id     text,
    cause         text NOT NULL,
    source        text NOT NULL CHECK (source IN ('alarm', 'call')),
    department    text,
    owner         text NOT NULL,
    status        text NOT NULL DEFAULT 'new' CHECK (status IN
                  ('new', 'acknowledged', 'dispatched', 'on_site', 'resolved', 'closed', 'cancelled')),
    cancel_reason text,
    test_mode     boolean NOT NULL DEFAULT false,
    repeats       integer NOT NULL DEFAULT 0,
    confidence    text NOT NULL DEFAULT 'normal',
    opened_at     timestamptz NOT NULL DEFAULT now(),
    on_site_due   timestamptz,
    resolve_due   timestamptz NOT NULL,
    CHECK ((status = 'cancelled') = (cancel_reason IS NOT NULL))
);
-- one open ticket per (household, cause): repeats append to it
CREATE UNIQUE INDEX tickets_one_open ON tickets (household_id, cause)
    WHERE status NOT IN ('resolved', 'closed', 'cancelled');

CREATE TABLE ticket_events (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ticket_id bigint NOT NULL REFERENCES tickets (id),
    at        timestamptz NOT NULL DEFAULT now(),
    actor     text NOT NULL,
    kind      text NOT NULL,
    alarm_id  bigint REFERENCES alarms (id),
    outbox_id bigint UNIQUE REFERENCES alarm_outbox (id),  -- an outbox row has one effect
    detail    jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX ticket_events_ticket ON ticket_events (ticket_id, at);
