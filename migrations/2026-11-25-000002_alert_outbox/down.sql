ALTER TABLE campaigns DROP COLUMN failure_alert_armed;
ALTER TABLE campaign_events
    DROP KEY ix_campaign_events_alert,
    DROP COLUMN last_alert_error,
    DROP COLUMN alerted_at,
    DROP COLUMN next_alert_at,
    DROP COLUMN alert_attempts,
    DROP COLUMN alert_state;
