-- What ingest keeps besides readings: batch ids (idempotency per (gw, seq)), dead letters,
-- alarms with their outbox for the alerting service, detection state, health figures.
CREATE TABLE ingested_batches (
    gw          text NOT NULL,
    seq         bigint NOT NULL,
    readings    integer NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (gw, seq)
);

CREATE TABLE dead_letters (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at timestamptz NOT NULL DEFAULT now(),
    topic       text NOT NULL,
    payload     bytea NOT NULL,
    field       text,
    reason      text NOT NULL
);
CREATE INDEX dead_letters_received ON dead_letters (received_at);

CREATE TABLE alarms (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_key   integer NOT NULL REFERENCES devices (key),
    device_id    text NOT NULL,
    household_id text NOT NULL,
    district     text NOT NULL,
    rule         text NOT NULL,
    severity     text NOT NULL CHECK (severity IN ('critical', 'major', 'minor')),
    confidence   text NOT NULL DEFAULT 'normal' CHECK (confidence IN ('normal', 'high')),
    test_mode    boolean NOT NULL DEFAULT false,
    raised_at    timestamptz NOT NULL,
    cleared_at   timestamptz,
    raise_value  double precision,
    clear_value  double precision,
    created_at   timestamptz NOT NULL DEFAULT now()
);
-- one open alarm per (device, rule)
CREATE UNIQUE INDEX alarms_one_open ON alarms (device_key, rule) WHERE cleared_at IS NULL;
CREATE INDEX alarms_household_open ON alarms (household_id) WHERE cleared_at IS NULL;
CREATE INDEX alarms_raised ON alarms (raised_at);

-- The alerting service takes rows with FOR UPDATE SKIP LOCKED and marks them done in the
-- transaction that writes the ticket.
CREATE TABLE alarm_outbox (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    alarm_id   bigint NOT NULL REFERENCES alarms (id),
    event      text NOT NULL CHECK (event IN ('raised', 'cleared', 'confidence')),
    payload    jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    done_at    timestamptz
);
CREATE INDEX alarm_outbox_pending ON alarm_outbox (id) WHERE done_at IS NULL;

-- District network incidents (many meters of a district with low pressure at once).
CREATE TABLE district_incidents (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    district   text NOT NULL,
    rule       text NOT NULL,
    opened_at  timestamptz NOT NULL,
    closed_at  timestamptz,
    households integer NOT NULL
);
CREATE UNIQUE INDEX district_incidents_one_open ON district_incidents (district, rule)
    WHERE closed_at IS NULL;

-- Detection state per consumer shard and device kind, saved every few seconds, so that a
-- restarted consumer still sees a leak that began before it stopped.
CREATE TABLE detection_state (
    shard    text NOT NULL,
    kind     text NOT NULL CHECK (kind IN ('detector', 'meter')),
    saved_at timestamptz NOT NULL DEFAULT now(),
    state    bytea NOT NULL,
    PRIMARY KEY (shard, kind)
);

CREATE TABLE ingest_health (
    at               timestamptz NOT NULL,
    consumer         text NOT NULL,
    readings_per_s   real NOT NULL,
    lag_s            real,
    batch_latency_ms real,
    readings_total   bigint NOT NULL,
    dead_letters     bigint NOT NULL,
    alarms_raised    bigint NOT NULL,
    PRIMARY KEY (consumer, at)
);
