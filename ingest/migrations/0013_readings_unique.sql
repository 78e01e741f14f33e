-- A reading is stored once per (device, ts): the same readings sent again under a new batch id
-- (a second path, a gateway whose spool lost its sequence) are recognised as repeats, kept out
-- of detection and out of the rollups. Repeats stored before this migration are removed first.
-- The unique index replaces the plain one (same columns; every insert already maintained it).
DELETE FROM detector_readings a USING detector_readings b
    WHERE a.device_key = b.device_key AND a.ts = b.ts AND a.tableoid = b.tableoid
      AND a.ctid > b.ctid;
DELETE FROM meter_readings a USING meter_readings b
    WHERE a.device_key = b.device_key AND a.ts = b.ts AND a.tableoid = b.tableoid
      AND a.ctid > b.ctid;
CREATE UNIQUE INDEX detector_readings_device_ts_once ON detector_readings (device_key, ts);
DROP INDEX detector_readings_device_ts;
CREATE UNIQUE INDEX meter_readings_device_ts_once ON meter_readings (device_key, ts);
DROP INDEX meter_readings_device_ts;
