-- Readings with TimescaleDB: hypertables with one-day chunks, compressed after 7 days.
-- Keep this file small and reviewed: it is the Timescale-only SQL.
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
);
SELECT create_hypertable('detector_readings', 'ts', chunk_time_interval => INTERVAL '1 day');
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
);
SELECT create_hypertable('meter_readings', 'ts', chunk_time_interval => INTERVAL '1 day');
CREATE INDEX meter_readings_device_ts ON meter_readings (device_key, ts);

ALTER TABLE detector_readings SET (timescaledb.compress, timescaledb.compress_segmentby = 'device_key');
ALTER TABLE meter_readings SET (timescaledb.compress, timescaledb.compress_segmentby = 'device_key');
SELECT add_compression_policy('detector_readings', INTERVAL '7 days');
SELECT add_compression_policy('meter_readings', INTERVAL '7 days');
SELECT add_retention_policy('detector_readings', INTERVAL '400 days');
SELECT add_retention_policy('meter_readings', INTERVAL '400 days');
