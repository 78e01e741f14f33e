-- Rollups on stock PostgreSQL, staged: the transaction that stores a micro-batch's readings
-- appends its per-(device, hour) figures to these unindexed tables (cheap), and a periodic
-- fold merges them into meter_hourly / detector_hourly (one upsert per device and hour per
-- fold, not per micro-batch). Both steps are transactions, so every reading still counts
-- exactly once; the dashboards' rollups trail the readings by at most one fold interval.
CREATE TABLE meter_hourly_delta (
    bucket           timestamptz NOT NULL,
    device_key       integer NOT NULL,
    min_volume_m3    double precision,
    max_volume_m3    double precision,
    max_flow_m3h     real,
    min_flow_m3h     real,
    min_pressure_kpa real,
    readings         integer NOT NULL
);

CREATE TABLE detector_hourly_delta (
    bucket      timestamptz NOT NULL,
    device_key  integer NOT NULL,
    max_ch4_lel real,
    readings    integer NOT NULL
);
