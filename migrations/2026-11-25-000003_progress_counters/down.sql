DROP VIEW campaign_progress;
ALTER TABLE campaigns DROP COLUMN current_rows_per_sec;
ALTER TABLE voucher_targets DROP COLUMN retry_base;
ALTER TABLE point_targets DROP COLUMN retry_base;
DROP TABLE campaign_counters;
