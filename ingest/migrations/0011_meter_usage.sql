-- What a meter used in each hour: the rise of its volume register from the end of the
-- previous hour with a reading (up to `lookback` earlier) to the end of this one. The
-- rollups' own consumption_m3 (max - min within the hour) misses what flows between one
-- hour's last reading and the next hour's first: about 1/60 at a reading a minute, and all of
-- it for a meter that reports once an hour. The dashboards read consumption from here, on
-- TimescaleDB and stock PostgreSQL alike (both have meter_hourly with these columns).
CREATE FUNCTION meter_usage(t0 timestamptz, t1 timestamptz, lookback interval DEFAULT '2 days')
RETURNS TABLE (bucket timestamptz, device_key integer, consumption_m3 double precision,
               max_flow_m3h real, min_flow_m3h real, readings integer)
LANGUAGE sql STABLE AS $$
    SELECT u.bucket, u.device_key, u.consumption_m3, u.max_flow_m3h, u.min_flow_m3h, u.readings
    FROM (
        SELECT m.bucket, m.device_key, m.max_flow_m3h, m.min_flow_m3h, m.readings,
               m.max_volume_m3 - coalesce(
                   lag(m.max_volume_m3) OVER (PARTITION BY m.device_key ORDER BY m.bucket),
                   m.min_volume_m3) AS consumption_m3
        FROM meter_hourly m
        WHERE m.bucket >= t0 - lookback AND m.bucket <= t1
    ) u
    WHERE u.bucket >= t0
$$;

-- The daily figures per district, counted the same way.
CREATE OR REPLACE VIEW district_daily AS
SELECT date_trunc('day', u.bucket) AS day, h.district,
       sum(u.consumption_m3) AS consumption_m3, count(DISTINCT u.device_key) AS meters
FROM (
    SELECT m.bucket, m.device_key,
           m.max_volume_m3 - coalesce(
               lag(m.max_volume_m3) OVER (PARTITION BY m.device_key ORDER BY m.bucket),
               m.min_volume_m3) AS consumption_m3
    FROM meter_hourly m
) u
JOIN devices d ON d.key = u.device_key
JOIN households h ON h.id = d.household_id
GROUP BY 1, 2;
