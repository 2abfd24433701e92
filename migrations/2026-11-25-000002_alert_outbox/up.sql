-- The alert outbox is `campaign_events` itself: an event that needs a person (breaker opened or
-- closed, campaign completed, configuration fault, failure rate high) is written with
-- alert_state = 'PENDING' in the same transaction as the state change it records, and the
-- daemon's alert-delivery job posts it to Slack afterwards, retrying until it is delivered.
--   alert_state: NULL (not an alert), 'PENDING', 'SENT' (Slack took it), or 'LOGGED' (no webhook
--   configured: written to the daemon's log instead).
--   alert_attempts: delivery attempts made; next_alert_at: when the next one is due (also the
--   lease of an attempt in progress); alerted_at: when it was sent or logged; last_alert_error:
--   why the last attempt failed (never the webhook URL).
ALTER TABLE campaign_events
    ADD COLUMN alert_state      VARCHAR(16)      NULL,
    ADD COLUMN alert_attempts   INT          NOT NULL DEFAULT 0,
    ADD COLUMN next_alert_at    DATETIME(3)      NULL,
    ADD COLUMN alerted_at       DATETIME(3)      NULL,
    ADD COLUMN last_alert_error VARCHAR(512)     NULL,
    ADD KEY ix_campaign_events_alert (alert_state, next_alert_at);

-- 1 while a campaign may raise FAILURE_RATE_HIGH: cleared when the alert is recorded, set again
-- when the failure rate falls back to the threshold or below (one alert per crossing).
ALTER TABLE campaigns
    ADD COLUMN failure_alert_armed TINYINT NOT NULL DEFAULT 1;
