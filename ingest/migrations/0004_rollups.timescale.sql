-- Rollups with TimescaleDB: continuous aggregates with refresh policies. Same names and
-- columns as the stock tables. consumption = max - min of the volume register in the hour
-- (the register only counts forward).
CREATE MATERIALIZED VIEW meter_hourly WITH (timescaledb.continuous) AS
SELECT time_bucket(INTERVAL '1 hour', ts) AS bucket, device_key,
       min(volume_m3) AS min_volume_m3, max(volume_m3) AS max_volume_m3,
       coalesce(max(volume_m3) - min(volume_m3), 0) AS consumption_m3,
       max(flow_m3h) AS max_flow_m3h, min(flow_m3h) AS min_flow_m3h,
       min(pressure_kpa) AS min_pressure_kpa, count(*)::integer AS readings
FROM meter_readings
WHERE NOT comm_lost
GROUP BY 1, 2
WITH NO DATA;
SELECT add_continuous_aggregate_policy('meter_hourly', start_offset => INTERVAL '3 days',
    end_offset => INTERVAL '1 minute', schedule_interval => INTERVAL '5 minutes');

CREATE MATERIALIZED VIEW detector_hourly WITH (timescaledb.continuous) AS
SELECT time_bucket(INTERVAL '1 hour', ts) AS bucket, device_key,
       max(ch4_lel) AS max_ch4_lel, count(*)::integer AS readings
FROM detector_readings
WHERE NOT comm_lost
GROUP BY 1, 2
WITH NO DATA;
SELECT add_continuous_aggregate_policy('detector_hourly', start_offset => INTERVAL '3 days',
    end_offset => INTERVAL '1 minute', schedule_interval => INTERVAL '5 minutes');

CREATE VIEW district_daily AS
SELECT date_trunc('day', m.bucket) AS day, h.district,
       sum(m.consumption_m3) AS consumption_m3, count(DISTINCT m.device_key) AS meters
FROM meter_hourly m
JOIN devices d ON d.key = m.device_key
JOIN households h ON h.id = d.household_id
GROUP BY 1, 2;
