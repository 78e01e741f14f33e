-- Rollups for the dashboards on stock PostgreSQL: plain tables that ingest keeps up to date
-- in the transaction that stores the readings (merging each micro-batch's per-hour figures;
-- batch ids make it exactly once). Same names and columns as the Timescale continuous
-- aggregates, so the same queries work on both.
CREATE TABLE meter_hourly (
    bucket     timestamptz NOT NULL,
    device_key integer NOT NULL,
    min_volume_m3  double precision,
    max_volume_m3  double precision,
    consumption_m3 double precision GENERATED ALWAYS AS
        (coalesce(max_volume_m3 - min_volume_m3, 0)) STORED,
    max_flow_m3h   real,
    min_flow_m3h   real,
    min_pressure_kpa real,
    readings   integer NOT NULL,
    PRIMARY KEY (device_key, bucket)
);

CREATE TABLE detector_hourly (
    bucket      timestamptz NOT NULL,
    device_key  integer NOT NULL,
    max_ch4_lel real,
    readings    integer NOT NULL,
    PRIMARY KEY (device_key, bucket)
);

CREATE VIEW district_daily AS
SELECT date_trunc('day', m.bucket) AS day, h.district,
       sum(m.consumption_m3) AS consumption_m3, count(DISTINCT m.device_key) AS meters
FROM meter_hourly m
JOIN devices d ON d.key = m.device_key
JOIN households h ON h.id = d.household_id
GROUP BY 1, 2;
