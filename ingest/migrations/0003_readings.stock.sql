-- Readings on stock PostgreSQL: native range partitions by day (created ahead of time by
-- ingest, dropped by its retention job). No unique index: idempotency is per batch.
CREATE TABLE detector_readings (
    ts           timestamptz NOT NULL,
    device_key   integer NOT NULL,
    ch4_lel      real,
    alarm        boolean,
    fault        boolean,
    valve_closed boolean,
    eol          boolean,
    temp_c       real,
    comm_lost    boolean NOT NULL DEFAULT false
) PARTITION BY RANGE (ts);
CREATE INDEX detector_readings_device_ts ON detector_readings (device_key, ts);

CREATE TABLE meter_readings (
    ts           timestamptz NOT NULL,
    device_key   integer NOT NULL,
    volume_m3    double precision,
    flow_m3h     real,
    pressure_kpa real,
    valve_closed boolean,
    battery_pct  real,
    tamper       boolean,
    reverse_flow boolean,
    comm_lost    boolean NOT NULL DEFAULT false
) PARTITION BY RANGE (ts);
CREATE INDEX meter_readings_device_ts ON meter_readings (device_key, ts);
