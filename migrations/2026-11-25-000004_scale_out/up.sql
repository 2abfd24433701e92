-- Several payoutd instances sharing one campaign. Each process (a run id `<instance>#<nonce>`,
-- new on every start) announces itself in `daemon_instances` with a heartbeat and an expiry
-- taken from the database clock, so instances with skewed clocks agree on who is alive. The
-- campaign's partitions are leased to them through `campaign_partitions.owner` /
-- `lease_expires_at` (see core/src/lease.rs).
--   campaign_id: the campaign the instance serves now (NULL: idle).
--   rate_limit_per_sec: its current share of `money.rate_limit_per_sec`.
--   current_rows_per_sec: rows it finished per second over its last throughput interval.
CREATE TABLE daemon_instances (
    run_id               VARCHAR(128) NOT NULL PRIMARY KEY,
    instance_id          VARCHAR(128) NOT NULL,
    campaign_id          BIGINT           NULL,
    started_at           DATETIME(3)  NOT NULL,
    heartbeat_at         DATETIME(3)  NOT NULL,
    expires_at           DATETIME(3)  NOT NULL,
    rate_limit_per_sec   DOUBLE       NOT NULL DEFAULT 0,
    current_rows_per_sec DOUBLE           NULL,
    -- The live participants of one campaign: `campaign_id = ? AND expires_at > NOW(3)`.
    KEY ix_daemon_instances_campaign (campaign_id, expires_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- A re-plan decided while the campaign runs (a new partition count). It waits here until no
-- lease of the old plan is held, then replaces the partition rows in one transaction: a row's
-- bucket never changes, only the ranges do, and only while nobody serves any of them.
ALTER TABLE campaigns ADD COLUMN replan_to SMALLINT NULL;

-- When the current owner took the partition (database clock).
-- The owner index serves "release everything this process holds" when it deregisters.
ALTER TABLE campaign_partitions
    ADD COLUMN leased_at DATETIME(3) NULL,
    ADD KEY ix_campaign_partitions_owner (owner);
