-- Progress without counting millions of rows: the engine keeps per-shard counters of SUCCEEDED
-- and DEAD rows in the same transaction that changes the rows (shard = the partition's writer;
-- other writers use their own shard numbers), and `campaign_progress` combines them with the
-- stored plan's row count and the (small) IN_FLIGHT and FAILED ranges of the claim index.
CREATE TABLE campaign_counters (
    campaign_id BIGINT   NOT NULL,
    shard       SMALLINT NOT NULL,
    succeeded   BIGINT   NOT NULL DEFAULT 0,
    dead        BIGINT   NOT NULL DEFAULT 0,
    PRIMARY KEY (campaign_id, shard)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- `attempts` only ever grows (it fences outcome writes); a requeue gives a row a fresh retry
-- budget by moving `retry_base` up to `attempts` instead of resetting it.
ALTER TABLE voucher_targets ADD COLUMN retry_base INT NOT NULL DEFAULT 0 AFTER attempts;
ALTER TABLE point_targets ADD COLUMN retry_base INT NOT NULL DEFAULT 0 AFTER attempts;

-- Rows finished per second over the daemon's last throughput interval.
ALTER TABLE campaigns ADD COLUMN current_rows_per_sec DOUBLE NULL;

-- One row per campaign: the counts an operator needs, cheap at any campaign size once the
-- campaign has a plan (before that, total_rows is counted from the target table).
CREATE VIEW campaign_progress AS
SELECT x.campaign_id, x.kind, x.name, x.status, x.total_rows, x.succeeded, x.dead, x.in_flight,
       x.failed,
       GREATEST(x.total_rows - x.succeeded - x.dead - x.in_flight - x.failed, 0) AS pending,
       CASE WHEN x.total_rows > 0 THEN (x.failed + x.dead) * 100.0 / x.total_rows ELSE 0 END
           AS failure_rate_pct,
       x.current_rows_per_sec, x.started_at, x.completed_at
FROM (
    SELECT c.id AS campaign_id, c.kind, c.name, c.status, c.current_rows_per_sec, c.started_at,
           c.completed_at,
           COALESCE(c.planned_rows,
               (SELECT COUNT(*) FROM voucher_targets v WHERE v.event_id = c.id)
             + (SELECT COUNT(*) FROM point_targets p WHERE p.event_id = c.id)) AS total_rows,
           (SELECT COALESCE(SUM(k.succeeded), 0) FROM campaign_counters k WHERE k.campaign_id = c.id)
               AS succeeded,
           (SELECT COALESCE(SUM(k.dead), 0) FROM campaign_counters k WHERE k.campaign_id = c.id)
               AS dead,
           (SELECT COUNT(*) FROM voucher_targets v WHERE v.event_id = c.id AND v.status = 'IN_FLIGHT')
             + (SELECT COUNT(*) FROM point_targets p WHERE p.event_id = c.id AND p.status = 'IN_FLIGHT')
               AS in_flight,
           (SELECT COUNT(*) FROM voucher_targets v WHERE v.event_id = c.id AND v.status = 'FAILED')
             + (SELECT COUNT(*) FROM point_targets p WHERE p.event_id = c.id AND p.status = 'FAILED')
               AS failed
    FROM campaigns c
) x;
