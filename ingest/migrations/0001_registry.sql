-- The device registry: gateways, households, devices. One source of truth per household and
-- device (DOMAIN.md #5). Devices get a small integer key: readings store the key, not the id.
CREATE TABLE gateways (
    id          text PRIMARY KEY CHECK (id ~ '^[^/+#[:space:]]{1,64}$'),
    description text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE households (
    id         text PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 64),
    district   text NOT NULL CHECK (length(district) BETWEEN 1 AND 64),
    address    text NOT NULL CHECK (length(address) >= 1),
    phone      text,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX households_district ON households (district);

CREATE TABLE devices (
    key                 integer GENERATED ALWAYS AS IDENTITY UNIQUE,
    id                  text PRIMARY KEY CHECK (id ~ '^[^[:space:]]{1,64}$'),
    kind                text NOT NULL CHECK (kind IN ('detector', 'meter')),
    household_id        text NOT NULL REFERENCES households (id),
    gateway_id          text NOT NULL REFERENCES gateways (id),
    profile             text NOT NULL,
    meter_size          text CHECK (meter_size IN ('G1.6', 'G2.5', 'G4')),
    expected_interval_s integer NOT NULL DEFAULT 60 CHECK (expected_interval_s > 0),
    test_mode           boolean NOT NULL DEFAULT false,
    created_at          timestamptz NOT NULL DEFAULT now(),
    CHECK ((kind = 'meter') = (meter_size IS NOT NULL))
);
CREATE INDEX devices_gateway ON devices (gateway_id);
CREATE INDEX devices_household ON devices (household_id);
