-- The hotline service (issue 5): people and their access, the ticket life cycle, storms as
-- district incidents, silences for test and maintenance, valve commands, and the live feed.

-- Users with one role each; passwords hashed with argon2; bearer tokens stored as sha256.
CREATE TABLE users (
    username      text PRIMARY KEY CHECK (username ~ '^[a-z0-9._-]{2,64}$'),
    display_name  text NOT NULL CHECK (length(display_name) BETWEEN 1 AND 128),
    role          text NOT NULL CHECK (role IN
                  ('dispatcher', 'call_taker', 'engineer', 'technician', 'admin')),
    password_hash text NOT NULL,
    active        boolean NOT NULL DEFAULT true,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_tokens (
    token_sha256 bytea PRIMARY KEY,  -- the token itself is never stored
    username     text NOT NULL REFERENCES users (username),
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    revoked_at   timestamptz
);

-- Every change made by a person or by the service: who, when, what.
CREATE TABLE audit_log (
    id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at     timestamptz NOT NULL DEFAULT now(),
    actor  text NOT NULL,
    action text NOT NULL,
    target text,
    detail jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_at ON audit_log (at);

-- A storm (many alarms of one cause in one district within minutes) becomes one incident with
-- its own ticket; the household tickets under it are attached to it and kept out of the queue.
CREATE TABLE incidents (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    district   text NOT NULL,
    cause      text NOT NULL,
    opened_at  timestamptz NOT NULL DEFAULT now(),
    closed_at  timestamptz,
    households integer NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX incidents_one_open ON incidents (district, cause) WHERE closed_at IS NULL;

-- A device or household in test or maintenance mode: its tickets are marked test and never
-- dispatched, so a technician's test never sends a crew.
CREATE TABLE silences (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    household_id text REFERENCES households (id),
    device_id    text REFERENCES devices (id),
    reason       text NOT NULL CHECK (length(reason) BETWEEN 1 AND 500),
    created_by   text NOT NULL,
    starts_at    timestamptz NOT NULL DEFAULT now(),
    ends_at      timestamptz NOT NULL,
    lifted_at    timestamptz,
    CHECK ((household_id IS NULL) <> (device_id IS NULL)),
    CHECK (ends_at > starts_at)
);
CREATE INDEX silences_active ON silences (household_id, device_id) WHERE lifted_at IS NULL;

ALTER TABLE tickets
    ADD COLUMN district          text,
    ADD COLUMN summary           text NOT NULL DEFAULT '',
    ADD COLUMN caller_name       text,
    ADD COLUMN caller_phone      text,
    ADD COLUMN crew              text,
    ADD COLUMN incident_id       bigint REFERENCES incidents (id),
    ADD COLUMN is_incident       boolean NOT NULL DEFAULT false,
    ADD COLUMN inhibited         boolean NOT NULL DEFAULT false,  -- held under an incident
    ADD COLUMN escalation_level  integer NOT NULL DEFAULT 0,
    ADD COLUMN notified_at       timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN acknowledged_at   timestamptz,
    ADD COLUMN dispatched_at     timestamptz,
    ADD COLUMN on_site_at        timestamptz,
    ADD COLUMN resolved_at       timestamptz,
    ADD COLUMN closed_at         timestamptz,
    ADD COLUMN on_site_breached  boolean NOT NULL DEFAULT false,
    ADD COLUMN resolve_breached  boolean NOT NULL DEFAULT false,
    ADD COLUMN valve_state       text,  -- as last reported by a valve command's result
    ADD COLUMN updated_at        timestamptz NOT NULL DEFAULT now();
ALTER TABLE tickets DROP CONSTRAINT tickets_source_check;
ALTER TABLE tickets ADD CONSTRAINT tickets_source_check
    CHECK (source IN ('alarm', 'call', 'incident'));
-- an incident ticket has no household; its own key is (district, cause)
CREATE UNIQUE INDEX tickets_one_open_incident ON tickets (district, cause)
    WHERE is_incident AND status NOT IN ('resolved', 'closed', 'cancelled');
CREATE INDEX tickets_open_queue ON tickets (status, priority)
    WHERE status NOT IN ('resolved', 'closed', 'cancelled');
CREATE INDEX tickets_incident ON tickets (incident_id) WHERE incident_id IS NOT NULL;
CREATE INDEX tickets_opened ON tickets (opened_at);
CREATE INDEX households_phone ON households (phone);

-- Valve commands sent to a gateway for a ticket; the id is the MQTT command id, so a resend
-- is harmless (the gateway keeps results by command id).
CREATE TABLE valve_commands (
    id           text PRIMARY KEY,
    ticket_id    bigint NOT NULL REFERENCES tickets (id),
    device_id    text NOT NULL REFERENCES devices (id),
    gateway_id   text NOT NULL REFERENCES gateways (id),
    action       text NOT NULL CHECK (action IN ('close_valve', 'open_valve')),
    requested_by text NOT NULL,
    requested_at timestamptz NOT NULL DEFAULT now(),
    sent_at      timestamptz,
    status       text NOT NULL DEFAULT 'pending' CHECK (status IN
                 ('pending', 'sent', 'done', 'failed', 'timeout')),
    reason       text,
    result_at    timestamptz
);
CREATE INDEX valve_commands_open ON valve_commands (status) WHERE status IN ('pending', 'sent');
CREATE INDEX valve_commands_ticket ON valve_commands (ticket_id);

-- The live feed: every ticket event is announced to listening hotline instances, and every
-- outbox row wakes the instances that take them (a poll remains as the fallback).
CREATE FUNCTION gasguard_notify_ticket_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('gasguard_ticket_events',
                      json_build_object('id', NEW.id, 'ticket', NEW.ticket_id,
                                        'kind', NEW.kind)::text);
    RETURN NULL;
END $$;
CREATE TRIGGER ticket_events_notify AFTER INSERT ON ticket_events
    FOR EACH ROW EXECUTE FUNCTION gasguard_notify_ticket_event();

CREATE FUNCTION gasguard_notify_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('gasguard_outbox', '');
    RETURN NULL;
END $$;
CREATE TRIGGER alarm_outbox_notify AFTER INSERT ON alarm_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION gasguard_notify_outbox();
