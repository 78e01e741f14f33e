-- An outbox row the hotline could not apply as designed is not retried for ever and never
-- stops the rows after it: it is done (done_at), marked failed with the error, and a person
-- gets a ticket holding its raw payload (see alerting/outbox.py). The console and /health
-- list the failed rows.
ALTER TABLE alarm_outbox ADD COLUMN failed_at timestamptz, ADD COLUMN error text;
CREATE INDEX alarm_outbox_failed ON alarm_outbox (failed_at) WHERE failed_at IS NOT NULL;
