-- What each ingest consumer's persistent MQTT session is subscribed to, recorded after the
-- broker granted it. MQTT cannot list a session's subscriptions, so this is how a restarted
-- consumer knows the filters of its previous life; and how a consumer whose gateway moved to
-- another shard knows when the new owner listens, so that it can let go without a gap.
CREATE TABLE ingest_subscriptions (
    client_id     text NOT NULL,
    topic         text NOT NULL,
    gateway_id    text,              -- NULL: a wildcard filter over every gateway
    shards        integer NOT NULL,  -- the layout the consumer ran with
    shard         integer NOT NULL,
    subscribed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (client_id, topic)
);
CREATE INDEX ingest_subscriptions_topic ON ingest_subscriptions (topic);
