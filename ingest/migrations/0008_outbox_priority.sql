-- The hotline takes critical alarms first (a burst or a high gas level must not wait behind a
-- backlog of minor alarms): the pending outbox in that order.
CREATE INDEX alarm_outbox_pending_critical ON alarm_outbox
    ((((payload->>'severity') = 'critical') IS NOT TRUE), id) WHERE done_at IS NULL;
-- An alarm's own events (raised, cleared, confidence) are applied in order, also by several
-- hotline instances at once: a row waits while an earlier row of its alarm is pending.
CREATE INDEX alarm_outbox_pending_alarm ON alarm_outbox (alarm_id, id) WHERE done_at IS NULL;
